"""Deprecated module: :func:`tunnelgraph.reduce` now lives in :mod:`tunnelgraph.api` and runs
:class:`tunnelgraph.rewrite.passes.ReducePass`; ``ReductionReport`` is in
:mod:`tunnelgraph.rewrite.passes`. Importing names from here still works for
one release, with a DeprecationWarning."""

from __future__ import annotations

import warnings
from typing import Any

_MOVED = {"reduce": "tunnelgraph.api", "ReductionReport": "tunnelgraph.rewrite.passes"}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'tunnelgraph.reduction' has no attribute {name!r}")
    import importlib

    warnings.warn(
        f"tunnelgraph.reduction.{name} moved to {_MOVED[name]}.{name} (also tunnelgraph.{name})",
        DeprecationWarning, stacklevel=2,
    )
    return getattr(importlib.import_module(_MOVED[name]), name)

"""Deprecated alias of :mod:`tunnelgraph.testing`, kept for one release (removed in 0.2).

The naive oracle for A (:func:`~tunnelgraph.testing.naive_a_matrix`,
:func:`~tunnelgraph.testing.inbound_gradient`) stands on the public rewrite,
so it lives above :mod:`tunnelgraph.api`, in :mod:`tunnelgraph.testing`.
This module imports nothing at import time; reading one of its names
imports :mod:`tunnelgraph.testing` and warns with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

_MOVED = ("naive_a_matrix", "inbound_gradient")


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"tunnelgraph.statistics.reference is deprecated and goes in tunnelgraph 0.2; "
        f"import {name} from tunnelgraph.testing",
        DeprecationWarning,
        stacklevel=2,
    )
    from tunnelgraph import testing  # the deprecated alias points up; see tests/test_layers.py

    return getattr(testing, name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_MOVED))

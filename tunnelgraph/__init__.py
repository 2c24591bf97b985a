"""tunnelgraph: function-preserving structural rewrites of neural networks, as graphs.

Trace a model into a DAG of units, find the channels that can be cloned
(tunnel sites), and open, close or reorganise tunnels without changing the
function the network computes (Escaping Flat Areas via Function-Preserving
Structural Network Modifications).

Importing tunnelgraph imports neither torch nor onnx: the PyTorch parts
(tracing, statistics, verification, export) load on first use, so ONNX models
can be analysed and rewritten without torch; and the ONNX parts (``load_onnx``,
``to_torch``, ``export_onnx``) load on first use, so the PyTorch path works
without the optional ``onnx`` extra (without it they raise
:class:`MissingExtraError`, an ``ImportError`` that says
``pip install "tunnelgraph[onnx]"``).
"""

from __future__ import annotations

import importlib
from typing import Any

from tunnelgraph.analysis.groups import THROUGH_OPTIONS, ChannelGroup, ParamSlice
from tunnelgraph.analysis.reducibility import Finding, UnitMeasures
from tunnelgraph.analysis.sites import AnalysisReport, Site
from tunnelgraph.api import (
    OpenedTunnel,
    Reorganization,
    analyze,
    apply_edit,
    find_sites,
    function_change,
    merge,
    open_tunnels,
    reduce,
    reorganize,
    reorganize_from_data,
    rewrite,
    replay,
    rewrite_records,
    save_records,
)
from tunnelgraph.errors import (
    MissingExtraError,
    RewriteError,
    SiteError,
    StatisticsError,
    TraceError,
    TunnelgraphError,
)
from tunnelgraph.ir import Graph
from tunnelgraph.rewrite.edits import ChannelEdit
from tunnelgraph.rewrite.passes import ReductionReport, RewriteRecord

__version__ = "0.1.0"

_LAZY = {
    "trace": "tunnelgraph.adapters.pytorch",
    "verify": "tunnelgraph.equivalence",
    "perturbed": "tunnelgraph.runtime",
    "output_sensitivity": "tunnelgraph.equivalence",
    "EquivalenceReport": "tunnelgraph.equivalence",
    "a_statistics": "tunnelgraph.statistics.engine",
    "SiteStatistics": "tunnelgraph.statistics.engine",
    "lambda_t": "tunnelgraph.statistics.lambdas",
    "random_lambda": "tunnelgraph.statistics.lambdas",
    "rank_sites": "tunnelgraph.statistics.lambdas",
    "StatisticsTracker": "tunnelgraph.statistics.tracker",
    "export_onnx": "tunnelgraph.backends.onnx_export",
    "to_torch": "tunnelgraph.backends.onnx_torch",
    "load_onnx": "tunnelgraph.frontends.onnx",
}


def __getattr__(name: str) -> Any:
    """The names that need torch or onnx, imported on first use.

    Without the ``onnx`` extra, an ONNX function is still a name here (so
    ``from tunnelgraph import *`` and ``help(tunnelgraph)`` work); calling it
    raises :class:`MissingExtraError`, which says how to install the extra.
    """
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tunnelgraph' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except MissingExtraError as error:
        return _unavailable(name, error)
    globals()[name] = value
    return value


def _unavailable(name: str, error: MissingExtraError) -> Any:
    """A stand-in for the function ``name`` that raises ``error`` (a missing extra) when called."""

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise MissingExtraError(str(error)) from error

    unavailable.__name__ = unavailable.__qualname__ = name
    unavailable.__doc__ = f"Unavailable: {error}"
    return unavailable


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "THROUGH_OPTIONS",
    "AnalysisReport",
    "ChannelEdit",
    "ChannelGroup",
    "EquivalenceReport",
    "Finding",
    "Graph",
    "MissingExtraError",
    "OpenedTunnel",
    "ParamSlice",
    "ReductionReport",
    "RewriteRecord",
    "Reorganization",
    "RewriteError",
    "Site",
    "SiteError",
    "SiteStatistics",
    "StatisticsError",
    "StatisticsTracker",
    "TraceError",
    "TunnelgraphError",
    "UnitMeasures",
    "a_statistics",
    "analyze",
    "apply_edit",
    "export_onnx",
    "find_sites",
    "function_change",
    "lambda_t",
    "load_onnx",
    "merge",
    "open_tunnels",
    "output_sensitivity",
    "perturbed",
    "random_lambda",
    "rank_sites",
    "reduce",
    "reorganize",
    "reorganize_from_data",
    "replay",
    "rewrite",
    "rewrite_records",
    "save_records",
    "to_torch",
    "trace",
    "verify",
]

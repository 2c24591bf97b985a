"""tunnelgraph: function-preserving structural rewrites of neural networks, as graphs.

Trace a model into a DAG of units, find the channels that can be cloned
(tunnel sites), and open, close or reorganise tunnels without changing the
function the network computes (Escaping Flat Areas via Function-Preserving
Structural Network Modifications).

Importing tunnelgraph does not import torch: the PyTorch parts (tracing,
statistics, verification, export) load on first use, so ONNX models can be
analysed and rewritten without it.
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
    reorganize,
    rewrite,
)
from tunnelgraph.errors import (
    RewriteError,
    SiteError,
    StatisticsError,
    TraceError,
    TunnelgraphError,
)
from tunnelgraph.frontends.onnx import load_onnx
from tunnelgraph.ir import Graph
from tunnelgraph.rewrite.edits import ChannelEdit

__version__ = "0.1.0"

_LAZY = {
    "trace": "tunnelgraph.frontends.fx",
    "verify": "tunnelgraph.equivalence",
    "EquivalenceReport": "tunnelgraph.equivalence",
    "a_statistics": "tunnelgraph.statistics.engine",
    "SiteStatistics": "tunnelgraph.statistics.engine",
    "lambda_t": "tunnelgraph.statistics.lambdas",
    "random_lambda": "tunnelgraph.statistics.lambdas",
    "rank_sites": "tunnelgraph.statistics.lambdas",
    "StatisticsTracker": "tunnelgraph.statistics.tracker",
    "reduce": "tunnelgraph.reduction",
    "ReductionReport": "tunnelgraph.reduction",
    "export_onnx": "tunnelgraph.backends.onnx_export",
    "to_torch": "tunnelgraph.backends.onnx_torch",
}


def __getattr__(name: str) -> Any:
    """The PyTorch-dependent names, imported on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tunnelgraph' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
    "OpenedTunnel",
    "ParamSlice",
    "ReductionReport",
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
    "random_lambda",
    "rank_sites",
    "reduce",
    "reorganize",
    "rewrite",
    "to_torch",
    "trace",
    "verify",
]

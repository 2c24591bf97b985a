"""tunnelgraph: function-preserving structural rewrites of neural networks, as graphs.

Trace a model into a DAG of units, find the channels that can be cloned
(tunnel sites), and open, close or reorganise tunnels without changing the
function the network computes (Escaping Flat Areas via Function-Preserving
Structural Network Modifications).
"""

from tunnelgraph.analysis.groups import THROUGH_OPTIONS, ChannelGroup, ParamSlice
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
from tunnelgraph.analysis.reducibility import Finding
from tunnelgraph.errors import RewriteError, SiteError, StatisticsError, TraceError, TunnelgraphError
from tunnelgraph.backends.onnx_export import export_onnx
from tunnelgraph.frontends.fx import trace
from tunnelgraph.frontends.onnx import load_onnx
from tunnelgraph.ir import Graph
from tunnelgraph.reduce import ReductionReport, reduce
from tunnelgraph.rewrite.edits import ChannelEdit
from tunnelgraph.statistics.engine import SiteStatistics, a_statistics
from tunnelgraph.statistics.lambdas import lambda_t, random_lambda, rank_sites
from tunnelgraph.statistics.tracker import StatisticsTracker
from tunnelgraph.verify import EquivalenceReport, verify

__version__ = "0.1.0"

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
    "trace",
    "verify",
]

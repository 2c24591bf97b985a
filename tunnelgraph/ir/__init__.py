"""The framework-free intermediate representation: a DAG of units."""

from tunnelgraph.ir.graph import IDENTITY, ChannelMap, Graph, Node, OpKind, ParamRef

__all__ = ["IDENTITY", "ChannelMap", "Graph", "Node", "OpKind", "ParamRef"]

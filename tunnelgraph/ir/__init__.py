"""The framework-free intermediate representation: a DAG of units."""

from tunnelgraph.ir.graph import (
    ACTIVATION_FUNCTIONS,
    IDENTITY,
    POOLING_FUNCTIONS,
    ChannelMap,
    FrozenMapping,
    Graph,
    Node,
    OpKind,
    ParamRef,
    activation_function,
)

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "IDENTITY",
    "POOLING_FUNCTIONS",
    "ChannelMap",
    "FrozenMapping",
    "Graph",
    "Node",
    "OpKind",
    "ParamRef",
    "activation_function",
]

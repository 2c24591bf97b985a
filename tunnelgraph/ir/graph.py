"""The unit DAG every frontend produces and every analysis reads.

The graph follows the paper's (U, E) formalism one level up: a node is an
operation whose output is a tensor of units (hidden units or conv filters,
indexed along the node's channel axis), and an edge says how the source's
channels appear at the target. The IR knows nothing of torch or ONNX:
parameters are referred to by the names the frontend gave them, and what a
frontend could not understand is kept as a ``BLOCKING`` node rather than
guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterator, Mapping

import networkx as nx


class OpKind(str, Enum):
    """What an operation does to channels.

    - ``INPUT``: a graph input; its channels cannot be cloned.
    - ``CONSTANT``: a stored tensor used as data (not as a layer's weight);
      its channels cannot be resized by tunnelgraph.
    - ``PARAMETRIC``: a layer with inbound weights (``Linear``, ``Conv``): its
      output channels are units; its input channel axis consumes units.
    - ``CHANNELWISE``: acts on each channel alone (activations, batch norm,
      pooling, dropout, depthwise convolution, scaling by a number).
    - ``COUPLING``: ties channels of several tensors: element-wise ``add``,
      ``sub``, ``mul``, ``div`` (the same channel everywhere) and ``concat``
      (channels placed at offsets).
    - ``RESHAPE``: moves the channel axis into a wider one, as ``flatten``
      does: channel c becomes a contiguous block of features.
    - ``METADATA``: reads shapes only (``x.size(0)``); produces no tensor.
    - ``BLOCKING``: mixes channels or is not understood; never passed.
    - ``OUTPUT``: the graph output.
    """

    INPUT = "input"
    CONSTANT = "constant"
    PARAMETRIC = "parametric"
    CHANNELWISE = "channelwise"
    COUPLING = "coupling"
    RESHAPE = "reshape"
    METADATA = "metadata"
    BLOCKING = "blocking"
    OUTPUT = "output"


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer by reference: its qualified name and shape.

    ``shared`` is true when the same storage is reachable under another name
    or from another node (tied weights): rewriting it would change two layers.
    """

    name: str
    shape: tuple[int, ...]
    shared: bool = False


@dataclass(frozen=True)
class ChannelMap:
    """Where channel ``c`` of an edge's source lands at its target.

    Channel ``c`` occupies positions ``offset + c * block`` up to
    ``offset + (c + 1) * block`` (exclusive) along the target's channel axis.
    Identity is ``ChannelMap(0, 1)``; a concat input at offset ``o`` is
    ``ChannelMap(o, 1)``; flattening ``C x H x W`` is ``ChannelMap(0, H * W)``
    (the map a channel on the first merged axis takes; the edge into a
    flatten node carries it).
    """

    offset: int = 0
    block: int = 1

    def then(self, other: "ChannelMap") -> "ChannelMap":
        """The map of going through ``self`` and then ``other``."""
        return ChannelMap(other.offset + self.offset * other.block, self.block * other.block)

    def positions(self, channel: int) -> range:
        start = self.offset + channel * self.block
        return range(start, start + self.block)


IDENTITY = ChannelMap()

ACTIVATION_FUNCTIONS = frozenset({
    "relu", "leaky_relu", "prelu", "relu6", "thresholded_relu", "elu", "selu", "celu", "gelu", "silu",
    "mish", "softplus", "softsign", "sigmoid", "hardsigmoid", "hardswish", "hardtanh", "tanh", "tanhshrink",
    "exp", "log", "sqrt", "square", "reciprocal", "abs", "neg", "erf", "clamp", "gt", "lt", "ge", "le", "eq",
})
"""The names an ``activation`` node's ``attrs["function"]`` takes, whatever the framework.

Comparisons with a number (``gt``, ``lt``, ``ge``, ``le``, ``eq``) are element-wise
functions too; ``clamp`` is clipping to constant bounds (``torch.clamp``, ONNX
``Clip``, which is also how exporters write ``relu6``).
"""

POOLING_FUNCTIONS = frozenset({"avg", "max", "lp", "mean"})
"""The names a ``pooling`` node's ``attrs["function"]`` takes: ``avg`` (average
pooling over windows, adaptive or global included), ``max`` (max pooling, idem),
``lp`` (power-average pooling) and ``mean`` (a mean over whole axes). A pooling
over whole axes (``mean``, or ``max`` from ONNX ``ReduceMax``) lists them in
``attrs["reduces"]`` and says in ``attrs["keepdim"]`` whether they stay."""

_ACTIVATION_KEYS = {name.replace("_", ""): name for name in ACTIVATION_FUNCTIONS}


def activation_function(spelling: str) -> str:
    """The framework-neutral name of the activation a framework spells ``spelling``.

    Case, underscores and a trailing in-place ``_`` do not matter:
    ``"LeakyReLU"`` (a module class), ``"leaky_relu_"`` (a function) and
    ``"LeakyRelu"`` (an ONNX operator) all give ``"leaky_relu"``. A spelling
    that names none of :data:`ACTIVATION_FUNCTIONS` comes back lower-cased and
    unchanged otherwise, so analyses that match names do not recognise it
    (and claim nothing that depends on it).
    """
    return _ACTIVATION_KEYS.get(spelling.lower().replace("_", ""), spelling.lower())


@dataclass
class Node:
    """One operation of the DAG.

    Attributes:
        name: unique node name (the fx node name, or the ONNX node name).
        kind: what the operation does to channels (:class:`OpKind`).
        op: the operation's family, e.g. ``"linear"``, ``"conv"``,
            ``"batchnorm"``, ``"activation"``, ``"pooling"``, ``"dropout"``,
            ``"depthwise"``, ``"add"``, ``"concat"``, ``"flatten"``.
        inputs: names of the nodes whose tensors feed this one, in argument
            order (a name may repeat, as in ``x + x``).
        module: qualified name of the layer that owns ``params`` (for
            PyTorch, a name from ``model.named_modules()``); ``None`` for
            parameter-free operations.
        params: the layer's parameters and per-channel buffers by role
            (``"weight"``, ``"bias"``, ``"running_mean"``, ``"running_var"``).
        shape: the output tensor's shape, batch included, or ``None`` when
            the output is not a tensor.
        channel_axis: the axis of the output that holds units, for
            parametric layers; the axis of the input they consume is
            ``attrs["in_axis"]``. Channel-wise operations leave it ``None``:
            they keep the axis of their input.
        attrs: operation details (``groups``, ``dim``, ``requires_axis``,
            ``literal_widths``, ``detail`` for blocking nodes, ...).
            ``attrs["function"]`` names what an ``activation``, ``pooling``
            or ``scale`` node computes, in the framework-neutral spelling
            every frontend writes: one of :data:`ACTIVATION_FUNCTIONS`, of
            :data:`POOLING_FUNCTIONS`, or ``add``/``sub``/``mul``/``div``.
    """

    name: str
    kind: OpKind
    op: str
    inputs: tuple[str, ...] = ()
    module: str | None = None
    params: Mapping[str, ParamRef] = field(default_factory=dict)
    shape: tuple[int, ...] | None = None
    channel_axis: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """A short human-readable label: ``conv 'features.0'``."""
        where = self.module if self.module is not None else self.name
        return f"{self.op} '{where}'"


class Graph:
    """A DAG of :class:`Node` objects on a :class:`networkx.DiGraph`.

    Node names key the networkx graph; each networkx node carries its
    :class:`Node` under ``"node"``. An edge ``(u, v)`` carries ``maps``: one
    :class:`ChannelMap` per time ``u`` appears among ``v``'s inputs.
    Insertion order is a topological order (frontends add nodes in execution
    order), which :meth:`topological` returns.
    """

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.nx = nx.DiGraph()
        self.source: object | None = None
        """The frontend's own form of the model (e.g. a ``torch.fx.GraphModule``), opaque here."""
        self._order: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, node: Node, maps: Mapping[int, ChannelMap] | None = None) -> Node:
        """Add ``node`` after its inputs; ``maps`` gives non-identity maps by input position."""
        if node.name in self.nx:
            raise ValueError(f"duplicate node name {node.name!r}")
        self.nx.add_node(node.name, node=node)
        self._index[node.name] = len(self._order)
        self._order.append(node.name)
        for position, source in enumerate(node.inputs):
            if source not in self.nx:
                raise ValueError(f"node {node.name!r} uses {source!r} before it is defined")
            channel_map = (maps or {}).get(position, IDENTITY)
            if self.nx.has_edge(source, node.name):
                self.nx.edges[source, node.name]["maps"] += (channel_map,)
            else:
                self.nx.add_edge(source, node.name, maps=(channel_map,))
        return node

    def __getitem__(self, name: str) -> Node:
        return self.nx.nodes[name]["node"]

    def __contains__(self, name: object) -> bool:
        return name in self.nx

    def __iter__(self) -> Iterator[Node]:
        return (self[name] for name in self._order)

    def __len__(self) -> int:
        return len(self._order)

    def topological(self) -> list[Node]:
        """All nodes, every node after its inputs."""
        return list(self)

    def index(self, name: str) -> int:
        """Position of ``name`` in the topological order."""
        return self._index[name]

    def users(self, name: str) -> list[Node]:
        """Nodes that take ``name``'s output as an input, in topological order."""
        return [self[user] for user in sorted(self.nx.successors(name), key=self._index.__getitem__)]

    def maps(self, source: str, target: str) -> tuple[ChannelMap, ...]:
        """The channel maps of every use of ``source`` by ``target``."""
        return self.nx.edges[source, target]["maps"]

    def param_users(self) -> dict[str, list[str]]:
        """Parameter name -> names of the nodes that reference it."""
        users: dict[str, list[str]] = {}
        for node in self:
            for ref in node.params.values():
                users.setdefault(ref.name, []).append(node.name)
        return users

    def summary(self) -> str:
        """One line per node: name, kind, op, shape and inputs."""
        lines = []
        for node in self:
            lines.append(
                f"{node.name:<24} {node.kind.value:<11} {node.op:<12} "
                f"{str(node.shape):<20} <- {', '.join(node.inputs)}"
            )
        return "\n".join(lines)

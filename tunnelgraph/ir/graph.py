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

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any, ItemsView, Iterator, KeysView, Mapping, TypeVar, ValuesView

import networkx as nx

K = TypeVar("K")
V = TypeVar("V")


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

POOLING_FUNCTIONS = frozenset({"avg", "max", "lp", "mean", "gather"})
"""The names a ``pooling`` node's ``attrs["function"]`` takes: ``avg`` (average
pooling over windows, adaptive or global included), ``max`` (max pooling, idem),
``lp`` (power-average pooling), ``mean`` (a mean over whole axes) and ``gather``
(positions picked and repeated along other axes than the channels', as ONNX
exporters write adaptive pooling with ``GatherND``). A pooling over whole axes
(``mean``, or ``max`` from ONNX ``ReduceMax``) lists them in ``attrs["reduces"]``
and says in ``attrs["keepdim"]`` whether they stay.

Channel-wise nodes that move the channel axis say where each input axis goes
in ``attrs["axis_map"]`` (a transpose's inverse permutation; None for an axis
a gather indexes, where channels cannot be). A ``transpose`` node (ONNX
``Transpose``; torch's ``permute``, ``transpose``, ``movedim`` and their kin)
also gives the permutation itself in ``attrs["perm"]``: output axis ``i`` is
input axis ``perm[i]``. Those with stored operands that
broadcast (ONNX ``Div`` by a stored tensor, ``Where`` with a stored mask) give
the operands' shapes in ``attrs["constant_shapes"]``: the analysis blocks the
channels where one varies along their axis."""

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


class FrozenMapping(Mapping[K, V]):
    """A read-only mapping: no item can be set, deleted or added after construction.

    It compares equal to any mapping with the same items, hashes when its
    values do, and pickles and deep-copies (unlike ``types.MappingProxyType``).
    """

    __slots__ = ("_items",)
    _items: dict[K, V]

    def __init__(self, items: Mapping[K, V] | None = None) -> None:
        object.__setattr__(self, "_items", dict(items or {}))

    def __getitem__(self, key: K) -> V:
        return self._items[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    # the dict's own methods: the analysis reads attributes in its inner loops
    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K, default: Any = None) -> Any:
        return self._items.get(key, default)

    def keys(self) -> KeysView[K]:
        return self._items.keys()

    def values(self) -> ValuesView[V]:
        return self._items.values()

    def items(self) -> ItemsView[K, V]:
        return self._items.items()

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._items,))

    def __repr__(self) -> str:
        return repr(self._items)


_ATOMS = frozenset({int, float, str, bool, type(None)})


def frozen(value: Any) -> Any:
    """``value`` with every mapping (at any depth) made a :class:`FrozenMapping` and every list a tuple.

    Plain tuples are frozen item by item; other values (named tuples
    included) are kept as they are.
    """
    if type(value) in _ATOMS:  # the common case, before the slower abstract-class checks
        return value
    if isinstance(value, Mapping):
        return FrozenMapping({key: frozen(item) for key, item in value.items()})
    if isinstance(value, list) or type(value) is tuple:
        return tuple(frozen(item) for item in value)
    return value


EMPTY: Mapping[Any, Any] = FrozenMapping()


@dataclass(frozen=True)
class Node:
    """One operation of the DAG; immutable once constructed.

    A frontend gives every field when it creates the node; nothing is
    attached afterwards. What a pass learns about a node goes into ``meta``
    through :meth:`Graph.annotate`, which puts a new node in its place.

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
        attrs: the operation's attributes (``groups``, ``dim``,
            ``requires_axis``, ``literal_widths``, ``detail`` for blocking
            nodes, ...), in framework-neutral terms.
            ``attrs["function"]`` names what an ``activation``, ``pooling``
            or ``scale`` node computes, in the framework-neutral spelling
            every frontend writes: one of :data:`ACTIVATION_FUNCTIONS`, of
            :data:`POOLING_FUNCTIONS`, or ``add``/``sub``/``mul``/``div``.
            A ``linear`` or ``conv`` node with a bias that the operation
            multiplies by a factor other than 1 (ONNX ``Gemm``'s ``beta``)
            gives it as ``attrs["bias_scale"]``. The ONNX frontend also
            records the operator it read in ``attrs["op_type"]``: where a
            node came from, not what it does (``op`` and the attributes
            above say that).
        input_maps: where the channels of input ``i`` land in this node's
            output, by input position, for the inputs that do not keep them
            in place (:data:`IDENTITY`): a concat's offsets, a flatten's
            blocks. The graph puts them on the node's in-edges
            (:meth:`Graph.maps`).
        meta: what passes learned about the node (as ``torch.fx``'s
            ``node.meta``); frontends leave it empty.

    ``attrs``, ``params``, ``input_maps`` and ``meta`` are read-only
    mappings (:class:`FrozenMapping`), whatever mapping the constructor is
    given; nested dicts in ``attrs`` and ``meta`` are frozen too.

    Raises:
        ValueError: an ``input_maps`` position names no input, or maps to
            something that is not a :class:`ChannelMap`.
    """

    name: str
    kind: OpKind
    op: str
    inputs: tuple[str, ...] = ()
    module: str | None = None
    params: Mapping[str, ParamRef] = EMPTY
    shape: tuple[int, ...] | None = None
    channel_axis: int | None = None
    attrs: Mapping[str, Any] = EMPTY
    input_maps: Mapping[int, ChannelMap] = EMPTY
    meta: Mapping[str, Any] = EMPTY

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # the frozen dataclass's own way to normalise its fields
        set_field(self, "inputs", tuple(self.inputs))
        if self.shape is not None:
            set_field(self, "shape", tuple(int(size) for size in self.shape))
        set_field(self, "params", FrozenMapping(self.params))
        set_field(self, "attrs", frozen(self.attrs))
        set_field(self, "input_maps", FrozenMapping(self.input_maps))
        set_field(self, "meta", frozen(self.meta))
        for position, channel_map in self.input_maps.items():
            if not (isinstance(position, int) and 0 <= position < len(self.inputs)):
                raise ValueError(
                    f"node {self.name!r}: input_maps names input {position!r}, but it has "
                    f"{len(self.inputs)} input(s)"
                )
            if not isinstance(channel_map, ChannelMap):
                raise ValueError(f"node {self.name!r}: input_maps[{position}] is not a ChannelMap")

    def input_map(self, position: int) -> ChannelMap:
        """Where the channels of input ``position`` land in this node's output."""
        return self.input_maps.get(position, IDENTITY)

    def describe(self) -> str:
        """A short human-readable label: ``conv 'features.0'``."""
        where = self.module if self.module is not None else self.name
        return f"{self.op} '{where}'"


class Graph:
    """A DAG of :class:`Node` objects on a :class:`networkx.DiGraph`.

    Node names key the networkx graph; each networkx node carries its
    :class:`Node` under ``"node"``. An edge ``(u, v)`` carries ``maps``: one
    :class:`ChannelMap` per time ``u`` appears among ``v``'s inputs, taken
    from ``v``'s ``input_maps``. Insertion order is a topological order
    (frontends add nodes in execution order), which :meth:`topological`
    returns. Nodes are immutable; the graph grows by :meth:`add`, and
    :meth:`annotate` replaces a node by one with more ``meta``.
    """

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.nx = nx.DiGraph()
        self.source: object | None = None
        """The frontend's own form of the model (e.g. a ``torch.fx.GraphModule``), opaque here."""
        self.frontend: str | None = None
        """Which capture made the graph ("fx", "export", "onnx"), where the frontend says."""
        self.refused: dict[str, str] = {}
        """Channel groups (by name) found not function-preserving after the capture, with the reason.

        A capture that specialises to its example shapes (``torch.export``)
        can elide an operation the rules would have blocked; the PyTorch
        adapter confirms each legal group of such a capture by a trial
        rewrite and records here the ones that fail. The rule engine adds
        the reason to those groups.
        """
        self._order: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, node: Node) -> Node:
        """Add ``node`` after its inputs, with one edge map per input (``node.input_map(i)``).

        Raises:
            ValueError: the name is taken, or an input is not in the graph yet
                (the graph is then unchanged).
        """
        if node.name in self.nx:
            raise ValueError(f"duplicate node name {node.name!r}")
        for source in node.inputs:
            if source not in self.nx:
                raise ValueError(f"node {node.name!r} uses {source!r} before it is defined")
        self.nx.add_node(node.name, node=node)
        self._index[node.name] = len(self._order)
        self._order.append(node.name)
        for position, source in enumerate(node.inputs):
            channel_map = node.input_map(position)
            if self.nx.has_edge(source, node.name):
                self.nx.edges[source, node.name]["maps"] += (channel_map,)
            else:
                self.nx.add_edge(source, node.name, maps=(channel_map,))
        return node

    def annotate(self, name: str, **meta: Any) -> Node:
        """Record what a pass learned about node ``name``: its ``meta`` gains (or updates) ``meta``.

        The node itself does not change: a copy with the merged ``meta``
        takes its place (same name, inputs and edges) and is returned.
        References to the old node keep the old ``meta``.
        """
        node = self[name]
        annotated = dataclasses.replace(node, meta={**node.meta, **meta})
        self.nx.nodes[name]["node"] = annotated
        return annotated

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

"""Channel groups: which channels move together, where they live, and whether they may move.

A *channel group* is a set of tensors whose channel axes are one index space:
the outputs of the parametric layers that produce it (coupled through
residual adds), every channel-wise operation between them and their
consumers, and the derived spaces its channels reach through concat (at an
offset) and flatten (as a block of features). Cloning channel ``c`` of a
group edits every parameter that touches it; :class:`ParamSlice` records
each such place. The walker fails closed: anything it does not understand
adds a reason, and a group with reasons has no sites.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Literal

from tunnelgraph.ir import IDENTITY, ChannelMap, Graph, Node, OpKind

THROUGH_OPTIONS: tuple[str, ...] = ("batchnorm", "pooling", "dropout", "depthwise")
"""Per-channel operations that sites may pass when asked (``through=``); the
paper's default is to skip units that feed them."""

HintStyle = Literal["python", "cli"]
_HINT_STYLE: ContextVar[HintStyle] = ContextVar("tunnelgraph_hint_style", default="python")


@contextmanager
def hint_style(style: HintStyle) -> Iterator[None]:
    """Word the ``through=`` hints of reasons and errors made inside for Python or the command line."""
    token = _HINT_STYLE.set(style)
    try:
        yield
    finally:
        _HINT_STYLE.reset(token)


def through_rules(options: Iterable[str]) -> str:
    """The rules a message says sites were looked for under: ``with through=(...)``, or the default ones."""
    chosen = tuple(options)
    return f"with {through_hint(chosen)}" if chosen else "under the default rules (no through=)"


def through_hint(options: Iterable[str]) -> str:
    """How a caller asks for ``options``: ``through=("batchnorm",)``, or ``--through batchnorm`` in the CLI."""
    chosen = tuple(options)
    if _HINT_STYLE.get() == "cli":
        return f"--through {','.join(chosen)}"
    quoted = ", ".join(f'"{option}"' for option in chosen)
    return f"through=({quoted}{',' if len(chosen) == 1 else ''})"


_ELEMENTWISE = ("add", "sub", "mul", "div", "where")
_LABELS = {
    "batchnorm": "batch norm",
    "pooling": "pooling",
    "dropout": "dropout",
    "depthwise": "depthwise convolution",
}

Role = Literal["inbound", "channelwise", "outbound"]


@dataclass(frozen=True)
class ParamSlice:
    """The entries of one parameter that belong to a group's channels.

    Channel ``c`` of the group owns the entries at positions
    ``offset + c * block`` to ``offset + (c + 1) * block`` (exclusive) along
    ``axis``. ``role`` says how a rewrite treats them: ``"inbound"`` rows of
    a producer (weights and bias) and ``"channelwise"`` entries of a
    per-channel layer (batch norm, depthwise conv) are copied and averaged;
    ``"outbound"`` columns of a consumer are split by lambda and summed.
    ``part`` is the parameter's place in its layer (``"weight"``, ``"bias"``,
    ``"running_mean"``, ...), whatever the framework calls the tensor.
    """

    param: str
    module: str
    role: Role
    shape: tuple[int, ...]
    axis: int
    offset: int = 0
    block: int = 1
    part: str = ""

    @property
    def channel_numel(self) -> int:
        """How many entries of this parameter one channel owns."""
        return math.prod(self.shape) // self.shape[self.axis] * self.block

    def slice_shape(self) -> tuple[int, ...]:
        """Shape of one channel's entries, ``shape`` with ``block`` along ``axis``."""
        return self.shape[: self.axis] + (self.block,) + self.shape[self.axis + 1:]

    def resized(self, delta: int) -> "ParamSlice":
        """This slice after the group gained ``delta`` channels."""
        shape = list(self.shape)
        shape[self.axis] += delta * self.block
        return ParamSlice(
            self.param, self.module, self.role, tuple(shape), self.axis, self.offset, self.block, self.part
        )


@dataclass(frozen=True)
class WidthLiteral:
    """A size written as a literal in a reshape (``x.view(-1, 4608)``) that counts the group's channels.

    After the group changes by ``delta`` channels the literal must read
    ``value + delta * per_channel``.
    """

    node: str
    path: tuple[int, ...]
    value: int
    per_channel: int


@dataclass(frozen=True)
class ChannelGroup:
    """A set of coupled channels and every parameter entry they own.

    Attributes:
        name: the qualified name of the group's first producer.
        size: number of channels.
        producers: layers whose inbound weights make the channels.
        consumers: layers whose inbound weights read the channels (their
            columns are the channels' outbound weights).
        through: per-channel layers and operations between them (batch
            norm, pooling, dropout, depthwise conv) by module or node name.
        slices: every parameter entry the channels own, producers first,
            then per-channel layers, then consumers, each in graph order.
            The outbound slices fix the order of lambda's entries.
        literals: reshape sizes written as literals that count channels.
        reasons: why no channel of the group is a legal site; empty when
            every channel is one.
        nodes: the IR nodes whose outputs carry the channels.
        unmeasured: why A-statistics are not measured for the group's
            sites, though rewrites are exact (a layer called as a function,
            or one whose weight is computed in forward); empty when they are.
    """

    name: str
    size: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    through: tuple[str, ...]
    slices: tuple[ParamSlice, ...]
    literals: tuple[WidthLiteral, ...] = ()
    reasons: tuple[str, ...] = ()
    nodes: tuple[str, ...] = field(default=(), repr=False)
    unmeasured: tuple[str, ...] = ()

    @property
    def legal(self) -> bool:
        return not self.reasons

    @property
    def self_consumers(self) -> tuple[str, ...]:
        """Layers that both produce and read the group's channels (an inverted residual's projection).

        Rewrites are exact for them; the paper's A is not defined there,
        since cloning a channel adds an inbound weight to the channel itself.
        """
        return tuple(name for name in self.producers if name in self.consumers)

    @property
    def inbound_size(self) -> int:
        """K: inbound weights (biases included) of one channel across its producers."""
        return sum(s.channel_numel for s in self.slices if s.role == "inbound")

    @property
    def outbound_size(self) -> int:
        """L: outbound weights of one channel across all consumers; the length of a vector lambda."""
        return sum(s.channel_numel for s in self.slices if s.role == "outbound")

    def resized(self, delta: int) -> "ChannelGroup":
        """The same group after it gained ``delta`` channels (negative: lost)."""
        return ChannelGroup(
            self.name,
            self.size + delta,
            self.producers,
            self.consumers,
            self.through,
            tuple(s.resized(delta) for s in self.slices),
            tuple(
                WidthLiteral(lit.node, lit.path, lit.value + delta * lit.per_channel, lit.per_channel)
                for lit in self.literals
            ),
            self.reasons,
            self.nodes,
            self.unmeasured,
        )


def check_through(through: Iterable[str]) -> tuple[str, ...]:
    """Validate a ``through=`` argument and return it as a sorted tuple."""
    if isinstance(through, str):
        through = (through,)
    chosen = tuple(sorted(set(through)))
    unknown = [name for name in chosen if name not in THROUGH_OPTIONS]
    if unknown:
        raise ValueError(
            f"unknown through= option(s) {unknown}; choose any of {list(THROUGH_OPTIONS)}"
        )
    return chosen


def channel_groups(graph: Graph, through: Iterable[str] = ()) -> list[ChannelGroup]:
    """Every channel group of ``graph`` whose channels come from parametric layers, in graph order.

    Spaces that only exist through a concat or a flatten are not groups of
    their own: they are reached from the groups that feed them. When no
    group reaches such a space (its inputs' channels are blocked before it,
    as a ViT's patch embedding is by a transpose) but layers produce into it
    (the residual stream's projections), it is still reported, as a blocked
    group named by its first producer: nothing is dropped silently.
    """
    chosen = check_through(through)
    classes = _channel_classes(graph)
    param_users = graph.param_users()
    members_of = classes.members()
    walked: dict[str, ChannelGroup] = {}
    derived: dict[str, list[Node]] = {}
    reached: set[str] = set()
    for root, members in members_of.items():
        nodes = [graph[name] for name in members]
        producers = [node for node in nodes if node.kind == OpKind.PARAMETRIC]
        if not producers:
            continue
        if any(node.op in ("concat", "flatten") for node in nodes):
            derived[root] = producers
            continue
        walker = _GroupWalker(graph, classes, members_of, chosen, param_users)
        walked[root] = walker.run(producers)
        reached |= walker.visited
    for root, producers in derived.items():
        if root in reached:
            continue
        entry = next(graph[name] for name in members_of[root] if graph[name].op in ("concat", "flatten"))
        walker = _GroupWalker(graph, classes, members_of, chosen, param_users)
        walked[root] = walker.run(producers, unreached=entry)
    groups = []
    for root in members_of:
        group = walked.get(root)
        if group is None:
            continue
        if group.name in graph.refused:  # a trial rewrite after the capture failed (Graph.refused)
            group = replace(group, reasons=group.reasons + (graph.refused[group.name],))
        groups.append(group)
    return groups


class _UnionFind:
    def __init__(self, names: Iterable[str]) -> None:
        self.parent = {name: name for name in names}
        self.rank = {name: index for index, name in enumerate(self.parent)}

    def find(self, name: str) -> str:
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            # keep the earliest node as the root, so classes list in graph order
            if self.rank[root_a] > self.rank[root_b]:
                root_a, root_b = root_b, root_a
            self.parent[root_b] = root_a

    def members(self) -> dict[str, list[str]]:
        """Root -> the class's names, in insertion (topological) order."""
        classes: dict[str, list[str]] = {}
        for name in self.parent:
            classes.setdefault(self.find(name), []).append(name)
        return classes


def _data_inputs(graph: Graph, node: Node) -> list[str]:
    return [name for name in node.inputs if graph[name].kind != OpKind.METADATA]


def _channel_classes(graph: Graph) -> _UnionFind:
    """Union tensors that share one channel index space (channel-wise and element-wise ops)."""
    classes = _UnionFind(node.name for node in graph)
    for node in graph:
        data = _data_inputs(graph, node)
        if node.kind == OpKind.CHANNELWISE and data:
            classes.union(node.name, data[0])
        elif node.kind == OpKind.COUPLING and node.op in _ELEMENTWISE:
            for name in data:
                classes.union(node.name, name)
    return classes


class _GroupWalker:
    """Collects one group's slices and reasons, starting from its producers."""

    def __init__(
        self,
        graph: Graph,
        classes: _UnionFind,
        members_of: dict[str, list[str]],
        through: tuple[str, ...],
        param_users: dict[str, list[str]],
    ) -> None:
        self.graph = graph
        self.classes = classes
        self.members_of = members_of
        self.through = through
        self.param_users = param_users
        self.slices: list[tuple[int, int, ParamSlice]] = []
        self.reasons: list[str] = []
        self.unmeasured: list[str] = []
        self.producers: list[str] = []
        self.passed: list[tuple[int, str]] = []
        self.literals: list[WidthLiteral] = []
        self.nodes: list[str] = []
        self.axes: dict[str, int] = {}
        self.visited: set[str] = set()

    def _reason(self, text: str) -> None:
        if text not in self.reasons:
            self.reasons.append(text)

    def run(self, producers: list[Node], unreached: Node | None = None) -> ChannelGroup:
        """Walk the class of ``producers`` and the spaces its channels reach.

        ``unreached``: the concat or flatten that makes the class's channels
        when no group's walk reaches it; the walk enters there (its channel
        axis aligned from the right with the first producer's) and the group
        is blocked.
        """
        first = producers[0]
        axis = first.channel_axis if first.channel_axis is not None else -1
        size = first.shape[axis] if first.shape is not None else 0
        entry, entry_axis = None, axis
        if unreached is not None:
            self._reason(
                f"coupled to the output of {unreached.op} at node '{unreached.name}', whose inputs' "
                "channels tunnelgraph does not follow to it, so the channels it makes cannot be cloned"
            )
            entry, entry_axis = unreached, -1
            if first.shape is not None and unreached.shape is not None:
                entry_axis = len(unreached.shape) - (len(first.shape) - axis % len(first.shape))
        queue: list[tuple[str, ChannelMap, Node | None, int]] = [
            (self.classes.find(first.name), IDENTITY, entry, entry_axis)
        ]
        while queue:
            root, channel_map, entry, entry_axis = queue.pop(0)
            if root in self.visited:
                self._reason(
                    f"channels reach {entry.describe() if entry else root} along two paths"
                )
                continue
            self.visited.add(root)
            for node in (self.graph[name] for name in self.members_of[root]):
                queue.extend(self._member(node, channel_map, entry, entry_axis))

        if not self.producers:
            self._reason("no parametric layer produces these channels")
        self._check_tied()
        slices = [s for _, _, s in sorted(self.slices, key=lambda item: item[:2])]
        seen = set()
        for s in slices:
            if (s.param, s.axis) in seen:
                self._reason(f"channels reach parameter '{s.param}' twice")
            seen.add((s.param, s.axis))
        def in_graph_order(role: Role) -> tuple[str, ...]:
            return tuple(dict.fromkeys(s.module for s in slices if s.role == role))

        return ChannelGroup(
            name=first.module or first.name,
            size=size,
            producers=in_graph_order("inbound"),
            consumers=in_graph_order("outbound"),
            through=tuple(name for _, name in sorted(self.passed)),
            slices=tuple(slices),
            literals=tuple(self.literals),
            reasons=tuple(self.reasons),
            nodes=tuple(self.nodes),
            unmeasured=tuple(dict.fromkeys(self.unmeasured)),
        )

    # -- members of a class --------------------------------------------------
    def _member(
        self, node: Node, channel_map: ChannelMap, entry: Node | None, entry_axis: int
    ) -> list[tuple[str, ChannelMap, Node | None, int]]:
        axis = self._axis(node, entry, entry_axis)
        if axis is None:
            return []
        self.nodes.append(node.name)
        if node.kind == OpKind.PARAMETRIC:
            self._producer(node, channel_map)
        elif node.kind == OpKind.CHANNELWISE:
            self._channelwise(node, channel_map, axis)
        elif node.kind == OpKind.INPUT:
            self._reason(f"coupled to the model input '{node.name}', whose channels cannot be cloned")
        elif node.kind == OpKind.CONSTANT:
            self._reason(f"coupled to the stored tensor '{node.attrs.get('target', node.name)}'")
        elif node.kind == OpKind.BLOCKING:
            self._reason(
                f"coupled to the output of {node.attrs.get('detail', node.op)} at node '{node.name}'"
            )
        elif node is not entry and node.op in ("concat", "flatten"):
            self._reason(f"coupled to a second {node.op} at node '{node.name}'")
        return self._users(node, channel_map, axis)

    def _axis(self, node: Node, entry: Node | None, entry_axis: int) -> int | None:
        """The channel axis of ``node``'s output, from its producer or its class inputs."""
        if node is entry or node.kind == OpKind.PARAMETRIC:
            axis = entry_axis if node is entry else node.channel_axis
        else:
            data = [name for name in _data_inputs(self.graph, node) if name in self.axes]
            if not data or node.shape is None:
                if node.kind in (OpKind.INPUT, OpKind.CONSTANT, OpKind.BLOCKING):
                    return self._store(node, -1)
                return None
            source = self.graph[data[0]]
            axis = self.axes[source.name]
            if node.kind == OpKind.CHANNELWISE and "reduces" in node.attrs:
                if axis in node.attrs["reduces"]:
                    self._reason(f"{node.describe()} at node '{node.name}' reduces over the channel axis")
                elif not node.attrs["keepdim"]:
                    axis -= sum(1 for dim in node.attrs["reduces"] if dim < axis)
            elif node.kind == OpKind.CHANNELWISE and "axis_map" in node.attrs and axis >= 0:
                axis = self._moved(node, axis)
            elif node.kind == OpKind.CHANNELWISE and "constant_shapes" in node.attrs and axis >= 0:
                axis = self._broadcast(node, source, axis)
            elif node.kind == OpKind.COUPLING:
                # an input, stored tensor or blocking output in the class has its own reason already
                opaque = (OpKind.INPUT, OpKind.CONSTANT, OpKind.BLOCKING)
                data = [name for name in data if self.graph[name].kind not in opaque] or data
                if any(
                    self.graph[name].shape is None or not -len(self.graph[name].shape) <= self.axes[name]
                    < len(self.graph[name].shape) for name in data
                ):
                    self._reason(f"{node.op} at node '{node.name}' combines tensors of unknown shape")
                    return self._store(node, axis)
                from_right = [
                    len(self.graph[name].shape or ()) - self.axes[name] for name in data
                ]
                axis = len(node.shape) - from_right[0]
                sizes = {
                    (self.graph[name].shape or ())[self.axes[name]] for name in data
                } | {node.shape[axis]}
                if len(set(from_right)) > 1 or len(sizes) > 1:
                    self._reason(
                        f"{node.op} at node '{node.name}' broadcasts along the channel axis"
                    )
        return self._store(node, axis)

    def _moved(self, node: Node, axis: int) -> int:
        """Where a transpose or gather puts the channel axis (``attrs["axis_map"]``); a gathered channel axis blocks."""
        axis_map = node.attrs["axis_map"]
        moved = axis_map[axis] if axis < len(axis_map) else None
        if moved is None:
            self._reason(f"{node.describe()} at node '{node.name}' gathers along the channel axis {axis}")
            return axis
        return int(moved)

    def _broadcast(self, node: Node, source: Node, axis: int) -> int:
        """The channel axis after a per-channel operation with stored operands (``attrs["constant_shapes"]``).

        Shapes align from the right, as broadcasting does; a stored operand
        that varies along the channel axis would treat channels differently,
        so a clone would not be exact there: it blocks.
        """
        if source.shape is None or node.shape is None:
            self._reason(f"{node.describe()} at node '{node.name}' broadcasts tensors of unknown shape")
            return axis
        axis = len(node.shape) - (len(source.shape) - axis)
        for shape in node.attrs["constant_shapes"]:
            position = axis - (len(node.shape) - len(shape))
            if position >= 0 and shape[position] != 1:
                self._reason(
                    f"{node.describe()} at node '{node.name}' applies a stored tensor of shape {tuple(shape)} "
                    f"that varies along the channel axis {axis}"
                )
        return axis

    def _store(self, node: Node, axis: int | None) -> int:
        axis = -1 if axis is None else axis
        self.axes[node.name] = axis
        return axis

    def _producer(self, node: Node, channel_map: ChannelMap) -> None:
        module = node.module or node.name
        self.producers.append(module)
        self._functional(node, module)
        if node.attrs.get("groups", 1) != 1:
            self._reason(
                f"grouped convolution '{module}' (groups={node.attrs['groups']}) produces these "
                "channels: cloning one would break its group structure"
            )
        self._add_slices(node, "inbound", node.attrs.get("weight_axes", (0, 1))[0], channel_map)

    def _channelwise(self, node: Node, channel_map: ChannelMap, axis: int) -> None:
        if node.op in _LABELS:
            where = node.module or node.name
            self.passed.append((self.graph.index(node.name), where))
            if node.op not in self.through:
                self._reason(
                    f"feeds {_LABELS[node.op]} '{where}' (pass {through_hint([node.op])} to clone "
                    "through it)"
                )
        first_padded = node.attrs.get("first_padded")
        if first_padded is not None and not 0 <= axis < first_padded:
            self._reason(f"pad at node '{node.name}' pads the channel axis {axis}")
        required = node.attrs.get("requires_axis")
        if required is not None and axis != required:
            self._reason(
                f"{node.describe()} acts on axis {required}, but the channels are on axis {axis}"
            )
        if node.params:
            self._add_slices(node, "channelwise", 0, channel_map)

    def _users(
        self, node: Node, channel_map: ChannelMap, axis: int
    ) -> list[tuple[str, ChannelMap, Node | None, int]]:
        queue: list[tuple[str, ChannelMap, Node | None, int]] = []
        own = self.classes.find(node.name)
        for user in self.graph.users(node.name):
            if user.kind == OpKind.PARAMETRIC:
                # a layer whose output is coupled back into these channels (the projection of an
                # inverted residual block) is in the class, and still reads them: a consumer too
                self._consumer(node, user, channel_map, axis)
            elif self.classes.find(user.name) == own:
                continue
            elif user.kind == OpKind.COUPLING and user.op == "concat":
                if user.attrs["dim"] != axis:
                    self._reason(f"concat at node '{user.name}' joins along axis "
                                 f"{user.attrs['dim']}, not the channel axis {axis}")
                    continue
                for concat_map in self.graph.maps(node.name, user.name):
                    queue.append((self.classes.find(user.name), channel_map.then(concat_map), user, axis))
            elif user.kind == OpKind.RESHAPE:
                queue.extend(self._flatten(node, user, channel_map, axis))
            elif user.kind == OpKind.OUTPUT:
                self._reason("reaches the network output (units of the output layer are not sites)")
            elif user.kind == OpKind.BLOCKING:
                where = f" '{user.module}'" if user.module else ""
                self._reason(
                    f"feeds {user.attrs.get('detail', user.op)}{where} at node '{user.name}', "
                    "which tunnelgraph does not pass"
                )
            elif user.kind != OpKind.METADATA:
                self._reason(f"feeds {user.describe()} at node '{user.name}' in an unsupported way")
        return queue

    def _consumer(self, node: Node, user: Node, channel_map: ChannelMap, axis: int) -> None:
        module = user.module or user.name
        data = _data_inputs(self.graph, user)
        if not data or data[0] != node.name:
            self._reason(f"used as a weight of {user.describe()}")
            return
        rank = len(node.shape or ())
        in_axis = user.attrs["in_axis"] % rank if rank else -1
        # an input, stored tensor or blocking output has no known channel axis (-1), and the group
        # is blocked by its coupling to it already: a mismatch there would only mislead
        opaque = node.kind in (OpKind.INPUT, OpKind.CONSTANT, OpKind.BLOCKING) and axis == -1
        if in_axis != axis and not opaque:
            self._reason(f"{user.describe()} reads axis {in_axis}, not the channel axis {axis}")
            return
        if user.attrs.get("groups", 1) != 1:
            self._reason(
                f"grouped convolution '{module}' (groups={user.attrs['groups']}) consumes these "
                "channels: cloning one would break its group structure"
            )
        if user.attrs.get("computed_weight"):
            self._reason(
                f"feeds '{module}', whose weight is computed in forward ({user.attrs['computed_weight']}) "
                "from all its input columns at once, as in weight standardisation: splitting a column "
                "would change the computed weight"
            )
        self._functional(user, module)
        self._add_slices(user, "outbound", user.attrs.get("weight_axes", (0, 1))[1], channel_map, roles=("weight",))

    def _functional(self, node: Node, module: str) -> None:
        """Note why A is not measured where a layer is called as a function (rewrites stay exact)."""
        if node.attrs.get("computed_weight"):
            self.unmeasured.append(
                f"'{module}' computes its weight in forward ({node.attrs['computed_weight']})"
            )
        elif node.attrs.get("functional"):
            self.unmeasured.append(
                f"'{module}' is called as the function {node.attrs['functional']}; A-statistics "
                "follow layers called as modules"
            )

    def _flatten(
        self, node: Node, user: Node, channel_map: ChannelMap, axis: int
    ) -> list[tuple[str, ChannelMap, Node | None, int]]:
        start, end = user.attrs["start"], user.attrs["end"]
        if axis < start:
            new_axis, new_map = axis, channel_map
        elif axis > end:
            new_axis, new_map = axis - (end - start), channel_map
        elif axis == start:
            (flatten_map,) = self.graph.maps(node.name, user.name)
            new_axis, new_map = start, channel_map.then(flatten_map)
        else:
            self._reason(
                f"flatten at node '{user.name}' interleaves the channels (channel axis {axis} "
                f"is not the first of the merged axes {start}..{end})"
            )
            return []
        literal = user.attrs.get("literal_widths", {}).get(new_axis)
        if literal is not None and user.attrs.get("frozen_literals"):
            self._reason(
                f"reshape at node '{user.name}' has the width {literal[1]} as a number in a torch.export "
                "capture, which a rewrite cannot carry into the model's forward; trace with fx "
                "(frontend='fx') or write the reshape as x.flatten(1)"
            )
        elif literal is not None:
            path, value = literal
            self.literals.append(WidthLiteral(user.name, tuple(path), value, new_map.block))
        return [(self.classes.find(user.name), new_map, user, new_axis)]

    def _add_slices(
        self,
        node: Node,
        role: Role,
        axis: int,
        channel_map: ChannelMap,
        roles: tuple[str, ...] | None = None,
    ) -> None:
        for index, (param_role, ref) in enumerate(node.params.items()):
            if roles is not None and param_role not in roles:
                continue
            if ref.shared or len(self.param_users.get(ref.name, ())) > 1:
                self._reason(f"parameter '{ref.name}' is shared (tied weights or a layer called twice)")
            rank_order = {"inbound": 0, "channelwise": 1, "outbound": 2}[role]
            item = ParamSlice(
                ref.name, node.module or node.name, role, ref.shape, axis if len(ref.shape) > 1 else 0,
                channel_map.offset, channel_map.block, param_role,
            )
            self.slices.append((rank_order, self.graph.index(node.name) * 16 + index, item))

    def _check_tied(self) -> None:
        """Parameters that appear in more than one role of this group.

        A layer that reads the group's channels and writes them too (inbound
        rows and outbound columns of one weight, on different axes) is
        exact: the rewrite edits its columns, then its rows. Any other mix
        (a per-channel layer's parameter read as a weight) is blocked.
        """
        roles: dict[str, set[str]] = {}
        for _, _, s in self.slices:
            roles.setdefault(s.param, set()).add(s.role)
        for param, seen in roles.items():
            if len(seen) > 1 and seen != {"inbound", "outbound"}:
                self._reason(f"parameter '{param}' is both {' and '.join(sorted(seen))}")

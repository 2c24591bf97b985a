"""One channel group as a re-executable piece of the network.

A group's channels leave their *producers* (linear or conv layers), pass
per-channel operations, residual adds, concats and flattens (the group's
*chain*), and enter their *consumers*. For a site of the group, docs/MATH.md
sections 4 and 7 define column ``l`` of A as the inbound-weight gradient carried by the
error that flows back through outbound entry ``l`` alone, pushed back through
the chain. Everything here is linear algebra around one object: the chain,
as a function from the producers' outputs to the consumers' inputs,
re-executed on values captured from a real forward pass (so that
``torch.func`` can linearise it), with every path that leaves the group
through a consumer cut off.

- Rows (inbound entries) enter the chain as tangents at the producers'
  outputs: the input patch of each inbound weight, one per row, the same
  for every channel (:meth:`GroupChain.row_tangents`).
- Columns (outbound entries) are read off at the consumers: the weight
  gradient of a consumer whose input is a tangent, times the outbound
  weight (:meth:`GroupChain.contract`).

Rows, columns and channels are all batched: one forward-mode pass of the
chain serves every channel of the group at once, because the chain never
mixes channels.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import operator
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad

from tunnelgraph.analysis.groups import ChannelGroup, ParamSlice
from tunnelgraph.errors import StatisticsError
from tunnelgraph.ir import Graph, OpKind
from tunnelgraph.statistics.capture import Tap, fetch

with warnings.catch_warnings():
    # torch.func.jvp imports this lazily, and it scripts functions with the deprecated
    # torch.jit.script (a DeprecationWarning, a FutureWarning from torch 2.14); import it
    # once here so users do not see torch's internal warning
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401

logger = logging.getLogger(__name__)

_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_IN_PLACE_FUNCTIONS = {
    operator.iadd: operator.add, operator.isub: operator.sub,
    operator.imul: operator.mul, operator.itruediv: operator.truediv,
}
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_ELEMENTWISE = frozenset({"activation", "batchnorm", "dropout", "identity", "scale", "add", "sub", "mul", "div"})
"""IR operations that map a chain's tensor entry by entry (at the tensor's own shape)."""


@dataclass(frozen=True)
class LayerSpec:
    """A producer or consumer: its fx node, module and the parameter entries of the group it holds."""

    node: str
    name: str
    module: nn.Module
    slices: tuple[ParamSlice, ...]
    offset: int  # first row (producer) or column (consumer) of this layer in A

    @property
    def size(self) -> int:
        """Rows (producer) or columns (consumer) this layer contributes to A."""
        return sum(s.channel_numel for s in self.slices)

    @property
    def conv_dims(self) -> int:
        """Spatial dimensions of a conv layer, 0 for a linear layer."""
        return next((dims for kind, dims in _CONV_DIMS.items() if isinstance(self.module, kind)), 0)

    @property
    def weight_slice(self) -> ParamSlice:
        return next(s for s in self.slices if s.part == "weight")


def _layer_kind_error(name: str, module: nn.Module, role: str) -> StatisticsError:
    return StatisticsError(
        f"A-statistics support linear and conv (groups=1) {role}s; '{name}' is "
        f"{type(module).__name__}. Exclude its group's sites from the statistics."
    )


class GroupChain:
    """A channel group of a traced model, ready to be linearised on captured values.

    Attributes:
        group: the group.
        producers: the layers whose inbound weights make the channels, in the
            order of A's rows.
        consumers: the layers that read the channels, in the order of A's
            columns (lambda's order).
        nodes: the chain's fx nodes in execution order (per-channel
            operations, adds, concats, flattens and the size queries they
            use), producers excluded.
        externals: fx nodes outside the group whose values the chain reads
            (the other inputs of a concat, say); captured on every pass.
        consumer_inputs: for each consumer, the node whose value it reads.
        selection: the max pool node of a chain that is element-wise on
            either side of it (:meth:`selection_factors`), or None.
    """

    def __init__(self, model: nn.Module, graph: Graph, group: ChannelGroup) -> None:
        if not group.legal:
            raise StatisticsError(f"group '{group.name}' has no sites: {'; '.join(group.reasons)}")
        if group.unmeasured:
            raise StatisticsError(
                f"A-statistics are not measured for group '{group.name}': {'; '.join(group.unmeasured)}. "
                "Its sites can still be rewritten with a lambda of your choice (tg.rewrite); leave them "
                "out of the statistics (tg.open_tunnels does so by itself)."
            )
        source = graph.source
        if not isinstance(source, torch.fx.GraphModule):
            raise StatisticsError("A-statistics need a graph traced from a PyTorch model (tg.trace)")
        self.group = group
        self.model = model
        self.fx_nodes = {node.name: node for node in source.graph.nodes}
        self.source = source
        members = set(group.nodes)

        self.producers = self._layers(graph, group, "inbound", lambda node: node.name in members)
        self.consumers = self._layers(
            graph, group, "outbound", lambda node: any(name in members for name in node.inputs)
        )
        for spec in self.producers:
            if not isinstance(spec.module, (nn.Linear, *_CONV_DIMS)):
                raise _layer_kind_error(spec.name, spec.module, "producer")
        for spec in self.consumers:
            if not isinstance(spec.module, (nn.Linear, *_CONV_DIMS)) or getattr(spec.module, "groups", 1) != 1:
                raise _layer_kind_error(spec.name, spec.module, "consumer")
        producer_nodes = {spec.node for spec in self.producers}

        chain = [name for name in group.nodes if name not in producer_nodes]
        local = set(chain) | producer_nodes
        for node in graph:
            # size queries on the group's tensors (x.size(0) in a view) run with the chain
            if node.kind == OpKind.METADATA and any(name in local for name in node.inputs):
                chain.append(node.name)
                local.add(node.name)
        order = {name: index for index, name in enumerate(self.fx_nodes)}
        self.nodes = tuple(sorted(chain, key=order.__getitem__))
        externals: dict[str, None] = {}
        for name in self.nodes:
            for arg in self.fx_nodes[name].all_input_nodes:
                if arg.name not in local:
                    externals[arg.name] = None
        self.externals = tuple(externals)
        self.consumer_inputs = tuple(
            next(arg.name for arg in self.fx_nodes[spec.node].all_input_nodes if arg.name in local)
            for spec in self.consumers
        )
        self.inbound_size = group.inbound_size
        self.outbound_size = group.outbound_size
        self._callables = {name: self._callable(self.fx_nodes[name]) for name in self.nodes}
        self.reach = self._reach(graph)
        self.diagonal, self.reduced = self._pairs(graph)
        self.selection = self._selection(graph)

    # -- construction ----------------------------------------------------------------
    def tap(self) -> Tap:
        """What a :class:`~tunnelgraph.statistics.capture.Recorder` records for this group."""
        return Tap(
            producers=tuple((spec.node, spec.module, len(spec.slices) > 1) for spec in self.producers),
            consumers=tuple((spec.node, spec.module) for spec in self.consumers),
            externals=self.externals,
        )

    def _layers(
        self, graph: Graph, group: ChannelGroup, role: str, belongs: Callable[[Any], bool]
    ) -> tuple[LayerSpec, ...]:
        specs = []
        offset = 0
        for name in dict.fromkeys(s.module for s in group.slices if s.role == role):
            slices = tuple(s for s in group.slices if s.role == role and s.module == name)
            candidates = [node for node in graph if node.module == name and belongs(node)]
            if len(candidates) != 1:
                raise StatisticsError(f"layer '{name}' of group '{group.name}' is not called exactly once")
            spec = LayerSpec(candidates[0].name, name, self.model.get_submodule(name), slices, offset)
            specs.append(spec)
            offset += spec.size
        return tuple(specs)

    def _reach(self, graph: Graph) -> tuple[tuple[bool, ...], ...]:
        """reach[i][j]: the chain carries producer i's output to consumer j's input."""
        inside = set(self.nodes)
        table = []
        for producer in self.producers:
            seen = {producer.node}
            stack = [producer.node]
            while stack:
                for user in graph.users(stack.pop()):
                    if user.name in inside and user.name not in seen:
                        seen.add(user.name)
                        stack.append(user.name)
            table.append(tuple(name in seen for name in self.consumer_inputs))
        return tuple(table)

    def _pairs(self, graph: Graph) -> tuple[tuple[tuple[bool, ...], ...], tuple[tuple[bool, ...], ...]]:
        """(diagonal, reduced): how the chain maps producer ``i``'s output to consumer ``j``'s input, ``[i][j]``.

        *Diagonal*: every node on the way is element-wise on tensors of the
        producer's shape (activations, batch norm, dropout, scaling, adds)
        ending, at most, in one flatten. The pair's Jacobian is then a
        diagonal (up to the flatten's reordering), one pass with a vector of
        ones gives all of it, and A needs no per-row pass.

        *Reduced*: the same up to one pooling that leaves one entry per
        sample and channel (a global average pool, ``x.mean((2, 3))``), then
        element-wise maps and at most one flatten on those entries. Each
        consumer input entry ``(n, c)`` is then ``sum_p D[n, c, p] t[n, c,
        p]`` of the producer's output ``t``: one row per sample and
        channel, which the same pass with ones gives too, in the producer's
        layout.

        Only the nodes on some path from the producer to the consumer's
        input count: a producer whose output also flows elsewhere (to the
        head, say) is diagonal towards the consumers it reaches entry by
        entry.
        """
        inside = set(self.nodes)
        diagonal, reduced = [], []
        for i, producer in enumerate(self.producers):
            kinds = [self._pair_kind(graph, producer, end, inside) if self.reach[i][j] else None
                     for j, end in enumerate(self.consumer_inputs)]
            diagonal.append(tuple(kind == "diagonal" for kind in kinds))
            reduced.append(tuple(kind == "reduced" and self.consumers[j].weight_slice.block == 1
                                 for j, kind in enumerate(kinds)))
        return tuple(diagonal), tuple(reduced)

    @property
    def per_channel(self) -> bool:
        """Every pair the chain connects is :attr:`diagonal` or :attr:`reduced`: products run per channel."""
        return all(self.diagonal[i][j] or self.reduced[i][j] or not self.reach[i][j]
                   for i in range(len(self.producers)) for j in range(len(self.consumers)))

    def _between(self, graph: Graph, start: str, end: str, inside: set[str]) -> set[str]:
        """The chain's nodes on some path from ``start`` to ``end`` (``end`` included), size queries left out."""
        ahead, stack = set(), [start]
        while stack:
            for user in graph.users(stack.pop()):
                if user.name in inside and user.name not in ahead and user.kind != OpKind.METADATA:
                    ahead.add(user.name)
                    stack.append(user.name)
        behind, stack = {end}, [end]
        while stack:
            for name in graph[stack.pop()].inputs:
                if name in ahead and name not in behind:
                    behind.add(name)
                    stack.append(name)
        return ahead & behind

    def _pair_kind(self, graph: Graph, producer: LayerSpec, end: str, inside: set[str]) -> str | None:
        """``"diagonal"``, ``"reduced"`` or None (any other map) for the paths from ``producer`` to ``end``."""
        shape = graph[producer.node].shape
        if shape is None or (producer.conv_dims == 0 and len(shape) != 2):
            return None
        if end == producer.node:
            return "diagonal"
        on_path = self._between(graph, producer.node, end, inside)
        samples, channels = shape[0], shape[1] if producer.conv_dims else shape[-1]
        # a state: (node, the pool's output shape once past it, flattened)
        stack: list[tuple[str, tuple[int, ...] | None, bool]] = [(producer.node, None, False)]
        seen, arrivals = set(), set()
        while stack:
            name, pooled, flattened = stack.pop()
            for user in graph.users(name):
                state = (user.name, pooled, flattened)
                if user.name not in on_path or state in seen:
                    continue
                seen.add(state)
                if user.shape is None:
                    return None
                after = (pooled, flattened)
                if user.op == "flatten" and not flattened:
                    if user.shape[0] != samples or len(user.shape) != 2 or user.attrs.get("start") != 1:
                        return None
                    after = (pooled, True)
                elif user.op == "pooling" and pooled is None and not flattened and producer.conv_dims:
                    if user.shape[:2] != (samples, channels) or math.prod(user.shape[2:]) != 1:
                        return None
                    after = (tuple(user.shape), False)
                else:
                    if user.op not in _ELEMENTWISE:
                        return None
                    at = tuple(shape) if pooled is None else pooled
                    if tuple(user.shape) != ((samples, math.prod(at[1:])) if flattened else at):
                        return None
                if user.name == end:
                    arrivals.add(after[0] is not None)
                stack.append((user.name, *after))
        if arrivals == {False}:
            return "diagonal"
        return "reduced" if arrivals == {True} else None

    def _selection(self, graph: Graph) -> str | None:
        """The one max pool of a chain whose other operations are element-wise, or None.

        Such a chain maps each producer's output to each consumer's input by
        a diagonal, then the pool's selection (each output entry is one
        entry of its window, the largest), then a diagonal, plus diagonal
        paths that avoid the pool (:meth:`selection_factors`): per channel,
        like a diagonal chain, so its products can run on a few channels
        alone. None where the chain is per channel already
        (:attr:`per_channel`), or for any other chain: another pooling, a
        flatten, a linear layer, a pool that returns its indices itself.
        """
        if self.per_channel:
            return None
        if not all(spec.conv_dims for spec in (*self.producers, *self.consumers)):
            return None
        pools = [name for name in self.nodes if graph[name].op == "pooling"]
        if len(pools) != 1 or graph[pools[0]].attrs.get("function") != "max" or graph[pools[0]].shape is None:
            return None
        pool = pools[0]
        fx_node = self.fx_nodes[pool]
        module = self.source.get_submodule(str(fx_node.target)) if fx_node.op == "call_module" else None
        if not isinstance(module, _MAX_POOLS) or module.return_indices or len(fx_node.all_input_nodes) != 1:
            return None
        if len(graph[pool].shape) != self.producers[0].conv_dims + 2:
            return None
        inside = set(self.nodes)
        for producer in self.producers:
            if not self._walk_through_pool(graph, producer, pool, inside):
                return None
        return pool

    def _walk_through_pool(
        self, graph: Graph, producer: LayerSpec, pool: str, inside: set[str]
    ) -> bool:
        """Every path from ``producer`` is element-wise, at the producer's shape, then (past ``pool``) the pool's."""
        shapes = (graph[producer.node].shape, graph[pool].shape)
        if shapes[0] is None:
            return False
        stack = [(producer.node, False)]
        seen = set()
        while stack:
            name, pooled = stack.pop()
            for user in graph.users(name):
                if user.name not in inside or (user.name, pooled) in seen:
                    continue
                seen.add((user.name, pooled))
                if user.kind == OpKind.METADATA:
                    continue
                if user.name == pool:
                    if pooled:
                        return False
                    stack.append((user.name, True))
                    continue
                if user.op not in _ELEMENTWISE or user.shape is None or tuple(user.shape) != tuple(shapes[pooled]):
                    return False
                stack.append((user.name, pooled))
        return True

    def _callable(self, fx_node: torch.fx.Node) -> Callable[..., Any]:
        """How the chain runs one node: without in-place updates, side effects or hooks."""
        if fx_node.op == "call_module":
            module = self.source.get_submodule(str(fx_node.target))
            if isinstance(module, _BATCHNORM):
                return _batchnorm(module)
            if isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
                return _dropout(fx_node.name, lambda: module.training and module.p > 0)
            if getattr(module, "inplace", False):
                module = copy.copy(module)
                module.inplace = False
            return module.forward  # .forward: never fire hooks (ours or the user's)
        if fx_node.op == "call_function":
            target = fx_node.target
            if target in _DROPOUT_FUNCTIONS:
                return _dropout(fx_node.name, lambda: self.model.training)
            target = _IN_PLACE_FUNCTIONS.get(target, target)
            name = getattr(target, "__name__", "")
            if name.endswith("_") and not name.startswith("_"):
                owner = F if getattr(F, name, None) is target else torch
                target = getattr(owner, name[:-1], target)

            if target is F.batch_norm:
                return _functional_batchnorm

            def call(*args: Any, **kwargs: Any) -> Any:
                if kwargs.get("inplace"):
                    kwargs = {**kwargs, "inplace": False}
                return target(*args, **kwargs)

            return call
        if fx_node.op == "call_method":
            method = str(fx_node.target)
            if method.endswith("_") and not method.startswith("_"):
                method = method[:-1]
            return lambda self_, *args, **kwargs: getattr(self_, method)(*args, **kwargs)
        if fx_node.op == "get_attr":
            value = fetch(self.source, str(fx_node.target))
            return lambda: value
        raise StatisticsError(f"node '{fx_node.name}' ({fx_node.op}) cannot be re-executed")

    # -- the chain as a function -------------------------------------------------------
    def run(
        self,
        outputs: Sequence[torch.Tensor],
        externals: dict[str, Any],
        replace: dict[str, Callable[..., Any]] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The consumers' inputs, given the producers' outputs and the captured externals.

        ``replace`` runs some nodes (by name) with other callables.
        """
        env: dict[str, Any] = dict(externals)
        for spec, value in zip(self.producers, outputs):
            env[spec.node] = value
        for name in self.nodes:
            fx_node = self.fx_nodes[name]
            args = torch.fx.node.map_arg(fx_node.args, lambda arg: env[arg.name])
            kwargs = torch.fx.node.map_arg(fx_node.kwargs, lambda arg: env[arg.name])
            call = replace[name] if replace and name in replace else self._callables[name]
            env[name] = call(*args, **kwargs)
        return tuple(env[name] for name in self.consumer_inputs)

    def jvp_rows(
        self,
        outputs: Sequence[torch.Tensor],
        externals: dict[str, Any],
        producer: int,
        tangents: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Tangents at every consumer input, one per row of ``tangents`` (at producer ``producer``)."""

        def chain(value: torch.Tensor) -> tuple[torch.Tensor, ...]:
            values = list(outputs)
            values[producer] = value
            return self.run(values, externals)

        def one(tangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.func.jvp(chain, (outputs[producer],), (tangent,))[1]

        return torch.func.vmap(one)(tangents)

    def jvp(
        self, outputs: Sequence[torch.Tensor], externals: dict[str, Any], tangents: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """Tangents at the consumer inputs for one tangent per producer output."""
        return self._forward_mode(outputs, externals, dict(enumerate(tangents)))

    def _forward_mode(
        self, outputs: Sequence[torch.Tensor], externals: dict[str, Any], tangents: dict[int, torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """The chain's forward-mode derivative for tangents at some producers (the others held fixed).

        Dual tensors of ``torch.autograd.forward_ad``, the machinery under
        ``torch.func.jvp``, without the functional transform's overhead on
        every call (a chain runs in every product with A).
        """
        with forward_ad.dual_level():
            values = [
                forward_ad.make_dual(value, tangents[index]) if index in tangents else value
                for index, value in enumerate(outputs)
            ]
            results = self.run(values, externals)
            unpacked = [forward_ad.unpack_dual(result) for result in results]
            return tuple(
                part.tangent if part.tangent is not None else torch.zeros_like(part.primal) for part in unpacked
            )

    def vjp(
        self, outputs: Sequence[torch.Tensor], externals: dict[str, Any], cotangents: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """Errors at the producer outputs for errors at the consumer inputs, through the chain only."""
        leaves, results = self.recorded(outputs, externals)
        pairs = [(result, cotangent) for result, cotangent in zip(results, cotangents) if result.requires_grad]
        grads: Sequence[torch.Tensor | None] = [None] * len(leaves)
        if pairs:
            grads = torch.autograd.grad(
                [result for result, _ in pairs], leaves, [cotangent for _, cotangent in pairs], allow_unused=True
            )
        return tuple(grad if grad is not None else torch.zeros_like(value) for grad, value in zip(grads, outputs))

    def recorded(
        self, outputs: Sequence[torch.Tensor], externals: dict[str, Any]
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """(leaves, consumer inputs): the chain run with autograd recording from detached producer outputs."""
        with torch.enable_grad():
            leaves = [value.detach().requires_grad_() for value in outputs]
            return leaves, self.run(leaves, externals)

    def linearise(self, outputs: Sequence[torch.Tensor], externals: dict[str, Any]) -> LinearisedChain:
        """The chain's Jacobian at these values, for many products in both directions (see :class:`LinearisedChain`)."""
        return LinearisedChain(self, outputs, externals)

    # -- rows: inbound entries -------------------------------------------------------
    def row_tangents(
        self,
        producer: int,
        layer_input: torch.Tensor,
        output: torch.Tensor,
        rows: range,
        patches: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tangents at producer ``producer``'s output, one per inbound row in ``rows``.

        Row ``r`` perturbs inbound entry ``r`` of every channel by one; since
        the entry multiplies the same input in every channel, the tangent is
        that input (a patch of it, for a conv: ``patches`` from
        :func:`conv_patches` when already computed) broadcast over channels.
        Returns a tensor of shape ``(len(rows),) + output.shape`` (expanded,
        not copied, over channels).
        """
        spec = self.producers[producer]
        module = spec.module
        weight_rows = spec.weight_slice.channel_numel
        parts = []
        start, stop = rows.start, rows.stop
        if start < weight_rows:
            part = slice(start, min(stop, weight_rows))
            if spec.conv_dims:
                if patches is None:
                    patches = conv_patches(module, layer_input)
                picked = patches[:, part]  # (N, R, *spatial)
                parts.append(picked.movedim(1, 0).unsqueeze(2).expand(-1, *output.shape))
            else:
                features = layer_input[..., part]  # (..., R)
                parts.append(features.movedim(-1, 0).unsqueeze(-1).expand(-1, *output.shape))
        if stop > weight_rows:  # the bias row
            parts.append(torch.ones((1,) + tuple(output.shape), dtype=output.dtype, device=output.device))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def producer_tangent(
        self,
        producer: int,
        layer_input: torch.Tensor,
        rows: torch.Tensor,
        channels: torch.Tensor | None = None,
        *,
        restricted: bool = False,
    ) -> torch.Tensor:
        """The producer's output when its inbound weights are ``rows``: A^T's input side.

        ``rows`` is (channels x K_producer) for every channel of the group, or
        for ``channels`` only (indices; the layer runs on those channels
        alone). The output has every channel, the others zero, or with
        ``restricted`` only those channels along its channel axis, in the
        order of ``channels`` (see :meth:`restricted_shape`).
        """
        spec = self.producers[producer]
        module = spec.module
        weight_rows = spec.weight_slice.channel_numel
        weight = rows[:, :weight_rows].reshape(rows.shape[0], *module.weight.shape[1:])
        bias = rows[:, weight_rows] if rows.shape[1] > weight_rows else None
        if spec.conv_dims:
            conv = (F.conv1d, F.conv2d, F.conv3d)[spec.conv_dims - 1]
            ready, padding = _conv_input(module, layer_input)
            output = conv(ready, weight, bias, module.stride, padding, module.dilation)
            axis = 1
        else:
            output = F.linear(layer_input, weight, bias)
            axis = output.dim() - 1
        if restricted or channels is None or channels.numel() == module.weight.shape[0]:
            return output
        shape = list(output.shape)
        shape[axis] = module.weight.shape[0]
        return output.new_zeros(shape).index_copy_(axis, channels, output)

    def producer_gradient(
        self,
        producer: int,
        layer_input: torch.Tensor,
        error: torch.Tensor,
        channels: torch.Tensor | None = None,
        *,
        restricted: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Inbound-weight gradients (channels x K_producer) for an error at the producer's output.

        For every channel of the group, or for ``channels`` only (indices),
        computing those alone; with ``restricted`` the error holds those
        channels only already (:meth:`restricted_shape`). Written into
        ``out`` when given.
        """
        spec = self.producers[producer]
        module = spec.module
        if not restricted and channels is not None and channels.numel() < module.weight.shape[0]:
            error = error.index_select(1 if spec.conv_dims else error.dim() - 1, channels)
        if spec.conv_dims:
            shape = (error.shape[1], *module.weight.shape[1:])
            grad_weight = _conv_weight_grad(spec.conv_dims, module, layer_input, shape, error)
            reduce = [0] + list(range(2, error.dim()))
        else:
            grad_weight = error.reshape(-1, error.shape[-1]).T @ layer_input.reshape(-1, layer_input.shape[-1])
            reduce = list(range(error.dim() - 1))
        parts = [grad_weight.reshape(grad_weight.shape[0], -1)]
        if len(spec.slices) > 1:
            parts.append(error.sum(reduce).unsqueeze(1))
        if out is None:
            return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return torch.cat(parts, dim=1, out=out)

    # -- columns: outbound entries ---------------------------------------------------
    def contract(
        self, consumer: int, tangent: torch.Tensor, error: torch.Tensor, channels: torch.Tensor,
        *, restricted: bool = False, out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A's entries at one consumer's columns for a batch of row tangents.

        Args:
            tangent: (R, *input shape) tangents at the consumer's input, or
                with ``restricted`` at its positions of ``channels`` only
                (:meth:`restricted_shape`).
            error: the loss gradient at the consumer's output (pre-activation).
            channels: the group channels wanted (S of them).

        Returns:
            (S, R, columns of this consumer): the consumer's weight gradient
            for each tangent as input, times the outbound weight, in lambda's
            order (row-major over the weight's per-channel slice); ``out``
            when given (any strides), written by one product of the gradient
            and the weight.
        """
        spec = self.consumers[consumer]
        module = spec.module
        weight_slice = spec.weight_slice
        weight = self.consumer_weight(consumer, channels)  # (V, S*B, *k)
        rows = tangent.shape[0]
        count = channels.numel()
        if spec.conv_dims:
            # (R, N, S*B, *spatial)
            picked = tangent if restricted else _pick(tangent, 2, weight_slice, channels)
            inputs = picked.transpose(0, 1).reshape(picked.shape[1], -1, *picked.shape[3:])
            grad = _conv_weight_grad(
                spec.conv_dims, module, inputs, (weight.shape[0], inputs.shape[1], *weight.shape[2:]), error
            )  # (V, R*S*B, *k)
            outputs, block, kernel = weight.shape[0], weight_slice.block, tuple(weight.shape[2:])
            # (V, R, S, B, *k) -> (S, R, V, B, *k): lambda's order, multiplied and laid out in one pass
            grad = grad.reshape(outputs, rows, count, block, *kernel).permute(2, 1, 0, 3, *range(4, 4 + len(kernel)))
            scale = weight.reshape(outputs, 1, count, block, *kernel).permute(2, 1, 0, 3, *range(4, 4 + len(kernel)))
        else:
            picked = tangent if restricted else _pick(tangent, tangent.dim() - 1, weight_slice, channels)
            picked = picked.reshape(rows, -1, picked.shape[-1])  # (R, M, S*B)
            grad = torch.matmul(picked.transpose(1, 2), error.reshape(-1, error.shape[-1]))  # (R, S*B, V)
            outputs, block = weight.shape[0], weight_slice.block
            # (R, S, B, V) -> (S, R, V, B)
            grad = grad.reshape(rows, count, block, outputs).permute(1, 0, 3, 2)
            scale = weight.T.reshape(1, count, block, outputs).permute(1, 0, 3, 2)
        if out is None:
            out = grad.new_empty(count, rows, grad[0, 0].numel())
        torch.mul(grad, scale, out=out.view(grad.shape))
        return out

    def consumer_error(
        self,
        consumer: int,
        vectors: torch.Tensor,
        input_shape: Sequence[int],
        error: torch.Tensor,
        channels: torch.Tensor | None = None,
        *,
        restricted: bool = False,
    ) -> torch.Tensor:
        """Error at the consumer's input when each channel's outbound weights are scaled by its vector.

        ``vectors`` is (channels, columns of this consumer), for every channel
        of the group or for ``channels`` only (indices): A's column side of a
        product A v. The layer runs on those channels' input columns alone;
        the error at every other input channel is zero, and left out with
        ``restricted`` (:meth:`restricted_shape`).
        """
        spec = self.consumers[consumer]
        module = spec.module
        weight_slice = spec.weight_slice
        if channels is None:
            channels = torch.arange(self.group.size, device=vectors.device)
        weight = module.weight.detach()
        picked = self.consumer_weight(consumer, channels)  # (V, S*B, *k)
        count, outputs, block = channels.numel(), weight.shape[0], weight_slice.block
        # the weights scaled entry by entry, written once in the layout the layer reads
        scaled = weight.new_empty(picked.shape)
        torch.mul(vectors.reshape(count, outputs, block, *weight.shape[2:]).movedim(0, 1),
                  picked.view(outputs, count, block, *weight.shape[2:]),
                  out=scaled.view(outputs, count, block, *weight.shape[2:]))
        axis = 1 if spec.conv_dims else len(input_shape) - 1
        shape = list(input_shape)
        shape[axis] = count * block
        if spec.conv_dims:
            if _native_padding(module):
                part = _conv_input_grad(
                    spec.conv_dims, tuple(shape), scaled, error, module.stride, module.padding, module.dilation
                )
            else:
                primal = error.new_zeros(tuple(shape))
                padded = _prepad(module, primal)
                grad = _conv_input_grad(spec.conv_dims, padded.shape, scaled, error, module.stride, 0, module.dilation)
                with torch.enable_grad():
                    leaf = primal.requires_grad_()
                    (part,) = torch.autograd.grad(_prepad(module, leaf), leaf, grad)
        else:
            part = torch.matmul(error, scaled)
        if restricted or count * block == input_shape[axis]:  # the group is the whole input, in order
            return part
        positions = _positions(weight_slice, channels, vectors.device)
        return part.new_zeros(tuple(input_shape)).index_copy_(axis, positions, part)

    def consumer_columns(
        self, consumer: int, tangent: torch.Tensor, error: torch.Tensor, channels: torch.Tensor | None = None,
        *, restricted: bool = False, out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(channels, columns) of A^T u for one consumer: every channel of the group, or ``channels`` only.

        Written into ``out`` when given."""
        if channels is None:
            channels = torch.arange(self.group.size, device=tangent.device)
        into = None if out is None else out.unsqueeze(1)
        return self.contract(consumer, tangent.unsqueeze(0), error, channels, restricted=restricted, out=into)[:, 0]

    def consumer_weight(self, consumer: int, channels: torch.Tensor) -> torch.Tensor:
        """Consumer ``consumer``'s weight at the input columns of ``channels``: (V, S*B, *k).

        A view where the channels are contiguous; else a copy, kept for the
        next call with the same channels and the same weight (a solve asks
        for one set of channels product after product).
        """
        spec = self.consumers[consumer]
        weight = spec.module.weight.detach()
        if _consecutive(channels) is not None:
            return _pick(weight, 1, spec.weight_slice, channels)
        key = (host_channels(channels)[0], weight.data_ptr(), weight._version)
        held: dict[int, tuple[Any, torch.Tensor]] = self.__dict__.setdefault("_picked_weights", {})
        if consumer not in held or held[consumer][0] != key:  # one set of channels per consumer at a time
            held[consumer] = (key, _pick(weight, 1, spec.weight_slice, channels))
        return held[consumer][1]

    def drop_picked_weights(self) -> None:
        """Forget the weight columns :meth:`consumer_weight` kept (at the end of a solve)."""
        self.__dict__.pop("_picked_weights", None)

    def restricted_shape(self, shape: Sequence[int], role: str, index: int, count: int) -> tuple[int, ...]:
        """A producer's output (``role="producer"``) or a consumer's input shape cut to ``count`` channels.

        The *restricted* layout of the ``restricted=`` arguments: along the
        layer's channel axis (1 for a convolution, the last for a linear
        layer) only the positions of the channels asked for, channel-major
        (a consumer behind a flatten reads each channel as a block of
        features). Where the chain is diagonal it maps a producer's
        restricted values to a consumer's entry by entry, so that products
        for a few channels cost in proportion to them.
        """
        spec = (self.producers if role == "producer" else self.consumers)[index]
        axis = 1 if spec.conv_dims else len(shape) - 1
        block = 1 if role == "producer" else spec.weight_slice.block
        cut = list(shape)
        cut[axis] = count * block
        return tuple(cut)

    def restrict(self, value: torch.Tensor, consumer: int, channels: torch.Tensor) -> torch.Tensor:
        """A value at consumer ``consumer``'s input cut to the positions of ``channels``.

        A view where the channels are contiguous, else a copy.
        """
        spec = self.consumers[consumer]
        axis = 1 if spec.conv_dims else value.dim() - 1
        return _pick(value, axis, spec.weight_slice, channels)

    # -- the diagonal fast path ------------------------------------------------------
    def diagonal_scales(
        self, outputs: Sequence[torch.Tensor], externals: dict[str, Any]
    ) -> list[list[torch.Tensor | None]]:
        """The chain's Jacobian from each producer ``i`` to each consumer input ``j``, per entry: ``[i][j]``.

        Defined where the pair is :attr:`diagonal` (the diagonal, in the
        consumer input's shape) or :attr:`reduced` (each consumer input
        entry's row ``D``, in the producer output's shape), None elsewhere.
        Read in reverse mode: a map that is diagonal entry by entry is its
        own transpose, so ``J^T 1`` (one backward pass per consumer, with the
        chain run once) is the same diagonal as ``J 1``, in the producer's
        layout, which a flatten only reshapes; a reduced pair's ``J`` has one
        row per consumer input entry, each on entries of its own, and
        ``J^T 1`` lays those rows side by side. (PyTorch's forward-mode rules
        for products and affine maps are Python decompositions, many times
        slower.)
        """
        scales: list[list[torch.Tensor | None]] = [[None] * len(self.consumers) for _ in self.producers]
        wanted = [[i for i in range(len(self.producers)) if self.diagonal[i][j] or self.reduced[i][j]]
                  for j in range(len(self.consumers))]
        if not any(wanted):
            return scales
        leaves, results = self.recorded(outputs, externals)
        last = max(j for j, producers in enumerate(wanted) if producers)
        for j, result in enumerate(results):
            if not wanted[j]:
                continue
            found: Sequence[torch.Tensor | None] = [None] * len(wanted[j])
            if result.requires_grad:
                found = _ones_through(result, [leaves[i] for i in wanted[j]], retain_graph=j < last)
            for i, grad in zip(wanted[j], found):
                grad = grad if grad is not None else torch.zeros_like(outputs[i])
                scales[i][j] = grad if self.reduced[i][j] else grad.reshape(result.shape)
        return scales

    def restrict_scale(self, producer: int, consumer: int, scale: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """A :meth:`diagonal_scales` entry cut to ``channels``: the consumer's positions of them (diagonal pair) or
        the producer's (reduced pair)."""
        if self.reduced[producer][consumer]:
            return _channel_slice(scale, channels)
        return self.restrict(scale, consumer, channels)

    def through_scale(self, producer: int, consumer: int, value: torch.Tensor, scale: torch.Tensor,
                      shape: Sequence[int], *, backward: bool) -> torch.Tensor:
        """A per-channel pair's Jacobian (``scale``, :meth:`diagonal_scales`) times ``value``, in ``shape``.

        ``backward``: ``J^T e`` of an error at the consumer's input, to the
        producer's output; else ``J t`` of a tangent at the producer's
        output, to the consumer's input. Any channels, as long as ``value``,
        ``scale`` and ``shape`` hold the same ones (the restricted layout).
        """
        if not self.reduced[producer][consumer]:
            return (value * scale).reshape(shape) if backward else value.reshape(scale.shape) * scale
        if backward:  # each consumer input entry spread over its row
            return value.reshape(*scale.shape[:2], *([1] * (scale.dim() - 2))) * scale
        return (value * scale).flatten(2).sum(2).reshape(shape)

    def selection_factors(self, outputs: Sequence[torch.Tensor], externals: dict[str, Any]) -> SelectionFactors:
        """The Jacobian of a chain with a :attr:`selection` at these values, as its diagonals and the pool's choice.

        The chain runs once with the pool's output replaced by a leaf: the
        diagonals before the pool are ``J^T 1`` of the pool's input with
        respect to the producers' outputs (kept at the entries the pool
        picks), those after it and those of the paths that avoid it ``J^T
        1`` of each consumer's input with respect to the pool's output and
        the producers' (all element-wise maps, their own transposes). The
        pool's indices are those its forward pass picks, ties included.
        """
        pool = self.selection
        if pool is None:
            raise AssertionError("selection_factors of a chain without a selection")
        module = self.source.get_submodule(str(self.fx_nodes[pool].target))
        held: dict[str, torch.Tensor] = {}

        def selected(value: torch.Tensor) -> torch.Tensor:
            pooled, indices = _max_pool_with_indices(module, value.detach())
            held["input"], held["indices"] = value, indices
            held["leaf"] = pooled.requires_grad_()
            return held["leaf"]

        with torch.enable_grad():
            leaves = [value.detach().requires_grad_() for value in outputs]
            results = self.run(leaves, externals, replace={pool: selected})

        def ones_through(result: torch.Tensor, wrt: list[torch.Tensor]) -> list[torch.Tensor | None]:
            return _ones_through(result, wrt, retain_graph=True) if result.requires_grad else [None] * len(wrt)

        indices = held["indices"]
        before = [None if value is None else _select(value, indices) for value in ones_through(held["input"], leaves)]
        after: list[torch.Tensor | None] = []
        direct: list[list[torch.Tensor | None]] = [[None] * len(self.consumers) for _ in self.producers]
        for j, result in enumerate(results):
            *paths, pooled = ones_through(result, [*leaves, held["leaf"]])
            after.append(pooled)
            for i, path in enumerate(paths):
                direct[i][j] = path
        return SelectionFactors(before, indices, after, direct)

    # -- few positions: A^T A from shared matrices ---------------------------------------
    def gram_eligible(self) -> bool:
        """Whether :class:`GramFactors` express this group's ``A^T A``.

        Every producer a convolution with ``groups=1``; every consumer
        either a convolution with ``groups=1`` and zero padding given as
        numbers, to which the chain is :attr:`diagonal` without a flatten,
        or a linear layer behind a global pool (:attr:`reduced` pairs).
        """
        producers, consumers = range(len(self.producers)), range(len(self.consumers))
        if not self.per_channel or not all(spec.conv_dims and spec.module.groups == 1 for spec in self.producers):
            return False
        for j, spec in enumerate(self.consumers):
            reached = [i for i in producers if self.reach[i][j]]
            if all(self.reduced[i][j] for i in reached):
                if not isinstance(spec.module, nn.Linear):
                    return False
            elif not (spec.conv_dims and spec.module.groups == 1 and _native_padding(spec.module)
                      and spec.weight_slice.block == 1 and all(self.diagonal[i][j] for i in reached)):
                return False
        return bool(consumers)

    def gram_cost(self, outputs: Sequence[torch.Tensor], errors: Sequence[torch.Tensor],
                  input_shapes: Sequence[Sequence[int]]) -> tuple[int, int, int]:
        """(multiply-adds per channel of one product with ``B B^T`` through :class:`GramFactors`, the same for a
        product with A and one with A^T through the layers, bytes the factors hold) at these captured values
        (the producers' outputs, the consumers' output errors and input shapes)."""
        samples = outputs[0].shape[0] * math.prod(outputs[0].shape[2:])
        producers, consumers = range(len(self.producers)), range(len(self.consumers))
        # the consumers' read-back errors, without the rows and columns a stride leaves at zero
        read = sum(_phase_entries(spec.module, shape) if spec.conv_dims else samples * spec.size
                   for spec, shape in zip(self.consumers, input_shapes))
        gram = 2 * read + 2 * len(self.producers) * samples**2  # E_j and E_j^T, R_i and R_i^T
        layers = 2 * sum(samples * spec.size for spec in self.producers) + 2 * sum(
            error.shape[0] * math.prod(error.shape[2:]) * spec.size for spec, error in zip(self.consumers, errors))
        pairs = sum(self.reach[i][j] for i in producers for j in consumers)
        # R_i (at most M x M), the read-back errors, and per channel the outbound weights' squares and the
        # diagonals
        entries = (len(self.producers) * samples**2 + read
                   + self.group.size * (self.outbound_size + pairs * samples))
        return gram, layers, entries * outputs[0].element_size()

    def gram_factors(
        self,
        inputs: Sequence[torch.Tensor],
        errors: Sequence[torch.Tensor],
        input_shapes: Sequence[Sequence[int]],
        scales: list[list[torch.Tensor | None]],
    ) -> GramFactors:
        """This group's ``A^T A = B^T B`` at one capture as :class:`GramFactors` (see :meth:`gram_eligible`).

        ``inputs`` are the producers' inputs, ``errors`` and ``input_shapes``
        the consumers' output errors and input shapes, ``scales`` the chain's
        diagonal (:meth:`diagonal_scales`) at these values.
        """
        channels = torch.arange(self.group.size, device=errors[0].device)
        roots = []
        for spec, x in zip(self.producers, inputs):
            patches = conv_patches(spec.module, x)
            patches = patches.reshape(patches.shape[0], patches.shape[1], -1).transpose(1, 2).reshape(
                -1, patches.shape[1])
            if len(spec.slices) > 1:  # an owned bias: a column of ones in P
                patches = torch.cat((patches, patches.new_ones(patches.shape[0], 1)), 1)
            roots.append(_root(patches))
            del patches
        samples = roots[0].shape[0]
        read = [_read_back(spec.module, error, shape, samples)
                for spec, error, shape in zip(self.consumers, errors, input_shapes)]
        if any(value.shape[0] != samples for value in roots) or any(
                blocks[0].rows is None and blocks[0].error.shape[0] != samples for blocks in read):
            raise StatisticsError(f"group '{self.group.name}': the chain changes the feature map's size")
        # each consumer's weight as (channels, outputs, *kernel), a view: lambda's order along the channel's row
        outbound = [self.consumer_weight(j, channels).transpose(0, 1)
                    for j in range(len(self.consumers))]
        diagonals = [[None if scale is None else self.restrict_scale(i, j, scale, channels).transpose(0, 1).reshape(
                          self.group.size, -1).contiguous() for j, scale in enumerate(row)]
                     for i, row in enumerate(scales)]
        return GramFactors(roots, read, outbound, diagonals, self.column_slices())

    def row_inputs(self, producer: int, layer_input: torch.Tensor) -> torch.Tensor:
        """(positions, K_producer, N): what each inbound entry multiplies, per output position and sample.

        Laid out position-major and sample-minor, the operand layout of the
        diagonal path's batched matrix product; the bias row (ones), when the
        producer has a bias, is the last row, so that the product handles it
        like any other row. The tensor is scratch space of the chain, valid
        until the next call for the same producer.
        """
        spec = self.producers[producer]
        bias = spec.size > spec.weight_slice.channel_numel
        if spec.conv_dims:
            return patches_by_position(spec.module, layer_input, bias, self._scratch(f"rows{producer}"))
        features, samples = layer_input.shape[-1], layer_input.shape[0]
        rows = self._scratch(f"rows{producer}")((1, features + int(bias), samples), layer_input)
        rows[0, :features] = layer_input.T
        if bias:
            rows[0, -1] = 1
        return rows

    def _scratch(self, name: str) -> Callable[[Sequence[int], torch.Tensor], torch.Tensor]:
        """Makes tensors (shape, like a given tensor) that reuse the memory of the last one made under ``name``.

        The exact path's large temporaries live here between batches: on the
        CPU, fresh allocations of many megabytes cost a page fault per 4 KiB
        on first touch, as much as the arithmetic done in them.
        """
        store: dict[str, torch.Tensor] = self.__dict__.setdefault("_scratch_tensors", {})

        def make(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
            size = math.prod(shape)
            held = store.get(name)
            if held is None or held.numel() < size or held.dtype != like.dtype or held.device != like.device:
                held = store[name] = like.new_empty(size)
            return held[:size].view(tuple(shape))

        return make

    def contract_diagonal(
        self,
        consumer: int,
        rows: torch.Tensor,
        scale: torch.Tensor,
        error: torch.Tensor,
        channels: torch.Tensor,
        into: torch.Tensor,
        alpha: float = 1.0,
        slab: int | None = None,
    ) -> None:
        """Adds ``alpha`` times a diagonal chain's contraction at one consumer's columns to ``into``.

        ``rows`` is (positions, R, N), rows of :meth:`row_inputs` (the bias
        row included, when wanted); ``scale`` is the chain's Jacobian diagonal
        at the consumer's input.

        For a linear consumer, with x the rows, d the scale and e the error,
        A[s, r, v, p] = w[v, s, p] * T[p, r, s, v] with
        T[p, r, s, v] = sum_n x[p, r, n] d[n, s, p] e[n, v]: per position p
        one matrix product over the samples. ``into`` is then a running sum
        of T, (positions, R, S, V), position-major and without the weights,
        as the products leave it (any float dtype; :meth:`weigh_diagonal`
        turns it into A once the data are summed): a transpose and a product
        by the weights per batch would cost a third as much as the products
        themselves. Where ``into`` has the rows' dtype and the scale goes
        into the error, the products add into it themselves (``baddbmm``),
        with no separate sum and add. The operands are x and the element-wise product of d
        with e (or with x, whichever is smaller), made ``slab`` entries at a
        time in a buffer that stays in cache and read by the matrix product
        at once. Default ``slab``: 2**19 entries (2 MiB in float32) on the
        CPU; on an accelerator 2**24, where each slab's kernel launches cost
        more than cache misses.

        For a convolutional consumer, ``into`` is A's block itself,
        (S, R, columns of the consumer), any dtype, with its last axis
        contiguous: the consumer's weight gradient for inputs scaled row by
        row, times the weights.
        """
        spec = self.consumers[consumer]
        module = spec.module
        weight_slice = spec.weight_slice
        count, samples, depth = channels.numel(), scale.shape[0], rows.shape[1]
        picked = _pick(scale, 1, weight_slice, channels)
        if spec.conv_dims:
            weight = _pick(module.weight.detach(), 1, weight_slice, channels)  # (V, S*B, *k)
            picked = picked.reshape(samples, count, -1)  # (N, S, positions)
            inputs = rows.permute(2, 1, 0).unsqueeze(2) * picked.unsqueeze(1)  # (N, R, S, positions)
            inputs = inputs.reshape(samples, depth * count, *scale.shape[2:])
            grad = _conv_weight_grad(
                spec.conv_dims, module, inputs, (weight.shape[0], inputs.shape[1], *weight.shape[2:]), error
            ).reshape(weight.shape[0], depth, *weight.shape[1:])
            entries = grad * weight.unsqueeze(1)  # (V, R, S, *k)
            into.add_(entries.movedim(2, 0).movedim(2, 1).reshape(into.shape), alpha=alpha)
            return
        block = weight_slice.block
        if rows.shape[0] != block:
            raise AssertionError("diagonal chain with mismatched positions")
        error = error.reshape(samples, -1)  # (N, V)
        outputs = error.shape[1]
        # the scale sample-minor, (S, B, N): one 2-D transpose, which torch copies in cache-sized tiles
        scales = self._scratch("scales")((count * block, samples), scale)
        scales.copy_(picked.reshape(samples, count * block).T)
        scales = scales.view(count, block, samples)
        into_error = outputs <= depth  # fold the scale into the smaller operand
        width = outputs if into_error else depth
        if slab is None:
            slab = 2**19 if rows.device.type == "cpu" else 2**24
        step = max(1, slab // max(1, count * width * samples))  # positions per slab
        channel_step = count if step > 1 else min(count, max(1, slab // max(1, width * samples)))
        step = min(step, block)
        buffer = self._scratch("products")((step, channel_step, width, samples), rows)
        flat_error = error.T.contiguous() if into_error else error.contiguous()  # (V, N) or (N, V)
        if into_error and channel_step == count and into.dtype == rows.dtype:
            # a running sum in the products' dtype takes each product as the matrix product leaves it (beta = 1)
            for start in range(0, block, step):
                stop = min(start + step, block)
                products = torch.mul(_factor_of(scales, start, stop), flat_error, out=buffer[:stop - start])
                into[start:stop].view(stop - start, depth, count * outputs).baddbmm_(
                    rows[start:stop], products.view(stop - start, -1, samples).transpose(1, 2), alpha=alpha
                )
            return
        sums_buffer = self._scratch("sums")((step, depth * count * outputs), rows)
        for start in range(0, block, step):
            stop = min(start + step, block)
            size = stop - start
            # (b, R, S, V) when the scale goes into the error, else (b, S, R, V)
            sums = sums_buffer[:size].view(size, *((depth, count) if into_error else (count, depth)), outputs)
            for first in range(0, count, channel_step):
                last = min(first + channel_step, count)
                products = buffer[:size, :last - first]
                factor = _factor_of(scales[first:last], start, stop)
                whole = last - first == count
                if into_error:
                    torch.mul(factor, flat_error, out=products)  # (b, s, V, N)
                    target = sums.view(size, depth, count * outputs) if whole else None
                    product = torch.bmm(
                        rows[start:stop], products.view(size, -1, samples).transpose(1, 2), out=target
                    ).view(size, depth, last - first, outputs)
                    if not whole:
                        sums[:, :, first:last] = product
                else:
                    torch.mul(factor, rows[start:stop].unsqueeze(1), out=products)  # (b, s, R, N)
                    target = sums.view(-1, outputs) if whole else None
                    product = torch.mm(products.view(-1, samples), flat_error, out=target)
                    if not whole:
                        sums[:, first:last] = product.view(size, last - first, depth, outputs)
            # added as the products leave it, position-major: (b, R, S, V)
            into[start:stop].add_(sums if into_error else sums.transpose(1, 2), alpha=alpha)

    def weigh_diagonal(self, consumer: int, sums: torch.Tensor, channels: torch.Tensor, into: torch.Tensor) -> None:
        """Adds A's entries made from :meth:`contract_diagonal`'s running sum ``sums`` of a linear consumer to ``into``.

        ``sums`` is (positions, R, S, V); ``into`` is A's block at this
        consumer's columns, (S, R, V * positions), any dtype, its last axis
        contiguous: A[s, r, v, p] = w[v, s, p] * sums[p, r, s, v], in one
        pass that reads both along the positions.
        """
        spec = self.consumers[consumer]
        count, outputs, block = channels.numel(), sums.shape[3], spec.weight_slice.block
        weight = _pick(spec.module.weight.detach(), 1, spec.weight_slice, channels)  # (V, S*B)
        weight = weight.reshape(outputs, count, block).transpose(0, 1).unsqueeze(1)  # (S, 1, V, B), a view
        into.view(count, sums.shape[1], outputs, block).addcmul_(sums.permute(2, 1, 3, 0), weight)

    # -- sizes ------------------------------------------------------------------------
    def column_slices(self) -> list[slice]:
        return [slice(spec.offset, spec.offset + spec.size) for spec in self.consumers]

    def row_slices(self) -> list[slice]:
        return [slice(spec.offset, spec.offset + spec.size) for spec in self.producers]


@dataclass(frozen=True)
class SelectionFactors:
    """A chain's Jacobian at one capture: diagonal, max-pool selection, diagonal (:meth:`GroupChain.selection_factors`).

    Attributes:
        before: per producer, the diagonal from its output to the pool's input, at the entries the pool picks
            (shaped as the pool's output; None: it does not reach the pool).
        indices: the pool's choice: each output entry's flat position in its channel's input plane.
        after: per consumer, the diagonal from the pool's output to its input (None: not reached from the pool).
        direct: ``[i][j]``, the diagonal of the paths from producer ``i`` to consumer ``j`` that avoid the pool.

    ``J t = direct t + after * before * select(t)`` and
    ``J^T e = direct e + spread(before * after * e)``, summed over the
    producers and the consumers: a diagonal before the selection is the
    same for every output entry that picks an input entry, so it is
    applied at the pool's output, which is smaller than its input. Every
    factor is per channel, so a product for some channels reads those
    channels' slices only (:meth:`channels`).
    """

    before: list[torch.Tensor | None]
    indices: torch.Tensor
    after: list[torch.Tensor | None]
    direct: list[list[torch.Tensor | None]]

    def channels(self, chain: GroupChain, channels: torch.Tensor) -> SelectionFactors:
        """The factors at ``channels`` only (the products' restricted layout)."""
        return SelectionFactors(
            [None if value is None else _channel_slice(value, channels) for value in self.before],
            _channel_slice(self.indices, channels),
            [None if value is None else chain.restrict(value, j, channels) for j, value in enumerate(self.after)],
            [[None if value is None else chain.restrict(value, j, channels) for j, value in enumerate(row)]
             for row in self.direct],
        )

    def select(self, value: torch.Tensor) -> torch.Tensor:
        """The pool's selection of ``value`` (at the pool's input): the entries its indices name."""
        return _select(value, self.indices)

    def spread(self, value: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The selection's transpose: ``value`` (at the pool's output) added at the entries the indices name."""
        spread = value.new_zeros(tuple(shape))
        spread.flatten(2).scatter_add_(2, self.indices.flatten(2), value.flatten(2))
        return spread


class GramFactors:
    """A per-channel chain's channels at one capture as ``A_c^T A_c = B_c^T B_c``, with a short ``B_c`` from matrices
    the channels share.

    Where :meth:`GroupChain.gram_eligible` holds (convolutions the chain
    reaches entry by entry, a linear head behind a global pool; docs/MATH.md
    section 8, "Few positions"), channel ``c``'s A stacks, producer by
    producer, ``P_i^T N_ic`` with ``N_ic = sum_j diag(D_ij[c]) E_j diag(omega_j[c])``:

    - ``P_i`` (M x K_i): producer ``i``'s im2col patches over the M samples
      and positions (a column of ones for an owned bias);
    - ``E_j`` (M x L_j): consumer ``j``'s output error read back at its input
      positions, per kernel offset (:func:`conv_errors`); for a linear
      layer behind a global pool, each sample's error at every position;
    - ``D_ij`` (channels x M): the chain's diagonal from producer ``i`` to
      consumer ``j`` (behind a global pool, the pool's row of weights times
      the diagonals around it: :meth:`GroupChain.diagonal_scales`);
    - ``omega_j`` (channels x L_j): the channels' outbound weights in
      lambda's order (``outbound`` holds each as (channels, outputs,
      *kernel), a view of the consumer's weight, only read).

    ``P_i`` enters ``A_c^T A_c = sum_i N_ic^T P_i P_i^T N_ic`` only through
    ``G_i = P_i P_i^T`` (M x M), factored once as ``R_i R_i^T`` (``R_i``, M
    x r_i with r_i <= M: :func:`_root`). Then
    ``A_c^T A_c = B_c^T B_c`` for ``B_c``, the ``R_i^T N_ic`` stacked: it has
    ``r = sum_i r_i`` rows, and A's right singular vectors and values are
    B's. Products with ``B_c`` (:meth:`reduce`), ``B_c^T`` (:meth:`lift`)
    and ``B_c B_c^T`` (:meth:`gram`) are, for every channel at once, dense
    products with ``E_j`` and ``R_i`` and no vector of K entries; a solve on
    ``B_c B_c^T`` holds vectors of r entries, not of L. Where M is small
    next to K and L (the late layers of a network) that is less arithmetic
    and memory than products with A and A^T.
    """

    def __init__(self, roots: list[torch.Tensor], errors: list[list[ErrorBlock]], outbound: list[torch.Tensor],
                 scales: list[list[torch.Tensor | None]], columns: list[slice]) -> None:
        self.roots, self.errors, self.outbound, self.scales, self.columns = roots, errors, outbound, scales, columns
        self.rows = [0, *itertools.accumulate(root.shape[1] for root in roots)]
        self._key: Any = None
        # B B^T multiplies by their squares: made once, (channels, L_j) in lambda's order, one pass over the weights
        self.squared = [torch.mul(w, w, out=w.new_empty(w.shape)).view(w.shape[0], -1) for w in outbound]
        self._picked = _Picked(outbound, self.squared, scales)  # replaced at the first product

    @property
    def size(self) -> int:
        """r: the rows of each channel's ``B_c``, the length of the vectors :meth:`gram` takes."""
        return self.rows[-1]

    def _at(self, channels: torch.Tensor, keep: bool = True) -> _Picked:
        """The outbound weights, their squares and the diagonals of ``channels``; with ``keep``, kept while the
        channels stay the same (a solve's running channels), else without the squares (for :meth:`lift` and
        :meth:`reduce`, which do not read them)."""
        key = host_channels(channels)[0]
        if key == self._key:
            return self._picked
        picked = _Picked([_channel_slice(w, channels, 0) for w in self.outbound],
                         [_channel_slice(w, channels, 0) for w in self.squared] if keep else [],
                         [[None if d is None else _channel_slice(d, channels, 0) for d in row] for row in self.scales])
        if keep:
            self._key, self._picked = key, picked
        return picked

    def reduce(self, vectors: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``B_c v`` for ``channels`` (rows of ``vectors``, (S, L)): (S, r), written into ``out`` when given."""
        out = vectors.new_empty(vectors.shape[0], self.size) if out is None else out
        picked = self._at(channels, keep=False)
        # N_ic v, in the coordinates of P_i^T: sum_j D_ij * E_j (omega_j * v_j), then R_i^T on the left
        read = [_read(torch.mul(vectors[:, columns].view(picked.outbound[j].shape), picked.outbound[j]).reshape(
                          vectors.shape[0], -1), blocks,
                      vectors.new_empty(vectors.shape[0], self.roots[0].shape[0]))
                for j, (columns, blocks) in enumerate(zip(self.columns, self.errors))]
        return self._to_rows(read, picked.scales, out)

    def lift(self, vectors: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``B_c^T y`` for ``channels`` (rows of ``vectors``, (S, r)): (S, L), written into ``out`` when given."""
        out = vectors.new_empty(vectors.shape[0], self.columns[-1].stop) if out is None else out
        picked = self._at(channels, keep=False)
        back = self._from_rows(vectors)
        for j, (columns, blocks) in enumerate(zip(self.columns, self.errors)):
            reached = _weighted_sum([(picked.scales[i][j], back[i]) for i in range(len(back))], back[0])
            _spread(reached, blocks, out[:, columns]).view(picked.outbound[j].shape).mul_(picked.outbound[j])
        return out

    def gram(self, vectors: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``B_c B_c^T y`` for ``channels`` (rows of ``vectors``, (S, r)): (S, r), written into ``out`` when given.

        ``R_i y_i`` for every producer at once (S x M each); per consumer,
        the chain's diagonal sums those into the consumer's coordinates,
        ``E_j`` spreads them over its columns, the squared outbound weights
        scale them and ``E_j^T`` reads them back, a slice of rows at a time:
        the (rows x L_j) values in between, :data:`GRAM_SLICE` bytes, stay
        in the cache. The diagonal and ``R_i`` then take the consumers' (S x
        M) results back to each producer's rows, again for every row at
        once: the products with ``R_i``, the smallest, run on the most rows.
        """
        out = torch.empty_like(vectors) if out is None else out
        picked = self._at(channels)
        count = vectors.shape[0]
        back = self._from_rows(vectors)
        read = []
        for j, (columns, blocks) in enumerate(zip(self.columns, self.errors)):
            # a new (S x M) tensor: each slice of rows is read back in the place it was spread from
            values = _weighted_sum([(picked.scales[i][j], back[i]) for i in range(len(back))], back[0])
            length = columns.stop - columns.start
            step = max(1, GRAM_SLICE // (length * vectors.element_size()))
            between = vectors.new_empty(min(step, count), length)
            for start in range(0, count, step):
                rows = slice(start, min(start + step, count))
                spread = _spread(values[rows], blocks, between[:rows.stop - start]).mul_(picked.squared[j][rows])
                _read(spread, blocks, values[rows])
            read.append(values)
        return self._to_rows(read, picked.scales, out)

    def _from_rows(self, vectors: torch.Tensor) -> list[torch.Tensor]:
        """``R_i y_i`` (S x M) for every producer ``i``, from vectors of B's rows (S, r)."""
        return [vectors[:, self.rows[i]:self.rows[i + 1]] @ root.T for i, root in enumerate(self.roots)]

    def _to_rows(self, read: list[torch.Tensor], scales: list[list[torch.Tensor | None]],
                 out: torch.Tensor) -> torch.Tensor:
        """``R_i^T sum_j D_ij z_j`` into producer ``i``'s rows of ``out`` (S, r), from each consumer's ``z_j`` (S x
        M)."""
        for i, root in enumerate(self.roots):
            reached = _weighted_sum([(scales[i][j], read[j]) for j in range(len(read))], read[0])
            _product(reached, root, out[:, self.rows[i]:self.rows[i + 1]])
        return out


class _Picked(NamedTuple):
    """A :class:`GramFactors`' factors that differ from channel to channel, for some channels (``squared`` empty
    where they were picked for :meth:`GramFactors.lift` or :meth:`GramFactors.reduce`, which do not read it)."""

    outbound: list[torch.Tensor]
    squared: list[torch.Tensor]
    scales: list[list[torch.Tensor | None]]


GRAM_SLICE = 2**20
"""Bytes of the (rows x L_j) values one slice of :meth:`GramFactors.gram` makes at consumer j between ``E_j`` and
``E_j^T``."""


def _root(patches: torch.Tensor) -> torch.Tensor:
    """``R`` (M x r) with ``R R^T = P P^T`` for ``patches`` ``P`` (M x K), ``r <= M``.

    ``P`` itself where it has no more columns than rows; else the Cholesky
    factor of ``P P^T`` (in float64: the rounding of ``P P^T`` is then the
    only error); where that is singular, the eigenvectors of ``P P^T`` of
    eigenvalues above ``M`` units of rounding of the largest, scaled by
    their square roots (``r`` then its numerical rank).
    """
    if patches.shape[1] <= patches.shape[0]:
        return patches
    gram = (patches @ patches.T).double()
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return factor.to(patches.dtype)
    values, vectors = torch.linalg.eigh(gram)
    keep = values > values[-1].clamp_min(0) * gram.shape[0] * torch.finfo(patches.dtype).eps
    return (vectors[:, keep] * values[keep].sqrt()).to(patches.dtype)


def _product(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``left @ right`` written into ``out`` (a view, contiguous or not)."""
    return torch.mm(left, right, out=out) if out.is_contiguous() else out.copy_(left @ right)


class ErrorBlock(NamedTuple):
    """A block of a consumer's read-back error ``E_j`` (:class:`GramFactors`) holding all its non-zeros for some rows.

    ``error`` is ``E_j[rows][:, columns]``. A strided convolution reads each
    input position through some kernel offsets only, the same ones for every
    position of a phase (the position modulo the stride, per axis): one
    block per phase leaves out the zeros, three quarters of ``E_j`` at
    stride 2 in two dimensions. Otherwise ``E_j`` is one block, the whole of
    it, with ``rows`` and ``columns`` None.
    """

    rows: torch.Tensor | None
    columns: torch.Tensor | None
    error: torch.Tensor


def _read_back(module: nn.Module, error: torch.Tensor, input_shape: Sequence[int],
               samples: int) -> list[ErrorBlock]:
    """A consumer's output error read back at the group's ``samples`` (samples x positions) as :class:`ErrorBlock` s.

    A convolution's by :func:`conv_errors`, one block per phase where it is
    strided (:func:`_phases`); a linear consumer behind a global pool reads
    each sample's error at every position (the pool's weights are in the
    chain's diagonal).
    """
    if not isinstance(module, tuple(_CONV_DIMS)):
        return [ErrorBlock(None, None, error.repeat_interleave(samples // error.shape[0], 0))]
    phases = _phases(module, input_shape, error.device)
    if not phases:
        return [ErrorBlock(None, None, conv_errors(module, error, input_shape))]
    per_sample, kernel = math.prod(input_shape[2:]), math.prod(module.kernel_size)
    first = torch.arange(error.shape[0], device=error.device).unsqueeze(1) * per_sample
    outputs = torch.arange(module.out_channels, device=error.device).unsqueeze(1) * kernel
    return [ErrorBlock((first + where).reshape(-1), (outputs + through).reshape(-1),
                       conv_errors(module, error, input_shape, where, through)) for where, through in phases]


def _read(values: torch.Tensor, blocks: list[ErrorBlock], out: torch.Tensor) -> torch.Tensor:
    """``values @ E^T`` (S, samples) for ``E`` given as :class:`ErrorBlock` s, written into ``out``."""
    if blocks[0].rows is None:  # the whole of E
        return _product(values, blocks[0].error.T, out)
    out.zero_()
    for rows, columns, error in blocks:
        out.index_copy_(1, rows, values.index_select(1, columns) @ error.T)
    return out


def _spread(values: torch.Tensor, blocks: list[ErrorBlock], out: torch.Tensor) -> torch.Tensor:
    """``values @ E`` (S, columns) for ``E`` given as :class:`ErrorBlock` s, written into ``out``."""
    if blocks[0].rows is None:  # the whole of E
        return _product(values, blocks[0].error, out)
    out.zero_()
    for rows, columns, error in blocks:
        out.index_add_(1, columns, values.index_select(1, rows) @ error)
    return out


def _phase_offsets(module: nn.Module, input_shape: Sequence[int]) -> list[list[tuple[int, list[int]]]]:
    """Per spatial axis of a convolution, per phase (input position modulo the stride): (positions of that phase,
    the kernel offsets through which an output position can read them)."""
    axes = []
    for d in range(len(input_shape) - 2):
        size, stride = input_shape[2 + d], module.stride[d]
        phases = []
        for phase in range(stride):
            offsets = [o for o in range(module.kernel_size[d])
                       if (phase + module.padding[d] - o * module.dilation[d]) % stride == 0]
            phases.append((len(range(phase, size, stride)), offsets))
        axes.append(phases)
    return axes


def _phase_entries(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Entries of a convolution's read-back error (:func:`conv_errors`) kept in its :func:`_phases` blocks."""
    kept = input_shape[0] * module.out_channels
    for phases in _phase_offsets(module, input_shape):
        kept *= sum(count * len(offsets) for count, offsets in phases)
    return kept


def _phases(module: nn.Module, input_shape: Sequence[int],
            device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input positions, kernel offsets) of the blocks of :func:`conv_errors`'s result that hold its non-zeros,
    one per phase: flat indices into the input's spatial grid and into the kernel.

    Empty for a convolution with stride 1 (one phase: every entry may be
    non-zero).
    """
    axes = _phase_offsets(module, input_shape)
    if all(len(phases) == 1 for phases in axes):
        return []
    spatial, kernel = list(input_shape[2:]), list(module.kernel_size)
    grid = torch.arange(math.prod(spatial), device=device).reshape(spatial)
    offsets = torch.arange(math.prod(kernel), device=device).reshape(kernel)
    blocks = []
    for phase in itertools.product(*(range(len(phases)) for phases in axes)):
        where = grid[tuple(slice(p, None, len(phases)) for p, phases in zip(phase, axes))].reshape(-1)
        through = offsets[tuple(torch.tensor(phases[p][1], dtype=torch.long, device=device).reshape(
            [-1 if a == d else 1 for a in range(len(axes))]) for d, (p, phases) in enumerate(zip(phase, axes)))]
        if where.numel() and through.numel():
            blocks.append((where, through.reshape(-1)))
    return blocks


def _weighted_sum(terms: list[tuple[torch.Tensor | None, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    """``sum scale * value`` over the terms whose scale is not None (zeros if none is)."""
    total: torch.Tensor | None = None
    for scale, value in terms:
        if scale is None:
            continue
        total = scale * value if total is None else total.addcmul_(scale, value)
    return total if total is not None else torch.zeros_like(like)


def conv_errors(module: nn.Module, error: torch.Tensor, input_shape: Sequence[int],
                positions: torch.Tensor | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """A convolution's output error read back at its input positions, per kernel offset (zero padding).

    ``E[(n, s), (v, o)] = error[n, v, r]`` where output position ``r``
    reads input position ``s`` through kernel offset ``o`` (along each axis
    ``s = r * stride - padding + o * dilation``), zero where no output
    position does: (samples x input positions, V * prod(kernel)), rows
    sample-major, columns in lambda's order. ``positions`` and ``offsets``
    (flat indices into the input's spatial grid and the kernel) keep those
    rows of each sample and those columns of each output channel only, in
    their order.
    """
    dims = error.dim() - 2
    outputs, device = error.shape[2:], error.device
    read = torch.zeros((), dtype=torch.long, device=device)  # the flat output position, per (*input, *kernel)
    valid = torch.ones((), dtype=torch.bool, device=device)
    for d in range(dims):
        size, kernel = input_shape[2 + d], module.kernel_size[d]
        position = torch.arange(size, device=device).unsqueeze(1) + module.padding[d]
        shifted = position - torch.arange(kernel, device=device).unsqueeze(0) * module.dilation[d]
        row = torch.div(shifted, module.stride[d], rounding_mode="floor")
        # broadcast over (*input spatial, *kernel): this axis's size at place d, its kernel at place dims + d
        shape = [1] * (2 * dims)
        shape[d], shape[dims + d] = size, kernel
        read = read * outputs[d] + row.reshape(shape)
        valid = valid & ((shifted >= 0) & (shifted % module.stride[d] == 0) & (row < outputs[d])).reshape(shape)
    total = math.prod(outputs)
    index = torch.where(valid, read, total).reshape(math.prod(input_shape[2:]), -1)  # where none reads: a zero
    if positions is not None:
        index = index.index_select(0, positions)
    if offsets is not None:
        index = index.index_select(1, offsets)
    padded = F.pad(error.flatten(2), (0, 1))  # (N, V, outputs + 1)
    picked = padded.index_select(2, index.reshape(-1)).view(*error.shape[:2], *index.shape)
    return picked.permute(0, 2, 1, 3).reshape(error.shape[0] * index.shape[0], -1)


def _select(value: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The entries of ``value`` (a pool's input) that ``indices`` (its choice, flat per channel plane) name."""
    return value.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)


def _max_pool_with_indices(module: nn.Module, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A max pool module's output for ``value`` and the flat position, per channel plane, each entry came from."""
    pool = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}[type(module)]
    return pool(value, module.kernel_size, module.stride, module.padding, module.dilation,  # type: ignore[no-any-return]
                ceil_mode=module.ceil_mode, return_indices=True)


def _channel_slice(value: torch.Tensor, channels: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """``value`` at ``channels`` along ``axis``: a view where they are consecutive, else a copy."""
    first = host_channels(channels)[1]
    if first is not None:
        return value.narrow(axis, first, channels.numel())
    return value.index_select(axis, channels)


class LinearisedChain:
    """A chain's Jacobian ``J`` at one capture's values, for many products ``J^T e`` and ``J t``.

    The chain runs once, and its autograd graph is kept: a product ``J^T e``
    (:meth:`vjp`) is one backward pass through it, with no forward pass.
    For ``J t`` (:meth:`jvp`) the backward pass is itself recorded once, for
    a placeholder error ``c``: ``g(c) = J^T c`` is linear in ``c``, so the
    gradient of ``<g(c), t>`` with respect to ``c`` is ``J t``, one backward
    pass through that second graph. Both directions are native backward
    kernels of PyTorch (its forward-mode rules for products and pooling are
    Python decompositions, many times slower), and they are exact transposes
    of each other, subgradients included (a ReLU at 0, ties in a max pool),
    which the Lanczos iteration assumes.

    Holds the chain's saved values and those of its backward pass: made
    per stored capture for the products of one group's solve. Where an
    operation's backward pass has no derivative of its own (PyTorch's
    ``hardsigmoid``, a custom function marked once-differentiable), ``J t``
    is taken by forward-mode differentiation of the chain instead.
    """

    def __init__(self, chain: GroupChain, outputs: Sequence[torch.Tensor], externals: dict[str, Any]) -> None:
        self.chain, self.externals = chain, externals
        self.outputs = list(outputs)
        self.leaves, results = chain.recorded(outputs, externals)
        self.shapes = [(result.shape, result.dtype, result.device) for result in results]
        self.live = [index for index, result in enumerate(results) if result.requires_grad]
        self.results = [results[index] for index in self.live]
        self.errors = [torch.zeros_like(result, requires_grad=True) for result in self.results]
        grads: Sequence[torch.Tensor | None] = [None] * len(self.leaves)
        if self.results:
            with torch.enable_grad():  # the backward pass is itself recorded
                grads = torch.autograd.grad(self.results, self.leaves, self.errors, create_graph=True,
                                            allow_unused=True)
        # J_i^T c for each producer i whose output reaches a consumer (a function of c, recorded)
        self.transposed: dict[int, torch.Tensor] | None = {
            index: grad for index, grad in enumerate(grads) if grad is not None and grad.requires_grad}

    def vjp(self, cotangents: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Errors at the producer outputs for errors at the consumer inputs: ``J^T e``."""
        grads: Sequence[torch.Tensor | None] = [None] * len(self.leaves)
        if self.results:
            grads = torch.autograd.grad(self.results, self.leaves, [cotangents[index] for index in self.live],
                                        retain_graph=True, allow_unused=True)
        return tuple(grad if grad is not None else torch.zeros_like(value) for grad, value in zip(grads, self.outputs))

    def jvp(self, tangents: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Tangents at the consumer inputs for one tangent per producer output: ``J t``."""
        if self.transposed is None:
            return self.chain.jvp(self.outputs, self.externals, tangents)
        found: Sequence[torch.Tensor | None] = [None] * len(self.errors)
        if self.transposed:
            try:
                found = torch.autograd.grad(list(self.transposed.values()), self.errors,
                                            [tangents[index] for index in self.transposed], retain_graph=True,
                                            allow_unused=True)
            except RuntimeError as error:  # a backward pass that cannot be differentiated itself
                logger.debug("group %s: J t by forward mode (%s)", self.chain.group.name, error)
                self.transposed = None  # the recorded backward pass is given up; J^T e still uses the chain's graph
                return self.chain.jvp(self.outputs, self.externals, tangents)
        result: list[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device)
                                      for shape, dtype, device in self.shapes]
        for place, value in zip(self.live, found):
            if value is not None:
                result[place] = value
        return tuple(result)


def _ones_through(
    result: torch.Tensor, wrt: Sequence[torch.Tensor], *, retain_graph: bool
) -> list[torch.Tensor | None]:
    """``J^T 1`` from ``result`` to each of ``wrt`` (None where it does not depend on one).

    The ones are one number broadcast: no tensor of them is written, and
    the first backward function reads one operand less. Through a chain of
    views alone the result is that broadcast number (read, never written).
    """
    ones = torch.ones((), dtype=result.dtype, device=result.device).expand_as(result)
    return list(torch.autograd.grad(result, list(wrt), ones, retain_graph=retain_graph, allow_unused=True))


def _factor_of(scales: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The scales (S, B, N) of positions ``start:stop`` as one factor of the diagonal path's products: (b, S, 1, N)."""
    return scales[:, start:stop].transpose(0, 1).unsqueeze(2)


def _pick(tensor: torch.Tensor, axis: int, weight_slice: ParamSlice, channels: torch.Tensor) -> torch.Tensor:
    """The entries of ``channels`` along ``axis`` (a view when they are contiguous)."""
    first = _consecutive(channels)
    if first is not None:
        block = weight_slice.block
        return tensor.narrow(axis, weight_slice.offset + first * block, channels.numel() * block)
    return tensor.index_select(axis, _positions(weight_slice, channels, tensor.device))


def _consecutive(channels: torch.Tensor) -> int | None:
    """The first of ``channels`` where they are consecutive and ascending, else None (read on the host)."""
    return host_channels(channels)[1]


_HOST_CHANNELS: dict[int, tuple[Any, int, tuple[int, ...], int | None]] = {}


def host_channels(channels: torch.Tensor) -> tuple[tuple[int, ...], int | None]:
    """``channels`` as host integers, and their first where they are consecutive and ascending (else None).

    Read from the device once per index tensor (and per in-place change of
    it), not once per call: a product asks about its channels for every
    layer, and on an accelerator each read waits for all the work queued
    before it. The Lanczos solve passes one tensor per set of running
    channels, so a solve reads them once per set.
    """
    key = id(channels)
    version = 0 if channels.is_inference() else channels._version  # inference tensors keep no version counter
    held = _HOST_CHANNELS.get(key)
    if held is not None and held[0]() is channels and held[1] == version:
        return held[2], held[3]
    values = tuple(int(value) for value in channels.tolist())
    first = values[0] if values and values == tuple(range(values[0], values[0] + len(values))) else None
    # the entry goes when the tensor does (the table is held by the callback itself, also at interpreter exit)
    reference = weakref.ref(channels, lambda _, key=key, table=_HOST_CHANNELS: table.pop(key, None))
    _HOST_CHANNELS[key] = (reference, version, values, first)
    return values, first


def _positions(weight_slice: ParamSlice, channels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Indices along a consumer's input axis that hold ``channels``, channel-major."""
    block = torch.arange(weight_slice.block, device=device)
    starts = weight_slice.offset + channels.to(device) * weight_slice.block
    return (starts.unsqueeze(1) + block).reshape(-1)


def _batchnorm(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def call(x: torch.Tensor) -> torch.Tensor:
        if module.training or module.running_mean is None:
            # batch statistics, as the training forward used; running averages untouched
            return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)
        return _affine_batchnorm(x, module.running_mean, module.running_var, module.weight, module.bias, module.eps)

    return call


def _affine_batchnorm(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Batch norm on running statistics as the per-channel affine map it is: ``x * scale + shift``.

    The same function as ``F.batch_norm`` in eval mode (to rounding), in
    element-wise operations whose forward-mode derivatives PyTorch runs
    natively; its forward-mode rule for batch norm is a Python
    decomposition, about a millisecond of overhead on every pass of a
    chain.
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.view(shape) + shift.view(shape)  # (addcmul has no native forward-mode rule either)


def _functional_batchnorm(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``F.batch_norm`` as the traced call made it (running or batch statistics), with momentum 0:
    re-running the chain never updates the running statistics."""
    roles = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    bound = dict(zip(roles, args))
    bound.update(kwargs)
    bound["momentum"] = 0.0
    if not bound.get("training") and bound.get("running_mean") is not None and bound.get("running_var") is not None:
        return _affine_batchnorm(bound["input"], bound["running_mean"], bound["running_var"], bound.get("weight"),
                                 bound.get("bias"), bound.get("eps", 1e-5))
    return F.batch_norm(**bound)


def _dropout(name: str, active: Callable[[], bool]) -> Callable[..., torch.Tensor]:
    def call(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if active():
            raise StatisticsError(
                f"dropout '{name}' is active (training mode) inside a site's chain; its random mask "
                "cannot be replayed. Measure A-statistics with the model in eval mode "
                "(tg.a_statistics does this), or track sites whose channels do not pass dropout."
            )
        return x

    return call


def _prepad(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as the conv pads it, so that the conv itself runs with padding 0."""
    padding = module._reversed_padding_repeated_twice
    if not any(padding):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, padding, mode=mode)


def conv_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, C_in * prod(kernel), *output spatial): the input entry each weight multiplies, per output pixel."""
    dims = next(dims for kind, dims in _CONV_DIMS.items() if isinstance(module, kind))
    x = _prepad(module, x)
    if dims == 2:
        patches = F.unfold(x, module.kernel_size, module.dilation, 0, module.stride)
        out = [
            (x.shape[2 + d] - module.dilation[d] * (module.kernel_size[d] - 1) - 1) // module.stride[d] + 1
            for d in range(2)
        ]
        return patches.reshape(x.shape[0], -1, *out)
    if dims == 1:
        patches = F.unfold(
            x.unsqueeze(2), (1, module.kernel_size[0]), (1, module.dilation[0]), 0, (1, module.stride[0])
        )
        return patches
    rows = x.shape[1] * math.prod(module.kernel_size)
    eye = torch.eye(rows, dtype=x.dtype, device=x.device).reshape(rows, x.shape[1], *module.kernel_size)
    return F.conv3d(x, eye, None, module.stride, 0, module.dilation)


def patches_by_position(
    module: nn.Module,
    x: torch.Tensor,
    ones: bool = False,
    empty: Callable[[Sequence[int], torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(output positions, C_in * prod(kernel), N): :func:`conv_patches`, laid out position-major.

    Built as a strided view of the sample-minor input and copied once, which
    is much cheaper than transposing the patches afterwards. With ``ones``, a
    last row of ones follows (the bias row), written into the same tensor;
    ``empty(shape, like)`` makes that tensor (default: a new one).
    """
    dims = next(dims for kind, dims in _CONV_DIMS.items() if isinstance(module, kind))
    padded = _prepad(module, x)
    samples, channels, spatial = padded.shape[0], padded.shape[1], padded.shape[2:]
    moved = padded.movedim(0, -1).contiguous()  # (C, *spatial, N)
    step = [math.prod(spatial[d + 1:]) * samples for d in range(dims)]
    out = [
        (spatial[d] - module.dilation[d] * (module.kernel_size[d] - 1) - 1) // module.stride[d] + 1
        for d in range(dims)
    ]
    view = moved.as_strided(
        (*out, channels, *module.kernel_size, samples),
        (*(module.stride[d] * step[d] for d in range(dims)), math.prod(spatial) * samples,
         *(module.dilation[d] * step[d] for d in range(dims)), 1),
    )
    depth = channels * math.prod(module.kernel_size)
    shape = (int(math.prod(out)), int(depth) + int(ones), int(samples))
    patches = empty(shape, padded) if empty is not None else padded.new_empty(shape)
    patches[:, :depth].view(view.shape).copy_(view)
    if ones:
        patches[:, depth] = 1
    return patches


def _native_padding(module: nn.Module) -> bool:
    """Whether the conv's own padding argument expresses its padding (zeros, given as numbers)."""
    return module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _conv_input(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``x`` and the padding to run the conv with: native when possible, else padded beforehand."""
    if _native_padding(module):
        return x, module.padding
    return _prepad(module, x), 0


def _conv_weight_grad(
    dims: int, module: nn.Module, x: torch.Tensor, weight_shape: Sequence[int], error: torch.Tensor
) -> torch.Tensor:
    """The weight gradient of ``module``'s convolution geometry for input ``x`` and output error ``error``."""
    ready, padding = _conv_input(module, x)
    grad = (torch.nn.grad.conv1d_weight, torch.nn.grad.conv2d_weight, torch.nn.grad.conv3d_weight)[dims - 1]
    return grad(ready, tuple(weight_shape), error, module.stride, padding, module.dilation)


def _conv_input_grad(
    dims: int,
    input_shape: Sequence[int],
    weight: torch.Tensor,
    error: torch.Tensor,
    stride: Any,
    padding: Any,
    dilation: Any,
) -> torch.Tensor:
    grad = (torch.nn.grad.conv1d_input, torch.nn.grad.conv2d_input, torch.nn.grad.conv3d_input)[dims - 1]
    return grad(tuple(input_shape), weight, error, stride, padding, dilation)

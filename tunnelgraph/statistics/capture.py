"""Hooks that capture, from an ordinary forward and backward pass, what A-statistics need.

For every group: each producer's input and output, each consumer's output
error (the loss gradient at its pre-activation), and the values of the
tensors outside the group that its chain reads. Module forward hooks record
values (cloned, so in-place operations later in the forward cannot change
them) and register tensor hooks on the consumers' outputs; full backward
hooks are avoided because they break when an in-place operation follows a
layer. Values the chain reads that no module produces (``torch.cat``'s
other inputs, computed by functions) are recomputed from recorded module
outputs and the model's inputs by replaying the traced graph.

The same hooks serve a statistics pass over a data loader
(:func:`tunnelgraph.a_statistics`) and a training loop
(:class:`tunnelgraph.StatisticsTracker`).

This is the first stage of the statistics package, which flows one way:
capture (one pass over the data, recording) -> chain (a group's linear
operators on what was recorded) -> solve (exact or Lanczos) -> engine
(orchestration). It knows nothing of the later stages: what to record for
a group comes as a :class:`Tap`, which :meth:`GroupChain.tap` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Sequence

import torch
import torch.fx
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from tunnelgraph.errors import StatisticsError


@dataclass(frozen=True)
class Tap:
    """What to record for one group.

    Attributes:
        producers: (fx node, module, whether the group owns the bias) per producing layer.
        consumers: (fx node, module) per consuming layer.
        externals: fx nodes outside the group whose values its chain reads.
    """

    producers: tuple[tuple[str, nn.Module, bool], ...]
    consumers: tuple[tuple[str, nn.Module], ...]
    externals: tuple[str, ...]


def fetch(module: nn.Module, target: str) -> Any:
    """The attribute ``target`` (dotted: ``layer1.0.weight``) of ``module``, as a ``get_attr`` node reads it."""
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


@dataclass
class Capture:
    """The values of one forward/backward pass that the groups' statistics read.

    Attributes:
        inputs: producer fx node -> the layer's input.
        outputs: producer fx node -> the layer's output (pre-activation).
        errors: consumer fx node -> loss gradient at the layer's output.
        shapes: consumer fx node -> shape of the layer's input.
        gradients: producer fx node -> (channels, K_producer) gradient of the
            batch loss for the layer's inbound weights (``A 1`` of every
            channel), when the pass computed it.
        externals: fx node -> value, for nodes outside a group that its chain reads.
        batch: samples in the pass (the leading size of the model's first input).
    """

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, torch.Tensor] = field(default_factory=dict)
    externals: dict[str, Any] = field(default_factory=dict)
    batch: int = 0
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)

    def samples(self, start: int, stop: int) -> "Capture":
        """The part of the capture for samples ``start:stop`` (tensors led by the batch axis)."""

        def cut(value: Any) -> Any:
            return value[start:stop] if _led(value, self.batch) else value

        return Capture(
            {k: cut(v) for k, v in self.inputs.items()},
            {k: cut(v) for k, v in self.outputs.items()},
            {k: cut(v) for k, v in self.errors.items()},
            {k: cut(v) for k, v in self.externals.items()},
            stop - start,
            {k: (stop - start, *v[1:]) if v and v[0] == self.batch else v for k, v in self.shapes.items()},
        )


def merge(captures: list[Capture]) -> list[Capture]:
    """The captures as one capture of all their samples, or as they are where that is not exact.

    Sums over captures become sums over one larger batch: fewer and larger
    convolutions for every product with A. Each capture's errors come from
    its own batch-mean loss, so they are weighted by its share of the
    samples (the products are linear in the errors), and the merged batch's
    mean loss is the mean over every sample. Tensors led by their capture's
    batch are concatenated along it; any other value must be the same
    object in every capture (a stored tensor), else nothing is merged. The
    list is emptied as its tensors are concatenated, so the memory held
    grows by one value at a time, not by a second copy of everything.
    Inbound gradients are not merged (the engine sums them as the pass
    goes): a capture that still holds some is left as it is.
    """
    if len(captures) < 2 or any(capture.gradients for capture in captures) or not _mergeable(captures):
        return captures
    total = sum(capture.batch for capture in captures)
    merged = Capture(batch=total)
    for key in ("inputs", "outputs", "errors", "externals"):
        for name in list(getattr(captures[0], key)):
            values = [getattr(capture, key).pop(name) for capture in captures]
            if _shared(values):
                getattr(merged, key)[name] = values[0]
                continue
            if key == "errors":
                values = [value * (capture.batch / total) for value, capture in zip(values, captures)]
            getattr(merged, key)[name] = torch.cat(values)
            del values
    for name, shape in captures[0].shapes.items():
        merged.shapes[name] = (total, *shape[1:]) if shape and shape[0] == captures[0].batch else shape
    captures.clear()
    return [merged]


def _shared(values: list[Any]) -> bool:
    """Whether the values are one value (a stored tensor read by every pass, an equal number)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return all(value is first for value in values)
    return all(not isinstance(value, torch.Tensor) and value == first for value in values)


def _led(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _mergeable(captures: list[Capture]) -> bool:
    first = captures[0]
    for capture in captures[1:]:
        for key in ("inputs", "outputs", "errors", "externals", "shapes"):
            if getattr(capture, key).keys() != getattr(first, key).keys():
                return False
        for key in ("inputs", "outputs", "errors", "externals"):
            for name, value in getattr(first, key).items():
                other = getattr(capture, key)[name]
                if _shared([value, other]):
                    continue
                if not (_led(value, first.batch) and _led(other, capture.batch)):
                    return False
                if value.shape[1:] != other.shape[1:] or value.dtype != other.dtype or value.device != other.device:
                    return False
    return True


class Recorder:
    """Installs the capture hooks of some groups on a model; use as a context manager.

    After each forward and backward, :meth:`take` returns the :class:`Capture`
    and clears it for the next pass.
    """

    def __init__(
        self,
        model: nn.Module,
        source: torch.fx.GraphModule | None,
        taps: Sequence[Tap],
        *,
        graph_from_producers: bool = False,
        silent: Sequence[Tap] = (),
    ) -> None:
        """Record ``taps`` on ``model``; ``source`` is the traced module their fx node names refer to.

        ``silent`` taps are not recorded: their producers are only checked to
        run, start the graph, and are among :meth:`producer_parameters` (a
        pass that sums their inbound gradients by hooks and replays the data
        for the rest keeps none of their layers' values).

        With ``graph_from_producers``, a forward run under ``torch.no_grad()``
        (see :attr:`graph_from_producers`) turns autograd on as the first
        producer starts: the layers before it keep no graph and no saved
        activations, which no gradient the statistics need goes through.
        It applies only where every producer's parameters and the
        parameters of the consumers the pass differentiates for
        (:meth:`consumer_parameters`) need gradients (else the graph starts
        at the input as usual). A forward that turns autograd off itself
        (``torch.no_grad()`` inside the model) around a producer would have
        it turned on there: such a model is measured as if the block were
        differentiable.
        """
        self.model = model
        self.source = source
        self.handles: list[RemovableHandle] = []
        self.active = True  # when False, forwards are not recorded
        self.fx_nodes: dict[str, torch.fx.Node] = {n.name: n for n in source.graph.nodes} if source else {}
        self.placeholders = [n for n in self.fx_nodes.values() if n.op == "placeholder"]
        self.taps = tuple(taps)
        self.producers = {node: (module, bias) for tap in taps for node, module, bias in tap.producers}
        # every producer the forward must run: the recorded ones, then the silent taps'
        self.watched = dict(self.producers)
        for tap in silent:
            for node, module, bias in tap.producers:
                self.watched.setdefault(node, (module, bias))
        self.consumers = {node: module for tap in taps for node, module in tap.consumers}
        self.externals = list(dict.fromkeys(name for tap in taps for name in tap.externals))
        differentiated = [p for params in self.producer_parameters().values() for p in params]
        differentiated += self.consumer_parameters()
        self.graph_from_producers = graph_from_producers and all(p.requires_grad for p in differentiated)
        # nodes to recompute (functions), and module calls to record, for the externals
        self.replay: dict[str, torch.fx.Node] = {}
        self.recorded_calls: dict[str, list[str]] = {}  # module name -> its fx nodes in call order
        for name in self.externals:
            self._need(self.fx_nodes[name])
        for node in self.fx_nodes.values():
            if node.op == "call_module" and str(node.target) in self.recorded_calls:
                calls = self.recorded_calls[str(node.target)]
                if node.name not in calls:
                    calls.append(node.name)
        self._reset()

    def _need(self, node: torch.fx.Node) -> None:
        if node.name in self.replay:
            return
        self.replay[node.name] = node
        if node.op == "call_module":
            self.recorded_calls.setdefault(str(node.target), [])
            return
        for arg in node.all_input_nodes:
            self._need(arg)

    def _reset(self) -> None:
        self.capture = Capture()
        self.root_args: tuple[Any, ...] = ()
        self.root_kwargs: dict[str, Any] = {}
        self.module_outputs: dict[str, list[Any]] = {name: [] for name in self.recorded_calls}
        self.consumer_shapes: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self.ran: set[str] = set()  # the producers that ran in this forward

    def producer_parameters(self, nodes: Collection[str] | None = None) -> dict[str, list[torch.Tensor]]:
        """Producer fx node -> its inbound parameters (weight, then bias if the group owns one).

        Every producer recorded, or those among ``nodes``.
        """
        return {
            node: [module.weight] + ([module.bias] if bias else [])
            for node, (module, bias) in self.watched.items() if nodes is None or node in nodes
        }

    def consumer_parameters(self, covered: Collection[str] = ()) -> list[torch.Tensor]:
        """A parameter of each consumer of every group none of whose producers is in ``covered``.

        A backward pass that differentiates for them computes the error at
        each of those consumers' outputs, which the recorder keeps, and goes
        no further back than that. The parameter is the consumer's bias where
        it has a trainable one (its gradient is a sum of the error), else its
        weight (whose gradient costs about what the input gradient would).
        The consumers of a group with a producer in ``covered`` need none:
        differentiating for that producer's parameters already carries the
        error through them.
        """
        chosen: dict[int, torch.Tensor] = {}
        for tap in self.taps:
            if any(node in covered for node, _, _ in tap.producers):
                continue
            for _, module in tap.consumers:
                bias = getattr(module, "bias", None)
                parameter = bias if isinstance(bias, torch.Tensor) and bias.requires_grad else module.weight
                chosen.setdefault(id(parameter), parameter)
        return list(chosen.values())

    # -- hooks ---------------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        self.handles.append(self.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        for node, (module, _) in self.watched.items():
            self.handles.append(module.register_forward_hook(self._producer_hook(node, record=node in self.producers)))
            if self.graph_from_producers:
                self.handles.append(module.register_forward_pre_hook(self._start_graph))
        for node, consumer in self.consumers.items():
            self.handles.append(consumer.register_forward_hook(self._consumer_hook(node)))
        for name in self.recorded_calls:
            self.handles.append(self.model.get_submodule(name).register_forward_hook(self._module_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _on_model(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._reset()
        self.root_args, self.root_kwargs = args, kwargs
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.capture.batch = int(first.shape[0]) if first is not None and first.dim() else 1

    def _start_graph(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.active:
            torch.set_grad_enabled(True)  # the enclosing no_grad() restores the caller's mode on exit

    def _producer_hook(self, node: str, record: bool = True):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if not self.active:
                return
            self.ran.add(node)
            if not record:
                return
            self.capture.inputs[node] = args[0].detach().clone()
            self.capture.outputs[node] = output.detach().clone()

        return hook

    def _consumer_hook(self, node: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if not self.active:
                return
            self.consumer_shapes[node] = (output.shape, output.dtype, output.device)
            self.capture.shapes[node] = tuple(args[0].shape)
            if output.requires_grad:
                # a tensor hook sees the gradient of this value even if an in-place op follows
                output.register_hook(lambda grad: self.capture.errors.__setitem__(node, grad.detach()))

        return hook

    def _module_hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.active:
                return
            value = output.detach().clone() if isinstance(output, torch.Tensor) else output
            self.module_outputs[name].append(value)

        return hook

    # -- after the backward pass ---------------------------------------------------------
    def discard(self) -> None:
        """Forget what the last pass recorded."""
        self._reset()

    def take(self) -> Capture:
        """The capture of the last forward and backward pass; the recorder is cleared."""
        capture = self.capture
        missing = [node for node in self.watched if node not in self.ran]
        if missing or (self.consumers and not self.consumer_shapes):
            raise StatisticsError(
                f"the forward pass did not run layer(s) {', '.join(missing) or 'of the sites'}; pass "
                "the model the sites were found on, and batches its forward accepts"
            )
        for node in self.consumers:
            if node not in capture.errors:
                # the loss does not depend on this consumer: its error is zero
                shape, dtype, device = self.consumer_shapes[node]
                capture.errors[node] = torch.zeros(shape, dtype=dtype, device=device)
        with torch.no_grad():
            values: dict[str, Any] = {}
            for name in self.externals:
                capture.externals[name] = self._value(self.fx_nodes[name], values)
        self._reset()
        return capture

    def _value(self, node: torch.fx.Node, values: dict[str, Any]) -> Any:
        if node.name in values:
            return values[node.name]
        if node.op == "placeholder":
            index = self.placeholders.index(node)
            if index < len(self.root_args):
                value = self.root_args[index]
            else:
                value = self.root_kwargs.get(str(node.target), node.args[0] if node.args else None)
            value = value.detach() if isinstance(value, torch.Tensor) else value
        elif node.op == "get_attr":
            value = fetch(self.source, str(node.target))
        elif node.op == "call_module":
            calls = self.recorded_calls[str(node.target)]
            outputs = self.module_outputs[str(node.target)]
            index = calls.index(node.name)
            if index >= len(outputs):
                raise StatisticsError(f"module '{node.target}' did not run in the forward pass")
            value = outputs[index]
        else:
            args = torch.fx.node.map_arg(node.args, lambda arg: self._value(arg, values))
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda arg: self._value(arg, values))
            if node.op == "call_function":
                value = node.target(*args, **kwargs)  # type: ignore[operator]
            else:
                value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        values[node.name] = value
        return value

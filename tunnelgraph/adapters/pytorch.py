"""The PyTorch adapter: torch.fx in, parameters edited by name, modules out."""

from __future__ import annotations

import copy
import logging
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from tunnelgraph.adapters import Adapter, Dims
from tunnelgraph.analysis.groups import THROUGH_OPTIONS, ChannelGroup, ParamSlice, channel_groups
from tunnelgraph.analysis.reducibility import UnitMeasures
from tunnelgraph.backends.pytorch import apply_plan, constant_bias_shift, consumer_inputs, weights_of
from tunnelgraph.frontends.fx import Frontend, trace as capture
from tunnelgraph.ir import Graph
from tunnelgraph.rewrite import edits
from tunnelgraph.rewrite.passes import RewriteRecord
from tunnelgraph.rewrite.plan import RewritePlan, plan_edit
from tunnelgraph.runtime import flatten_outputs, perturbed, preserved, unwrap_model

logger = logging.getLogger(__name__)


RECORDS_ATTRIBUTE = "tunnelgraph_records"
"""The module attribute that holds the rewrite records (a list of JSON-ready dicts)."""


class TorchAdapter(Adapter[nn.Module]):
    """An ``nn.Module`` (wrappers unwrapped). Rewrites return new modules of the same classes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(unwrap_model(model))

    def of(self, model: nn.Module) -> "TorchAdapter":
        return TorchAdapter(model)

    def graph(self, example_inputs: Any | None = None) -> Graph:
        inputs = self.example_inputs(example_inputs)
        return confirm_capture(self.model, capture(self.model, inputs), inputs)

    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        tensors = [*self.model.named_parameters(remove_duplicate=False), *self.model.named_buffers(remove_duplicate=False)]
        return {name: tuple(tensor.shape) for name, tensor in tensors}

    def weights(self) -> Mapping[str, np.ndarray]:
        return weights_of(self.model)

    def copy(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def apply(self, plan: RewritePlan, *, inplace: bool = False) -> nn.Module:
        return apply_plan(self.model, plan, inplace=inplace)


    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def example_inputs(self, given: Any | None) -> Any:
        if given is None:
            raise ValueError(
                "example_inputs are required to trace a PyTorch model: pass a tensor (or a tuple of "
                "tensors) of the shape the model's forward expects"
            )
        return given

    def unit_measures(
        self, groups: Sequence[ChannelGroup], data: Iterable[Any], *, batches: int | None, progress: bool | None
    ) -> dict[str, UnitMeasures]:
        from tunnelgraph.statistics.activity import unit_measures

        return unit_measures(self.model, groups, data, batches=batches, progress=progress)

    def consumer_values(self, layers: Sequence[str], example_inputs: Any) -> Mapping[str, Any]:
        return consumer_inputs(self.model, list(layers), _as_tuple(example_inputs))

    def bias_shift(self, weight_slice: ParamSlice, channel: int, values: Any, offset: float | None) -> np.ndarray:
        module = self.model.get_submodule(weight_slice.module)
        shift: np.ndarray = constant_bias_shift(module, weight_slice, channel, values, offset)
        return shift

    def records(self) -> list[RewriteRecord]:
        return [RewriteRecord.from_dict(entry) for entry in getattr(self.model, RECORDS_ATTRIBUTE, [])]

    def with_records(self, model: nn.Module, records: Sequence[RewriteRecord]) -> nn.Module:
        entries = list(getattr(self.model, RECORDS_ATTRIBUTE, [])) + [record.to_dict() for record in records]
        setattr(model, RECORDS_ATTRIBUTE, entries)
        return model

    def add_to_biases(self, model: nn.Module, shifts: Mapping[str, np.ndarray]) -> nn.Module:
        with torch.no_grad():
            for layer, delta in shifts.items():
                bias = model.get_parameter(f"{layer}.bias")
                bias.add_(torch.as_tensor(delta, dtype=bias.dtype, device=bias.device))
        return model

    def run(self, inputs: Sequence[Any]) -> Any:
        with preserved(self.model), torch.no_grad():
            return self.model(*inputs)

    def declared_inputs(self) -> list[tuple[str, Dims | None]] | None:
        return None

    def save(self, path: str | os.PathLike[str], example_inputs: Any | None) -> None:
        if str(path).endswith(".onnx"):
            from tunnelgraph.backends.onnx_export import export_onnx

            export_onnx(self.model, self.example_inputs(example_inputs), path)
        else:
            torch.save(self.model, path)


def trace(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    concrete_args: dict[str, Any] | None = None,
    tracer: torch.fx.Tracer | None = None,
    frontend: Frontend = "auto",
) -> Graph:
    """``tg.trace``: the model's graph, captured as :func:`tunnelgraph.frontends.fx.trace` does.

    The arguments and errors are that function's. A ``torch.export``
    capture's groups are then confirmed by trial rewrites
    (:func:`confirm_capture`), so that its graph calls no group legal whose
    rewrite would change the function.
    """
    graph = capture(model, example_inputs, concrete_args=concrete_args, tracer=tracer, frontend=frontend)
    return confirm_capture(model, graph, example_inputs)


def confirm_capture(model: nn.Module, graph: Graph, example_inputs: Any) -> Graph:
    """``graph``, with its legal groups confirmed by trial rewrites where its capture needs it.

    ``torch.export`` specialises the forward to the example shapes, so an
    operation that does nothing at those shapes (a slice ``x[:, :C]`` of all
    ``C`` channels) leaves no node, and the rules cannot see that a wider
    group would not pass it. Each group that is legal with every
    ``through=`` option is therefore opened once on a perturbed float64
    copy of ``model`` (its first channel cloned with lambda 0.3), in eval
    mode, and the outputs compared on the example inputs; a group whose
    clone changes them by more than 1e-6 of the output's largest magnitude
    (1e-2 for a model that does not run in float64), or does not run, is
    recorded in :attr:`Graph.refused` with the reason, and the rules block
    it. ``model`` is not modified. An fx capture sees every operation: its
    graph comes back as it is.
    """
    if graph.frontend != "export":
        return graph
    legal = [group for group in channel_groups(graph, THROUGH_OPTIONS) if group.legal]
    if not legal:
        return graph
    inputs = _as_tuple(example_inputs)
    probe = perturbed(model, generator=torch.Generator().manual_seed(0)).eval()
    limit = 1e-6
    try:  # in float64, where the model runs in it: an exact clone then changes nothing above 1e-12
        wide = copy.deepcopy(probe).double()
        args = tuple(t.double() if t.is_floating_point() else t for t in inputs)
        reference = _outputs(wide, args)
        probe = wide
    except Exception:  # a forward written for one dtype: its own, and a limit above float32 rounding
        args, limit = inputs, 1e-2
        reference = _outputs(probe, args)
    for group in legal:
        try:
            opened = apply_plan(probe, plan_edit(group, edits.clone(group.size, 0, 0.3)), inplace=False)
            change = _relative_change(reference, _outputs(opened, args))
        except Exception as error:  # the clone does not even run
            logger.debug("trial clone of %s failed: %s", group.name, error)
            change = math.inf
        if change > limit:
            logger.info("group %s of the torch.export capture is blocked: a trial clone changed the output by %.1e",
                        group.name, change)
            graph.refused[group.name] = (
                f"a trial clone of this group changed the output by {change:.1e} (relative): torch.export "
                "captured the forward at the example shapes, where an operation on these channels (such as a "
                "slice of all of them) does nothing and leaves no node; trace with fx (concrete_args= or a "
                "tracer) to see it"
            )
    return graph


def _outputs(model: nn.Module, args: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The model's outputs in eval mode on copies of ``args`` (a forward may write into its input)."""
    with torch.no_grad():
        return flatten_outputs(model.eval()(*(t.clone() for t in args)))


def _relative_change(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """The largest output change over the largest output magnitude (inf when the outputs do not match)."""
    if len(reference) != len(outputs) or any(a.shape != b.shape for a, b in zip(reference, outputs)):
        return math.inf
    scale = max((float(a.abs().max()) for a in reference if a.numel()), default=0.0)
    change = max((float((a - b).abs().max()) for a, b in zip(reference, outputs) if a.numel()), default=0.0)
    return change / scale if scale > 0 else change


def _as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)

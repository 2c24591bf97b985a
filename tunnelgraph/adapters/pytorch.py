"""The PyTorch adapter: torch.fx in, parameters edited by name, modules out."""

from __future__ import annotations

import copy
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from tunnelgraph.adapters import Adapter, Dims
from tunnelgraph.analysis.groups import ChannelGroup, ParamSlice
from tunnelgraph.analysis.reducibility import UnitMeasures
from tunnelgraph.backends.pytorch import apply_plan, constant_bias_shift, consumer_inputs, weights_of
from tunnelgraph.frontends.fx import trace
from tunnelgraph.ir import Graph
from tunnelgraph.rewrite.passes import RewriteRecord
from tunnelgraph.rewrite.plan import RewritePlan
from tunnelgraph.runtime import preserved, unwrap_model


RECORDS_ATTRIBUTE = "tunnelgraph_records"
"""The module attribute that holds the rewrite records (a list of JSON-ready dicts)."""


class TorchAdapter(Adapter[nn.Module]):
    """An ``nn.Module`` (wrappers unwrapped). Rewrites return new modules of the same classes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(unwrap_model(model))

    def of(self, model: nn.Module) -> "TorchAdapter":
        return TorchAdapter(model)

    def graph(self, example_inputs: Any | None = None) -> Graph:
        return trace(self.model, self.example_inputs(example_inputs))

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


def _as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)

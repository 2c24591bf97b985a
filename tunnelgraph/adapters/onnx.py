"""The ONNX adapter: a ``ModelProto`` read once, initializers edited, onnxruntime to run.

Nothing here imports torch until a model must run (verification, the
constant values a reduction folds into biases, which are read through
:func:`tunnelgraph.to_torch`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from tunnelgraph.adapters import Adapter, Dims
from tunnelgraph.analysis.groups import ChannelGroup, ParamSlice
from tunnelgraph.analysis.reducibility import UnitMeasures
from tunnelgraph.backends.onnx import apply_plan_onnx, initializer_arrays, random_inputs, run_onnx, save_onnx
from tunnelgraph.errors import RewriteError
from tunnelgraph.frontends.onnx import OnnxSource, load_onnx, read_onnx, value_dims
from tunnelgraph.ir import Graph
from tunnelgraph.rewrite.passes import RewriteRecord
from tunnelgraph.rewrite.plan import RewritePlan

import onnx  # noqa: E402 - after tunnelgraph's ONNX modules, which name the extra when onnx is missing
from onnx import numpy_helper  # noqa: E402


RECORDS_KEY = "tunnelgraph.records"
"""The ``metadata_props`` key that holds the rewrite records (JSON)."""


def _stored_records(model: onnx.ModelProto) -> list[dict[str, Any]]:
    for prop in model.metadata_props:
        if prop.key == RECORDS_KEY:
            entries: list[dict[str, Any]] = json.loads(prop.value)
            return entries
    return []


class OnnxAdapter(Adapter[onnx.ModelProto]):
    """An ONNX model. Rewrites return new ``ModelProto``s, or edit the given one with ``inplace=True``."""

    def __init__(self, model: onnx.ModelProto, given: onnx.ModelProto | None = None) -> None:
        """``model`` in the form :func:`~tunnelgraph.frontends.onnx.read_onnx` returns; ``given``: the
        ``ModelProto`` it was read from, when that is another object (an in-place rewrite edits ``given``)."""
        super().__init__(model)
        self._given = given if given is not model else None
        self._file: str | None = None  # the .onnx file the model was read from, while it is unchanged
        self._graph: Graph | None = None
        self._view: Any = None

    @classmethod
    def read(cls, source: OnnxSource) -> "OnnxAdapter":
        """The adapter of a ``ModelProto``, or of an ``.onnx`` file (path or bytes) read safely once."""
        adapter = cls(read_onnx(source)[0], source if isinstance(source, onnx.ModelProto) else None)
        if isinstance(source, (str, os.PathLike)):
            adapter._file = str(source)
        return adapter

    @property
    def name(self) -> str:
        return self.model.graph.name or "the ONNX model"

    def of(self, model: onnx.ModelProto) -> "OnnxAdapter":
        return OnnxAdapter(model)

    def graph(self, example_inputs: Any | None = None) -> Graph:
        if self._graph is None:
            self._graph = load_onnx(self.model)
        return self._graph

    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        return {t.name: tuple(t.dims) for t in self.model.graph.initializer}

    def weights(self) -> Mapping[str, np.ndarray]:
        return initializer_arrays(self.model)

    def copy(self) -> onnx.ModelProto:
        result = onnx.ModelProto()
        result.CopyFrom(self.model)
        return result

    def apply(self, plan: RewritePlan, *, inplace: bool = False) -> onnx.ModelProto:
        """The rewritten model; with ``inplace`` the given ``ModelProto`` itself, edited.

        In place, only the edited initializers are replaced (no copy of the
        model: the form for successive rewrites of a model over 2 GiB). A
        given model that :func:`~tunnelgraph.frontends.onnx.read_onnx` had to
        convert (constants computed by nodes, initializers read twice) takes
        the converted, rewritten model's content once. A model read from a
        path or bytes is rewritten as loaded; the file is not written.
        """
        result = apply_plan_onnx(self.model, plan, inplace=inplace)
        if not inplace:
            return result
        if self._given is not None:
            self._given.CopyFrom(result)
            self.model, self._given = self._given, None
        self._graph = self._view = self._file = None  # of the model before the rewrite
        return self.model

    def parameter_count(self) -> int:
        return sum(math.prod(t.dims) for t in self.model.graph.initializer)

    def example_inputs(self, given: Any | None) -> Any:
        if given is not None:
            return given
        import torch

        tensors = tuple(torch.from_numpy(array) for array in random_inputs(self.model))
        return tensors[0] if len(tensors) == 1 else tensors

    def unit_measures(
        self, groups: Sequence[ChannelGroup], data: Iterable[Any], *, batches: int | None, progress: bool | None
    ) -> dict[str, UnitMeasures]:
        raise TypeError(
            "empirical measures (data=) run PyTorch models; convert the ONNX model with tg.to_torch first"
        )

    def _torch_view(self) -> Any:
        if self._view is None:
            from tunnelgraph.backends.onnx_torch import to_torch

            self._view = to_torch(self.model)
        return self._view

    def consumer_values(self, layers: Sequence[str], example_inputs: Any) -> Mapping[str, Any]:
        import torch

        from tunnelgraph.backends.onnx_torch import torch_name
        from tunnelgraph.backends.pytorch import consumer_inputs

        inputs = self.example_inputs(example_inputs)
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        seen = consumer_inputs(self._torch_view(), [torch_name(layer) for layer in layers], inputs)
        return {layer: seen[torch_name(layer)] for layer in layers}

    def bias_shift(self, weight_slice: ParamSlice, channel: int, values: Any, offset: float | None) -> np.ndarray:
        from tunnelgraph.backends.onnx_torch import torch_name
        from tunnelgraph.backends.pytorch import constant_bias_shift

        self._bias(self.graph(), weight_slice.module)  # a consumer without bias initializer: refused
        module = self._torch_view().get_submodule(torch_name(weight_slice.module))
        shift: np.ndarray = constant_bias_shift(module, weight_slice, channel, values, offset)
        return shift

    def records(self) -> list[RewriteRecord]:
        return [RewriteRecord.from_dict(entry) for entry in _stored_records(self.model)]

    def with_records(self, model: onnx.ModelProto, records: Sequence[RewriteRecord]) -> onnx.ModelProto:
        entries = _stored_records(self.model) + [record.to_dict() for record in records]
        kept = [prop for prop in model.metadata_props if prop.key != RECORDS_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        model.metadata_props.add(key=RECORDS_KEY, value=json.dumps(entries))
        return model

    def add_to_biases(self, model: onnx.ModelProto, shifts: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        if not shifts:
            return model
        graph = load_onnx(model)
        biases = {}
        for layer, delta in shifts.items():
            name, scale = self._bias(graph, layer)
            biases[name] = delta / scale
        for tensor in model.graph.initializer:
            if tensor.name in biases:
                array = numpy_helper.to_array(tensor)
                updated = (array + biases[tensor.name]).astype(array.dtype)
                tensor.CopyFrom(numpy_helper.from_array(updated, tensor.name))
        return model

    @staticmethod
    def _bias(graph: Graph, layer: str) -> tuple[str, float]:
        """The initializer holding ``layer``'s bias, and the factor the layer multiplies it by (Gemm's beta)."""
        node = next((n for n in graph if n.module == layer and "bias" in n.params), None)
        if node is None:
            raise RewriteError(f"consumer '{layer}' has no bias initializer to take the constant")
        return node.params["bias"].name, float(node.attrs.get("bias_scale", 1.0))

    def run(self, inputs: Sequence[Any]) -> Any:
        import torch

        # a model read from a file runs from it: one over 2 GiB is not written to a temporary file again
        outputs = run_onnx(self._file or self.model, [a.detach().cpu().numpy() for a in inputs])
        return [torch.from_numpy(output) for output in outputs]

    def declared_inputs(self) -> list[tuple[str, Dims | None]] | None:
        initializers = {tensor.name for tensor in self.model.graph.initializer}
        return [
            (value.name, value_dims(value)) for value in self.model.graph.input if value.name not in initializers
        ]

    def save(self, path: str | os.PathLike[str], example_inputs: Any | None) -> None:
        if not str(path).endswith(".onnx"):
            raise ValueError("an ONNX model is written to an .onnx file: use a path ending in .onnx")
        save_onnx(self.model, path)

"""ONNX backend: apply a :class:`RewritePlan` to an ``onnx.ModelProto``; run models in onnxruntime.

Rewrites edit initializers with numpy in float64 (the per-tensor edit the
torch backend uses too, :func:`~tunnelgraph.rewrite.plan.edit_array`), update
the ``group`` attribute of depthwise convolutions and the shape tensors of
reshapes that hard-code a width, drop inferred intermediate shapes (they
are stale), and check the result with
``onnx.checker.check_model(full_check=True)``. The input model is modified
only by an in-place rewrite (``inplace=True``), and never by a failing one.
This module does not import torch.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tunnelgraph.errors import RewriteError, missing_onnx

try:
    import onnx
    from onnx import numpy_helper
except ImportError as error:  # the optional extra is not installed
    raise missing_onnx(error) from error

from tunnelgraph.analysis.groups import ChannelGroup
from tunnelgraph.frontends.onnx import PROTOBUF_LIMIT as SERIALISABLE, tensor_bytes, tensor_size
from tunnelgraph.rewrite.plan import NUMPY_OPS, RewritePlan, TensorEdit, check_shapes, edit_array

logger = logging.getLogger(__name__)



def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer as a float64 array, by name (the analysis' view of the weights)."""
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def check_fits(model: onnx.ModelProto, group: ChannelGroup) -> None:
    """Raise :class:`SiteError` unless ``model``'s initializers have the shapes ``group`` expects."""
    check_shapes(group, {t.name: tuple(t.dims) for t in model.graph.initializer})


def apply_plan_onnx(model: onnx.ModelProto, plan: RewritePlan, *, inplace: bool = False) -> onnx.ModelProto:
    """The rewritten copy of ``model``, or ``model`` itself rewritten when ``inplace`` (see the module docstring).

    Memory: the edited initializers are computed one at a time before
    anything changes; a copy then takes every other initializer over once
    (never a copy of the whole model followed by edits), and an in-place
    rewrite replaces only the edited ones. Either way a failing call leaves
    ``model`` as it was: an in-place rewrite that the checker rejects is
    undone.
    """
    check_fits(model, plan.group)
    replaced = _edited_tensors(model, plan)
    if plan.literals:
        replaced.update(_patched_reshapes(model, plan))
    size = plan.result.size
    depthwise = {s.param for s in plan.result.slices if s.role == "channelwise"}
    if inplace:
        result, undo = model, _Undo(model, replaced)
        for tensor in result.graph.initializer:
            if tensor.name in replaced:
                tensor.CopyFrom(replaced.pop(tensor.name))
    else:
        result, undo = _copy_replacing(model, replaced), None
    del replaced
    for node in result.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in depthwise:
            for attribute in node.attribute:
                if attribute.name == "group":
                    attribute.i = size
    del result.graph.value_info[:]
    if is_large(result):
        logger.warning(
            "the rewritten model is over 2 GB, too large for the in-memory ONNX checker; save it with "
            "onnx.save(model, path, save_as_external_data=True) and check the file"
        )
        return result
    try:
        onnx.checker.check_model(result, full_check=True)
    except Exception as error:
        if undo is not None:
            undo.restore()
        raise RewriteError(f"the rewritten ONNX model does not check: {error}") from error
    return result


def _edited_tensors(model: onnx.ModelProto, plan: RewritePlan) -> dict[str, onnx.TensorProto]:
    """The new initializers of the tensors ``plan`` edits, by name, each back in its own dtype.

    One tensor at a time: its float64 working copies are released before the next is edited.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    edits: dict[str, list[TensorEdit]] = {}
    for tensor_edit in plan.tensors:  # a tensor's edits in plan order; different tensors are independent
        edits.setdefault(tensor_edit.slice.param, []).append(tensor_edit)
    replaced = {}
    for name, tensor_edits in edits.items():
        original = numpy_helper.to_array(initializers[name])
        array = np.asarray(original, dtype=np.float64)
        dtype = original.dtype
        del original
        for tensor_edit in tensor_edits:
            array = edit_initializer(array, tensor_edit)
        replaced[name] = numpy_helper.from_array(array.astype(dtype), name)
        del array
    return replaced


def _copy_replacing(model: onnx.ModelProto, replaced: dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``replaced`` are those (taken out of ``replaced``)."""
    result = _shell(model)
    for tensor in model.graph.initializer:
        result.graph.initializer.append(replaced.pop(tensor.name) if tensor.name in replaced else tensor)
    return result


class _Undo:
    """What an in-place rewrite changes in ``model`` (the replaced initializers, the depthwise
    groups, the inferred shapes), saved before it changes, to put back when the result does not check."""

    def __init__(self, model: onnx.ModelProto, replaced: dict[str, onnx.TensorProto]) -> None:
        self.model = model
        self.tensors = {}
        for tensor in model.graph.initializer:
            if tensor.name in replaced:
                self.tensors[tensor.name] = saved = onnx.TensorProto()
                saved.CopyFrom(tensor)
        self.groups = [(attribute, attribute.i) for node in model.graph.node if node.op_type == "Conv"
                       for attribute in node.attribute if attribute.name == "group"]
        self.value_info = [copy.deepcopy(value) for value in model.graph.value_info]

    def restore(self) -> None:
        for tensor in self.model.graph.initializer:
            if tensor.name in self.tensors:
                tensor.CopyFrom(self.tensors[tensor.name])
        for attribute, value in self.groups:
            attribute.i = value
        del self.model.graph.value_info[:]
        self.model.graph.value_info.extend(self.value_info)


def _patched_reshapes(model: onnx.ModelProto, plan: RewritePlan) -> dict[str, onnx.TensorProto]:
    """The new shape tensors of the reshapes that hard-code the group's width, by name (``model`` unchanged)."""
    by_output = {node.output[0]: node for node in model.graph.node}
    initializers = {t.name: t for t in model.graph.initializer}
    patched: dict[str, np.ndarray] = {}
    for old, new in zip(plan.group.literals, plan.literals):
        node = by_output.get(new.node)
        if node is None or node.op_type != "Reshape" or node.input[1] not in initializers:
            raise RewriteError(f"cannot find the shape tensor of reshape '{new.node}' to update its width")
        name = node.input[1]
        values = patched[name] if name in patched else numpy_helper.to_array(initializers[name]).copy()
        index = new.path[-1]
        if int(values[index]) != old.value:
            raise RewriteError(f"reshape '{new.node}' has width {int(values[index])}, expected {old.value}")
        values[index] = new.value
        patched[name] = values
    return {name: numpy_helper.from_array(values, name) for name, values in patched.items()}


def edit_initializer(array: np.ndarray, tensor_edit: TensorEdit) -> np.ndarray:
    """The rewritten copy of one initializer's array, computed in float64 (the caller casts it back)."""
    return edit_array(np.asarray(array, dtype=np.float64), tensor_edit, NUMPY_OPS)


def is_large(proto: onnx.ModelProto) -> bool:
    """Whether ``proto`` is too large to serialise as one protobuf message (:data:`tunnelgraph.frontends.onnx.PROTOBUF_LIMIT`, read here as ``SERIALISABLE``)."""
    return tensor_bytes(proto) > SERIALISABLE


def save_onnx(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Write ``proto`` to ``path``; a large model with its tensors in ``<file name>.data`` beside it.

    ``proto`` itself is not changed. A large model is written one
    initializer at a time: its tensors' bytes go straight to the data file,
    and only a shell of the model (its graph, with initializers that say
    where their data lies) is built and saved, so writing costs the memory
    of one tensor, not of a second copy of the model.
    """
    if not is_large(proto):
        onnx.save(proto, os.fspath(path))
        return
    location = Path(path).name + ".data"
    shell = _shell(proto)
    with open(Path(path).parent / location, "wb") as data:  # replaced, never appended to
        for tensor in proto.graph.initializer:
            entry = shell.graph.initializer.add()
            if tensor.data_type == onnx.TensorProto.STRING or tensor_size(tensor) < _EXTERNAL_THRESHOLD:
                entry.CopyFrom(tensor)
                continue
            entry.name, entry.data_type = tensor.name, tensor.data_type
            entry.dims.extend(tensor.dims)
            payload = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            data.seek(-data.tell() % _ALIGNMENT, os.SEEK_CUR)  # aligned, as onnx writes it
            offset = data.tell()
            data.write(payload)
            entry.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(payload)))):
                entry.external_data.add(key=key, value=value)
    onnx.save(shell, os.fspath(path))


def _shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new ``ModelProto`` with every field of ``model`` but the graph's initializers (no tensor data copied)."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip="graph")
    _copy_fields(model.graph, shell.graph, skip="initializer")
    return shell


def _copy_fields(source: Any, target: Any, skip: str) -> None:
    """Copy every field of protobuf message ``source`` into ``target`` but ``skip``."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        repeated = descriptor.is_repeated if hasattr(descriptor, "is_repeated") else (
            descriptor.label == descriptor.LABEL_REPEATED)  # protobuf before 5 has only the label
        if repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


_EXTERNAL_THRESHOLD = 1024
"""Tensors smaller than this many bytes stay in the model file (as ``onnx.save_model``'s ``size_threshold``)."""
_ALIGNMENT = 4096


def run_onnx(model: onnx.ModelProto | str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` in onnxruntime (CPU, or CUDA when available; graph optimisations off).

    ``model`` is a model, or the path of an ``.onnx`` file (whose external
    data onnxruntime reads from its folder: the form for models over 2 GiB).
    """
    try:
        import onnxruntime as ort
    except ImportError as error:  # pragma: no cover - the ort extra is part of the test install
        raise RewriteError("running ONNX models needs onnxruntime: pip install 'tunnelgraph[ort]'") from error
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    if not isinstance(model, str) and is_large(model):
        # past 2 GiB protobuf cannot serialise the model: onnxruntime reads it from a file with external data
        with tempfile.TemporaryDirectory(prefix="tunnelgraph-onnx-") as folder:
            path = os.path.join(folder, "model.onnx")
            save_onnx(model, path)
            return run_onnx(path, inputs)
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=providers)
    del source  # onnxruntime holds its own copy of the weights: the serialised bytes can go before it runs
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the ONNX model takes {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}")
    feed: dict[str, Any] = {}
    for value, meta in zip(inputs, session.get_inputs()):
        array = np.asarray(value)
        if "float16" in meta.type:
            array = array.astype(np.float16)
        elif "double" in meta.type:
            array = array.astype(np.float64)
        elif "float" in meta.type:
            array = array.astype(np.float32)
        feed[meta.name] = array
    return list(session.run(None, feed))


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> list[np.ndarray]:
    """Standard-normal float32 arrays of the model's declared input shapes (unknown dimensions: 1)."""
    generator = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    arrays = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]
        arrays.append(generator.standard_normal(dims).astype(np.float32))
    return arrays

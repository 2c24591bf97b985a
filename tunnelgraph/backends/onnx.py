"""ONNX backend: apply a :class:`RewritePlan` to an ``onnx.ModelProto``; run models in onnxruntime.

Rewrites edit initializers with numpy in float64 (the per-tensor edit the
torch backend uses too, :func:`~tunnelgraph.rewrite.plan.edit_array`), update
the ``group`` attribute of depthwise convolutions and the shape tensors of
reshapes that hard-code a width, drop inferred intermediate shapes (they
are stale), and check the result with
``onnx.checker.check_model(full_check=True)``. The input model is never
modified. This module does not import torch.
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


def apply_plan_onnx(model: onnx.ModelProto, plan: RewritePlan) -> onnx.ModelProto:
    """The rewritten copy of ``model`` (see the module docstring)."""
    check_fits(model, plan.group)
    arrays = {t.name: t for t in model.graph.initializer}
    new_arrays: dict[str, np.ndarray] = {}
    for tensor_edit in plan.tensors:
        name = tensor_edit.slice.param
        new_arrays[name] = edit_initializer(
            new_arrays[name] if name in new_arrays else numpy_helper.to_array(arrays[name]), tensor_edit
        )
    result = copy.deepcopy(model)
    for tensor in result.graph.initializer:
        if tensor.name in new_arrays:
            tensor.CopyFrom(numpy_helper.from_array(new_arrays[tensor.name].astype(
                numpy_helper.to_array(arrays[tensor.name]).dtype), tensor.name))
    size = plan.result.size
    depthwise = {s.param for s in plan.result.slices if s.role == "channelwise"}
    for node in result.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in depthwise:
            for attribute in node.attribute:
                if attribute.name == "group":
                    attribute.i = size
    if plan.literals:
        _patch_reshapes(result, plan)
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
        raise RewriteError(f"the rewritten ONNX model does not check: {error}") from error
    return result


def _patch_reshapes(model: onnx.ModelProto, plan: RewritePlan) -> None:
    by_output = {node.output[0]: node for node in model.graph.node}
    initializers = {t.name: t for t in model.graph.initializer}
    for old, new in zip(plan.group.literals, plan.literals):
        node = by_output.get(new.node)
        if node is None or node.op_type != "Reshape" or node.input[1] not in initializers:
            raise RewriteError(f"cannot find the shape tensor of reshape '{new.node}' to update its width")
        tensor = initializers[node.input[1]]
        values = numpy_helper.to_array(tensor).copy()
        index = new.path[-1]
        if int(values[index]) != old.value:
            raise RewriteError(f"reshape '{new.node}' has width {int(values[index])}, expected {old.value}")
        values[index] = new.value
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


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
    shell = onnx.ModelProto()
    _copy_fields(proto, shell, skip="graph")
    _copy_fields(proto.graph, shell.graph, skip="initializer")
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

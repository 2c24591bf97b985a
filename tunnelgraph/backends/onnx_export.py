"""PyTorch to ONNX: export a model, keep its layers as they are, and check it in onnxruntime.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) runs first,
with constant folding but without the exporter's graph fusions (which fold
batch norm into convolutions and would change which parameters a site
owns); constants become initializers and all-zero conv biases are dropped,
so the ONNX model has the same layers, parameters and sites as the PyTorch
model. When the dynamo exporter fails, the TorchScript exporter runs
instead (with a logged warning). Either way the exported model is compared
with the PyTorch model in onnxruntime before it is written, and a mismatch
raises.

Protocol buffers cannot serialise a message over 2 GiB. A model whose
tensors exceed :data:`PROTOBUF_LIMIT` (regnet_y_128gf, vit_h_14) is
therefore checked and written with its tensors as ONNX external data: one
file ``<name>.onnx.data`` beside ``<name>.onnx``, which
:func:`tunnelgraph.load_onnx` and onnxruntime read back from that folder.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from tunnelgraph.errors import RewriteError, missing_onnx

try:
    import onnx
    from onnx import numpy_helper
except ImportError as error:  # the optional extra is not installed
    raise missing_onnx(error) from error

from tunnelgraph.backends.onnx import is_large, save_onnx  # noqa: E402 (after the onnx check)
from tunnelgraph.frontends.onnx import PROTOBUF_LIMIT, tensor_bytes  # noqa: E402
from tunnelgraph.runtime import preserved

logger = logging.getLogger(__name__)

ExampleInputs = Union[torch.Tensor, Sequence[torch.Tensor]]



def export_onnx(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike | None = None,
    *,
    opset: int = 18,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> onnx.ModelProto:
    """Export ``model`` to ONNX, check it against PyTorch in onnxruntime, and write it to ``path``.

    Args:
        model: the network (exported in eval mode; its training flags are restored).
        example_inputs: inputs of its forward; the ONNX model has their shapes.
        path: where to write the ``.onnx`` file (nothing is written if None).
        opset: the ONNX opset.
        rtol, atol: the largest allowed output difference, ``atol + rtol * max|torch output|``.

    Returns:
        The ONNX model.

    Raises:
        RewriteError: both exporters failed, or onnxruntime's outputs differ
            from PyTorch's beyond the tolerance (nothing is written then).
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    names = [f"input_{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    with preserved(model, train=False), tempfile.TemporaryDirectory(prefix="tunnelgraph-onnx-") as folder:
        try:
            proto = _dynamo(model, inputs, names, opset)
        except Exception as error:  # the exporter raises many kinds of errors
            logger.warning(
                "the dynamo ONNX exporter failed (%s: %s); falling back to the TorchScript exporter",
                type(error).__name__, str(error).splitlines()[0] if str(error) else "",
            )
            proto = _torchscript(model, inputs, names, opset, Path(folder))
        if is_large(proto):  # checked and run from a file with external data: it cannot be serialised
            logger.info("the ONNX model holds %.2f GiB of tensors: using external data", tensor_bytes(proto) / 2**30)
            checked = Path(folder) / "checked.onnx"
            save_onnx(proto, checked)
            onnx.checker.check_model(os.fspath(checked))
            _check(model, os.fspath(checked), inputs, rtol, atol)
        else:
            _check(model, proto, inputs, rtol, atol)
    if path is not None:
        save_onnx(proto, path)
    return proto


def _dynamo(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], opset: int) -> onnx.ModelProto:
    import onnx_ir
    import onnxscript.optimizer as optimizer

    with warnings.catch_warnings(), _quiet("torch.onnx._internal.exporter._registration"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, inputs, None, dynamo=True, input_names=names, opset_version=opset, optimize=False,
            verbose=False,
        )
    ir_model = program.model
    optimizer.fold_constants(ir_model)
    optimizer.remove_unused_nodes(ir_model)
    proto = onnx_ir.to_proto(ir_model)
    return _tidy(proto)


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Hide the warnings that torch's logger ``name`` logs (the exporter lists the torchvision ops it skips)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _torchscript(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], opset: int, folder: Path
) -> onnx.ModelProto:
    """The TorchScript exporter's model; written through a file in ``folder`` when the tensors are large."""
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    target: io.BytesIO | str = io.BytesIO() if size <= PROTOBUF_LIMIT else os.fspath(folder / "torchscript.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, inputs, target, dynamo=False, input_names=names, opset_version=opset,
                do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE,
            )
    except Exception as error:
        raise RewriteError(
            f"neither ONNX exporter could export {type(model).__name__} ({type(error).__name__}: {error})"
        ) from error
    if isinstance(target, io.BytesIO):
        return _tidy(onnx.load_from_string(target.getvalue()))
    return _tidy(onnx.load(target))  # reads the external data the exporter wrote beside it


def _tidy(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constants as initializers, all-zero conv biases dropped, unused initializers removed."""
    graph = proto.graph
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in initializers:
            if not np.any(numpy_helper.to_array(initializers[node.input[2]])):
                del node.input[2]
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for index in reversed(range(len(graph.initializer))):  # in place: copying a tensor over 2 GiB fails
        if graph.initializer[index].name not in used:
            del graph.initializer[index]
    inputs = [i for i in graph.input if i.name not in initializers or i.name in used]
    del graph.input[:]
    graph.input.extend(inputs)
    if not is_large(proto):  # a large model is checked from its file (export_onnx)
        onnx.checker.check_model(proto)
    return proto


def _check(
    model: nn.Module, proto: onnx.ModelProto | str, inputs: tuple[torch.Tensor, ...], rtol: float, atol: float
) -> None:
    from tunnelgraph.backends.onnx import run_onnx

    with torch.no_grad():
        expected = model(*inputs)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    got = run_onnx(proto, [x.detach().cpu().numpy() for x in inputs])
    if len(got) != len(expected):
        raise RewriteError(f"the ONNX model returns {len(got)} outputs, PyTorch {len(expected)}")
    for index, (a, b) in enumerate(zip(expected, got)):
        a = a.detach().cpu().double().numpy()
        b = np.asarray(b, dtype=np.float64)
        difference = float(np.abs(a - b).max()) if a.size else 0.0
        if a.shape != b.shape or difference > atol + rtol * float(np.abs(a).max(initial=0.0)):
            raise RewriteError(
                f"the exported ONNX model's output {index} differs from PyTorch's by {difference:.3g} "
                f"(shapes {a.shape} and {b.shape}); not writing it"
            )

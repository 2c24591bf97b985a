"""ONNX frontend: an ``onnx.ModelProto`` (or ``.onnx`` file) into the same :class:`Graph` as torch.fx.

Every ONNX node becomes one IR node named after its first output, except
that ``MatMul`` followed by an ``Add`` of a bias initializer becomes one
linear layer (how PyTorch's exporters write ``nn.Linear`` on 3-D inputs).
Layers are named after their weight initializers (``fc.weight`` -> ``fc``)
when the names have that form, so sites of an exported PyTorch model keep
their PyTorch names. Shapes come from ONNX shape inference. Operators this
module does not know become ``BLOCKING`` nodes naming their op type, so the
rule engine refuses the sites around them.

This module does not import torch.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
from onnx import numpy_helper

from tunnelgraph.errors import TraceError
from tunnelgraph.frontends.shapes import merged_range
from tunnelgraph.ir import ChannelMap, Graph, Node, OpKind, ParamRef

logger = logging.getLogger(__name__)

OnnxSource = Union[str, os.PathLike, bytes, onnx.ModelProto]

_ACTIVATIONS = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "Softsign", "HardSwish",
    "HardSigmoid", "Gelu", "Erf", "Celu", "Mish", "ThresholdedRelu", "Abs", "Neg", "Exp", "Log",
    "Sqrt", "Reciprocal", "Clip",
}
_COMPARISONS = {"Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal"}
_POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
_ELEMENTWISE = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}
_METADATA_OPS = {"Shape", "Size"}
_SHAPE_FOLLOWERS = {"Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Slice", "Mul", "Div", "Add", "Sub"}
_BLOCKING_DETAIL = {
    "Softmax": "softmax mixes channels",
    "LogSoftmax": "softmax mixes channels",
    "LayerNormalization": "layer norm mixes channels",
}


def read_onnx(source: OnnxSource) -> tuple[onnx.ModelProto, Path | None]:
    """Load an ONNX model safely; external data only from inside the model's folder.

    Raises:
        TraceError: the file is missing, truncated or not ONNX, or an
            external-data location points outside the model's folder.
    """
    if isinstance(source, onnx.ModelProto):
        return source, None
    if isinstance(source, bytes):
        return _parse(source, "the given bytes"), None
    path = Path(source)
    if not path.is_file():
        raise TraceError(f"no ONNX file at '{path}'")
    model = _parse(path.read_bytes(), f"'{path}'")
    folder = path.resolve().parent
    external = [t for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if os.path.isabs(location) or os.path.commonpath([str(folder), str(target)]) != str(folder):
            raise TraceError(
                f"initializer '{tensor.name}' keeps its data at '{location}', outside the model's "
                f"folder '{folder}'; refusing to read it (move the data file beside the model)"
            )
        if not target.is_file():
            raise TraceError(f"initializer '{tensor.name}' keeps its data in '{location}', which is missing")
    if external:
        onnx.external_data_helper.load_external_data_for_model(model, str(folder))
    return model, folder


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as error:  # protobuf raises DecodeError and friends
        raise TraceError(f"{where} is not an ONNX model or is truncated ({type(error).__name__})") from error
    if not model.graph.node and not model.graph.output:
        raise TraceError(f"{where} is not an ONNX model or is truncated (it has no graph)")
    return model


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return list(model.graph.initializer)


def load_onnx(source: OnnxSource) -> Graph:
    """Translate an ONNX model into tunnelgraph's unit DAG.

    Args:
        source: a path to an ``.onnx`` file, its bytes, or an ``onnx.ModelProto``.

    Returns:
        The graph; ``graph.source`` holds the ``ModelProto`` (with shapes
        inferred), ``graph.attrs``-like data lives on the nodes.
    """
    model, _ = read_onnx(source)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as error:
        raise TraceError(f"ONNX shape inference failed ({type(error).__name__}: {error})") from error
    graph = _Translator(inferred).run()
    graph.source = model
    return graph


class _Translator:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        name = model.graph.name or "onnx"
        self.graph = Graph(name)
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.constants: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
            self.shapes[value.name] = value_shape(value)
        for tensor in self.initializers.values():
            self.shapes[tensor.name] = tuple(tensor.dims)
        self.producer: dict[str, str] = {}  # tensor name -> IR node name that produces it
        self.kinds: dict[str, OpKind] = {}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for tensor in node.input:
                self.users.setdefault(tensor, []).append(node)
        self.uses: dict[str, int] = {}
        for node in model.graph.node:
            for tensor in node.input:
                self.uses[tensor] = self.uses.get(tensor, 0) + 1
        self.fused: set[str] = set()  # Add nodes folded into a MatMul layer

    # -- helpers -------------------------------------------------------------------
    def _value(self, tensor: str) -> np.ndarray | None:
        if tensor in self.initializers:
            return numpy_helper.to_array(self.initializers[tensor])
        return self.constants.get(tensor)

    def _add(self, node: Node, maps: dict[int, ChannelMap] | None = None) -> None:
        self.graph.add(node, maps)
        self.kinds[node.name] = node.kind

    def _input_nodes(self, tensors: list[str]) -> tuple[str, ...]:
        names = []
        for tensor in tensors:
            if not tensor:
                continue
            if tensor not in self.producer:
                self._constant(tensor)
            names.append(self.producer[tensor])
        return tuple(names)

    def _constant(self, tensor: str) -> None:
        node = Node(name=tensor, kind=OpKind.CONSTANT, op="constant", shape=self.shapes.get(tensor),
                    attrs={"target": tensor})
        self._add(node)
        self.producer[tensor] = tensor

    def _param(self, tensor: str) -> ParamRef:
        array_shape = tuple(self.initializers[tensor].dims)
        return ParamRef(tensor, array_shape, self.uses.get(tensor, 0) > 1)

    def _layer_name(self, node: onnx.NodeProto, weight: str | None, bias: str | None = None) -> str:
        return layer_name(node, weight, bias)

    # -- translation -----------------------------------------------------------------
    def run(self) -> Graph:
        for value in self.model.graph.input:
            if value.name in self.initializers:
                continue
            self._add(Node(name=value.name, kind=OpKind.INPUT, op="input", shape=self.shapes.get(value.name)))
            self.producer[value.name] = value.name
        for node in self.model.graph.node:
            if node.op_type == "Constant":
                self._constant_node(node)
                continue
            if node.output[0] in self.fused:
                continue
            self._translate(node)
        outputs = tuple(self.producer[value.name] for value in self.model.graph.output if value.name in self.producer)
        self._add(Node(name="output", kind=OpKind.OUTPUT, op="output", inputs=outputs))
        return self.graph

    def _constant_node(self, node: onnx.NodeProto) -> None:
        for attribute in node.attribute:
            value = onnx.helper.get_attribute_value(attribute)
            if isinstance(value, onnx.TensorProto):
                value = numpy_helper.to_array(value)
            if attribute.name.startswith("value"):
                self.constants[node.output[0]] = np.asarray(value)
        self.shapes[node.output[0]] = tuple(self.constants.get(node.output[0], np.zeros(0)).shape)

    def _node(self, node: onnx.NodeProto, kind: OpKind, op: str, inputs: list[str] | None = None,
              **attrs: Any) -> Node:
        name = node.output[0]
        ir = Node(
            name=name, kind=kind, op=op, inputs=self._input_nodes(list(inputs if inputs is not None else node.input)),
            shape=self.shapes.get(name), attrs={"op_type": node.op_type, **attrs},
        )
        return ir

    def _finish(self, node: onnx.NodeProto, ir: Node, maps: dict[int, ChannelMap] | None = None) -> None:
        self._add(ir, maps)
        for tensor in node.output:
            if tensor:
                self.producer[tensor] = ir.name

    def _translate(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.domain not in ("", "ai.onnx"):
            return self._blocking(node, f"custom operator {node.domain}::{op}")
        if op in ("Cast", "CastLike") and self._value(node.input[0]) is not None:
            self.constants[node.output[0]] = self._value(node.input[0])  # a constant, whatever its type
            self.shapes[node.output[0]] = tuple(self.constants[node.output[0]].shape)
            return None
        data_inputs = [t for t in node.input if t and t not in self.initializers and t not in self.constants]
        if data_inputs and all(self.kinds.get(self.producer.get(t, ""), None) == OpKind.METADATA for t in data_inputs):
            return self._finish(node, self._node(node, OpKind.METADATA, "metadata"))
        if op == "Conv":
            return self._conv(node, attrs)
        if op == "Gemm":
            return self._gemm(node, attrs)
        if op == "MatMul":
            return self._matmul(node)
        if op in _ACTIVATIONS or (op == "PRelu" and self._numel(node.input[1]) == 1):
            if op == "Clip" and any(t and t not in self.initializers and t not in self.constants for t in node.input[1:]):
                return self._blocking(node, "Clip with bounds computed at run time")
            return self._finish(node, self._node(node, OpKind.CHANNELWISE, "activation", inputs=[node.input[0]],
                                                 function=op.lower()))
        if op in _COMPARISONS or op == "Where":
            return self._elementwise(node, op.lower())
        if op == "ReduceMean":
            return self._reduce_mean(node, attrs)
        if op == "BatchNormalization":
            ir = self._node(node, OpKind.CHANNELWISE, "batchnorm", inputs=[node.input[0]], requires_axis=1)
            ir.module = node.name or node.output[0]
            roles = ("weight", "bias", "running_mean", "running_var")
            ir.params = {role: self._param(t) for role, t in zip(roles, node.input[1:5])}
            if node.input[1].endswith(".weight"):
                ir.module = node.input[1][: -len(".weight")]
            return self._finish(node, ir)
        if op in _POOLING:
            return self._finish(node, self._node(node, OpKind.CHANNELWISE, "pooling", requires_axis=1,
                                                 function=op.lower()))
        if op == "Dropout":
            return self._finish(node, self._node(node, OpKind.CHANNELWISE, "dropout", inputs=[node.input[0]]))
        if op == "Identity":
            return self._finish(node, self._node(node, OpKind.CHANNELWISE, "identity"))
        if op in _ELEMENTWISE:
            return self._elementwise(node, _ELEMENTWISE[op])
        if op == "Concat":
            return self._concat(node, attrs)
        if op in ("Flatten", "Reshape"):
            return self._reshape(node, attrs)
        if op in _METADATA_OPS:
            return self._finish(node, self._node(node, OpKind.METADATA, "metadata"))
        if op in _BLOCKING_DETAIL:
            return self._blocking(node, _BLOCKING_DETAIL[op], op.lower())
        return self._blocking(node, f"operator {op}")

    def _numel(self, tensor: str) -> int:
        shape = self.shapes.get(tensor)
        return math.prod(shape) if shape is not None else -1

    def _blocking(self, node: onnx.NodeProto, detail: str, op: str = "unknown") -> None:
        where = f" at node '{node.name}'" if node.name else ""
        self._finish(node, self._node(node, OpKind.BLOCKING, op, detail=f"{detail}{where}"))

    def _conv(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        weight = node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if weight not in self.initializers or (bias is not None and bias not in self.initializers):
            return self._blocking(node, "Conv whose weight is computed at run time")
        groups = int(attrs.get("group", 1))
        shape = tuple(self.initializers[weight].dims)
        out_channels, in_per_group = shape[0], shape[1]
        depthwise = groups > 1 and in_per_group == 1 and groups == out_channels
        if depthwise:
            ir = self._node(node, OpKind.CHANNELWISE, "depthwise", inputs=[node.input[0]], requires_axis=1)
        else:
            ir = self._node(node, OpKind.PARAMETRIC, "conv", inputs=[node.input[0]], in_axis=1, groups=groups)
            ir.channel_axis = 1
        ir.module = self._layer_name(node, weight, bias)
        ir.params = {"weight": self._param(weight)}
        if bias is not None:
            ir.params["bias"] = self._param(bias)
        self._finish(node, ir)

    def _gemm(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        weight = node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if attrs.get("transA", 0):
            return self._blocking(node, "Gemm with transA=1 (its input is transposed)")
        if weight not in self.initializers or (bias is not None and bias not in self.initializers):
            return self._blocking(node, "Gemm whose weight or bias is computed at run time")
        weight_shape = tuple(self.initializers[weight].dims)
        out_features = weight_shape[0] if attrs.get("transB", 0) else weight_shape[1]
        if bias is not None and tuple(self.initializers[bias].dims) != (out_features,):
            return self._blocking(node, f"Gemm bias of shape {tuple(self.initializers[bias].dims)} (broadcast)")
        axes = (0, 1) if attrs.get("transB", 0) else (1, 0)
        self._linear(node, weight, bias, axes, [node.input[0]], node.output[0])

    def _matmul(self, node: onnx.NodeProto) -> None:
        weight = node.input[1]
        if weight not in self.initializers or len(self.initializers[weight].dims) != 2:
            if weight in self.initializers or weight in self.constants:
                return self._blocking(node, "MatMul with a weight that is not a matrix")
            return self._blocking(node, "MatMul of two computed tensors")
        users = self.users.get(node.output[0], [])
        bias, output = None, node.output[0]
        if len(users) == 1 and users[0].op_type == "Add":
            add = users[0]
            other = [t for t in add.input if t != node.output[0]]
            out_features = self.initializers[weight].dims[1]
            if len(other) == 1 and other[0] in self.initializers and tuple(self.initializers[other[0]].dims) == (out_features,):
                bias, output = other[0], add.output[0]
                self.fused.add(add.output[0])
        self._linear(node, weight, bias, (1, 0), [node.input[0]], output)

    def _linear(self, node: onnx.NodeProto, weight: str, bias: str | None, axes: tuple[int, int],
                inputs: list[str], output: str) -> None:
        shape = self.shapes.get(output)
        ir = Node(
            name=output, kind=OpKind.PARAMETRIC, op="linear", inputs=self._input_nodes(inputs), shape=shape,
            attrs={"op_type": node.op_type, "in_axis": -1, "weight_axes": axes},
        )
        ir.channel_axis = len(shape) - 1 if shape else None
        ir.module = self._layer_name(node, weight, bias)
        ir.params = {"weight": self._param(weight)}
        if bias is not None:
            ir.params["bias"] = self._param(bias)
        self._add(ir)
        self.producer[node.output[0]] = ir.name
        self.producer[output] = ir.name

    def _elementwise(self, node: onnx.NodeProto, op: str) -> None:
        """Element-wise ops: of two computed tensors they couple; by a scalar constant they act per entry."""
        constant = [t for t in node.input if t in self.initializers or t in self.constants]
        coupling = "where" if op not in _ELEMENTWISE.values() else op  # comparisons and Where join like adds
        if not constant:
            return self._finish(node, self._node(node, OpKind.COUPLING, coupling))
        if op != "where" and len(constant) == 1 and len(node.input) == 2:
            value = self._value(constant[0])
            if value is not None and value.size == 1:
                data = [t for t in node.input if t != constant[0]]
                kind = "scale" if op in _ELEMENTWISE.values() else "activation"
                return self._finish(node, self._node(node, OpKind.CHANNELWISE, kind, inputs=data, function=op))
        return self._blocking(node, f"element-wise {op} with a constant tensor")

    def _reduce_mean(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        in_shape = self.shapes.get(node.input[0])
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = self._value(node.input[1])
            axes = None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
        if in_shape is None or not axes:
            return self._blocking(node, "ReduceMean over all axes or over axes computed at run time")
        reduced = tuple(sorted(int(a) % len(in_shape) for a in axes))
        keepdim = bool(attrs.get("keepdims", 1))
        self._finish(node, self._node(node, OpKind.CHANNELWISE, "pooling", inputs=[node.input[0]],
                                      reduces=reduced, keepdim=keepdim, function="mean"))

    def _concat(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        shape = self.shapes.get(node.output[0])
        if shape is None:
            return self._blocking(node, "Concat of unknown shape")
        axis = int(attrs.get("axis", 0)) % len(shape)
        maps, offset = {}, 0
        for position, tensor in enumerate(node.input):
            tensor_shape = self.shapes.get(tensor)
            if tensor_shape is None:
                return self._blocking(node, "Concat of a tensor of unknown shape")
            maps[position] = ChannelMap(offset, 1)
            offset += tensor_shape[axis]
        self._finish(node, self._node(node, OpKind.COUPLING, "concat", dim=axis), maps)

    def _reshape(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        in_shape, out_shape = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        if in_shape is None or out_shape is None:
            return self._blocking(node, f"{node.op_type} of unknown shape")
        merged = merged_range(in_shape, out_shape)
        if merged is None:
            return self._finish(node, self._node(node, OpKind.BLOCKING, "reshape", inputs=[node.input[0]],
                                                 detail=f"reshape {in_shape} -> {out_shape} is not a flatten"))
        start, end = merged
        literals: dict[int, tuple[tuple[int, ...], int]] = {}
        extra: dict[str, Any] = {}
        if node.op_type == "Reshape":
            target = self._value(node.input[1])
            if target is None:
                inputs = [node.input[0]]
            else:
                inputs = [node.input[0]]
                extra["shape_tensor"] = node.input[1]
                for axis, size in enumerate(np.asarray(target).reshape(-1).tolist()):
                    if size not in (-1, 0) and axis < len(out_shape):
                        literals[axis] = ((axis,), int(size))
        else:
            inputs = [node.input[0]]
        block = ChannelMap(0, math.prod(in_shape[start + 1:end + 1]))
        ir = self._node(node, OpKind.RESHAPE, "flatten", inputs=inputs, start=start, end=end,
                        literal_widths=literals, **extra)
        self._finish(node, ir, {0: block})


def layer_name(node: onnx.NodeProto, weight: str | None, bias: str | None = None) -> str:
    """A layer's name: its weight's (``fc.weight`` -> ``fc``) or bias's, else the node's, else its output's."""
    for tensor, suffix in ((weight, ".weight"), (bias, ".bias")):
        if tensor and tensor.endswith(suffix) and len(tensor) > len(suffix):
            return tensor[: -len(suffix)]
    return node.name or node.output[0]


def value_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """A value's inferred shape, unknown (symbolic) dimensions read as 1; None without a shape."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in tensor_type.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") else 1)
    return tuple(dims)



"""ONNX to PyTorch: an ``onnx.ModelProto`` as an ordinary ``torch.fx.GraphModule``.

Layers become the modules PyTorch users know (``nn.Conv2d``, ``nn.Linear``,
``nn.BatchNorm2d``), named after their weights as the ONNX frontend names
them (``fc.weight`` -> submodule ``fc``), so ``tg.find_sites`` on the result
finds the same sites as on the ONNX model, and the model can be trained and
measured (``tg.a_statistics``). Other operators become torch functions in a
generated fx graph. Gemm's ``alpha`` and ``beta`` are folded into the
linear layer's weight and bias; asymmetric pads become an explicit
``F.pad``. An operator without a translation raises, naming it.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from tunnelgraph.errors import TraceError
from tunnelgraph.frontends.onnx import OnnxSource, layer_name, read_onnx

_UNARY: dict[str, Callable[..., Any]] = {
    "Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Softsign": F.softsign,
    "HardSwish": F.hardswish, "Erf": torch.erf, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal, "Neg": torch.neg, "Abs": torch.abs, "Selu": F.selu, "Mish": F.mish,
    "Identity": lambda x: x,
}
_BINARY: dict[str, Callable[..., Any]] = {
    "Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv,
    "Greater": torch.gt, "Less": torch.lt, "GreaterOrEqual": torch.ge, "LessOrEqual": torch.le,
    "Equal": torch.eq, "Pow": torch.pow,
}
_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BOOL: torch.bool,
}


def to_torch(source: OnnxSource) -> torch.fx.GraphModule:
    """The ONNX model as a PyTorch module computing the same function (see the module docstring)."""
    model, _ = read_onnx(source)
    return _Builder(model).build()


class _Builder:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.root = nn.Module()
        self.graph = torch.fx.Graph()
        self.values: dict[str, Any] = {}
        self.arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for tensor in node.input:
                self.users.setdefault(tensor, []).append(node)
        self.fused: set[str] = set()
        self.constants = 0
        from tunnelgraph.frontends.onnx import value_shape

        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        values = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
        self.shapes = {value.name: value_shape(value) for value in values}

    def _shape(self, name: str) -> tuple[int, ...] | None:
        return self.shapes.get(name)

    def build(self) -> torch.fx.GraphModule:
        for value in self.model.graph.input:
            if value.name not in self.arrays:
                self.values[value.name] = self.graph.placeholder(_identifier(value.name))
        for node in self.model.graph.node:
            if node.output[0] in self.fused:
                continue
            self._node(node)
        outputs = [self.values[o.name] for o in self.model.graph.output]
        self.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        module = torch.fx.GraphModule(self.root, self.graph, self.model.graph.name or "OnnxModel")
        return module.eval()

    # -- helpers -------------------------------------------------------------------------
    def _input(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        if name in self.arrays:
            return self._constant(name, self.arrays[name])
        raise TraceError(f"tensor '{name}' is used before it is computed")

    def _constant(self, name: str, array: np.ndarray) -> Any:
        if array.ndim == 0 and array.dtype.kind in "fiu":
            return array.item()
        attribute = f"_constant_{self.constants}"
        self.constants += 1
        self.root.register_buffer(attribute, torch.from_numpy(np.array(array)), persistent=True)
        node = self.graph.get_attr(attribute)
        self.values[name] = node
        return node

    def _tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self.arrays[name]))

    def _layer(self, name: str, module: nn.Module) -> str:
        parts = name.split(".")
        parent = self.root
        for part in parts[:-1]:
            part = _identifier(part)
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        leaf = _identifier(parts[-1])
        while leaf in parent._modules or hasattr(parent, leaf):
            leaf += "_"
        parent.add_module(leaf, module)
        return ".".join([_identifier(p) for p in parts[:-1]] + [leaf])

    def _emit(self, node: onnx.NodeProto, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.values[node.output[0]] = self.graph.call_function(function, args, kwargs)

    # -- nodes ------------------------------------------------------------------------------
    def _node(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op == "Constant":
            value = next(iter(attrs.values()))
            array = numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)
            self.arrays[node.output[0]] = array
            return
        if op in ("Cast", "CastLike") and node.input[0] in self.arrays:
            self.arrays[node.output[0]] = self.arrays[node.input[0]]
            return
        handler = getattr(self, f"_{op.lower()}", None)
        if op in _UNARY:
            return self._emit(node, _UNARY[op], self._input(node.input[0]))
        if op in _BINARY:
            return self._emit(node, _BINARY[op], self._input(node.input[0]), self._input(node.input[1]))
        if handler is None:
            raise TraceError(
                f"to_torch has no translation for ONNX operator {node.domain + '::' if node.domain else ''}{op} "
                f"(node '{node.name or node.output[0]}')"
            )
        handler(node, attrs)

    def _conv(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        weight = self._tensor(node.input[1])
        bias = self._tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        dims = weight.dim() - 2
        kernel = list(weight.shape[2:])
        strides = list(attrs.get("strides", [1] * dims))
        dilations = list(attrs.get("dilations", [1] * dims))
        x = self._input(node.input[0])
        pads = list(attrs.get("pads", [0] * 2 * dims))
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            shape = self._shape(node.input[0])
            if shape is None:
                raise TraceError(f"Conv '{node.name}' uses auto_pad without a known input shape")
            pads = _same_pads(shape[2:], kernel, strides, dilations, upper=auto == "SAME_UPPER")
        begin, end = pads[:dims], pads[dims:]
        conv_class = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        groups = int(attrs.get("group", 1))
        symmetric = begin == end
        layer = conv_class(
            weight.shape[1] * groups, weight.shape[0], kernel, stride=strides, dilation=dilations,
            padding=begin if symmetric else 0, groups=groups, bias=bias is not None,
        )
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        if not symmetric:
            padding = [p for d in reversed(range(dims)) for p in (begin[d], end[d])]
            x = self.graph.call_function(F.pad, (x, padding))
        name = self._layer(layer_name(node, node.input[1]), layer)
        self.values[node.output[0]] = self.graph.call_module(name, (x,))

    def _linear(self, node: onnx.NodeProto, weight: torch.Tensor, bias: torch.Tensor | None, x: Any,
                output: str, name: str) -> None:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        self.values[output] = self.graph.call_module(self._layer(name, layer), (x,))
        self.values[node.output[0]] = self.values[output]

    def _gemm(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        if attrs.get("transA", 0):
            raise TraceError(f"to_torch: Gemm '{node.name}' with transA=1 is not supported")
        weight = self._tensor(node.input[1])
        weight = weight if attrs.get("transB", 0) else weight.T
        weight = weight * float(attrs.get("alpha", 1.0))
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = self._tensor(node.input[2]).reshape(-1) * float(attrs.get("beta", 1.0))
        self._linear(node, weight.contiguous(), bias, self._input(node.input[0]), node.output[0],
                     layer_name(node, node.input[1], node.input[2] if len(node.input) > 2 else None))

    def _matmul(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        if node.input[1] not in self.arrays or self.arrays[node.input[1]].ndim != 2:
            return self._emit(node, torch.matmul, self._input(node.input[0]), self._input(node.input[1]))
        weight = self._tensor(node.input[1]).T.contiguous()
        bias, output, bias_name = None, node.output[0], None
        users = self.users.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add":
            other = [t for t in users[0].input if t != node.output[0]]
            if len(other) == 1 and other[0] in self.arrays and self.arrays[other[0]].shape == (weight.shape[0],):
                bias, output, bias_name = self._tensor(other[0]), users[0].output[0], other[0]
                self.fused.add(output)
        self._linear(node, weight, bias, self._input(node.input[0]), output,
                     layer_name(node, node.input[1], bias_name))

    def _batchnormalization(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        scale, bias, mean, var = (self._tensor(t) for t in node.input[1:5])
        shape = self._shape(node.input[0])
        rank = len(shape) if shape is not None else 4
        layer_class = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
        layer = layer_class(scale.shape[0], eps=float(attrs.get("epsilon", 1e-5)),
                            momentum=1.0 - float(attrs.get("momentum", 0.9)))
        with torch.no_grad():
            layer.weight.copy_(scale)
            layer.bias.copy_(bias)
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        name = self._layer(layer_name(node, node.input[1]), layer)
        self.values[node.output[0]] = self.graph.call_module(name, (self._input(node.input[0]),))

    def _pool(self, node: onnx.NodeProto, attrs: dict[str, Any], kind: str) -> None:
        kernel = list(attrs["kernel_shape"])
        dims = len(kernel)
        strides = list(attrs.get("strides", [1] * dims))
        pads = list(attrs.get("pads", [0] * 2 * dims))
        if pads[:dims] != pads[dims:]:
            raise TraceError(f"to_torch: {node.op_type} '{node.name}' with asymmetric pads is not supported")
        ceil = bool(attrs.get("ceil_mode", 0))
        x = self._input(node.input[0])
        if kind == "max":
            function = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
            dilations = list(attrs.get("dilations", [1] * dims))
            self._emit(node, function, x, kernel, strides, pads[:dims], dilations, ceil)
        else:
            function = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
            self._emit(node, function, x, kernel, strides, pads[:dims], ceil,
                       bool(attrs.get("count_include_pad", 0)))

    def _maxpool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._pool(node, attrs, "max")

    def _averagepool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._pool(node, attrs, "average")

    def _globalaveragepool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        shape = self._shape(node.input[0])
        dims = tuple(range(2, len(shape))) if shape is not None else (2, 3)
        self._emit(node, torch.mean, self._input(node.input[0]), dims, keepdim=True)

    def _globalmaxpool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        shape = self._shape(node.input[0])
        size = list(shape[2:]) if shape is not None else None
        if size is None:
            raise TraceError(f"to_torch: GlobalMaxPool '{node.name}' needs a known input shape")
        function = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(size) - 1]
        self._emit(node, function, self._input(node.input[0]), size)

    def _reducemean(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1:
            axes = [int(a) for a in self.arrays[node.input[1]].reshape(-1)]
        self._emit(node, torch.mean, self._input(node.input[0]), tuple(axes),
                   keepdim=bool(attrs.get("keepdims", 1)))

    def _flatten(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        axis = int(attrs.get("axis", 1))
        x = self._input(node.input[0])
        if axis == 1:
            return self._emit(node, torch.flatten, x, 1)
        shape = self._shape(node.input[0])
        head = math.prod(shape[:axis])
        self._emit(node, torch.reshape, x, (head, -1))

    def _reshape(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._input(node.input[0])
        out = self._shape(node.output[0])
        in_shape = self._shape(node.input[0])
        if out is not None and in_shape is not None and len(out) == 2 and out[0] == in_shape[0]:
            return self._emit(node, torch.flatten, x, 1)
        if node.input[1] in self.arrays:
            target = [int(v) for v in self.arrays[node.input[1]].reshape(-1)]
            if in_shape is not None and not attrs.get("allowzero", 0):
                target = [in_shape[i] if v == 0 else v for i, v in enumerate(target)]
            return self._emit(node, torch.reshape, x, tuple(target))
        self._emit(node, torch.reshape, x, self._input(node.input[1]))

    def _concat(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, torch.cat, [self._input(t) for t in node.input], int(attrs.get("axis", 0)))

    def _dropout(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self.values[node.output[0]] = self._input(node.input[0])

    def _leakyrelu(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, F.leaky_relu, self._input(node.input[0]), float(attrs.get("alpha", 0.01)))

    def _elu(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, F.elu, self._input(node.input[0]), float(attrs.get("alpha", 1.0)))

    def _softplus(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, F.softplus, self._input(node.input[0]))

    def _hardsigmoid(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
        scaled = self.graph.call_function(operator.add, (self.graph.call_function(
            operator.mul, (self._input(node.input[0]), alpha)), beta))
        self._emit(node, torch.clamp, scaled, 0.0, 1.0)

    def _gelu(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        approximate = attrs.get("approximate", b"none")
        approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
        self._emit(node, F.gelu, self._input(node.input[0]), approximate=approximate)

    def _clip(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        low = self.arrays[node.input[1]].item() if len(node.input) > 1 and node.input[1] else None
        high = self.arrays[node.input[2]].item() if len(node.input) > 2 and node.input[2] else None
        self._emit(node, torch.clamp, self._input(node.input[0]), low, high)

    def _where(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, torch.where, *(self._input(t) for t in node.input))

    def _softmax(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, F.softmax, self._input(node.input[0]), int(attrs.get("axis", -1)))

    def _logsoftmax(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, F.log_softmax, self._input(node.input[0]), int(attrs.get("axis", -1)))

    def _layernormalization(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        scale = self._tensor(node.input[1])
        bias = self._tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        layer = nn.LayerNorm(list(scale.shape), eps=float(attrs.get("epsilon", 1e-5)), bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(scale)
            if bias is not None:
                layer.bias.copy_(bias)
        name = self._layer(layer_name(node, node.input[1]), layer)
        self.values[node.output[0]] = self.graph.call_module(name, (self._input(node.input[0]),))

    def _transpose(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, torch.permute, self._input(node.input[0]), tuple(attrs["perm"]))

    def _cast(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        dtype = _DTYPES.get(int(attrs["to"]))
        if dtype is None:
            raise TraceError(f"to_torch: Cast '{node.name}' to ONNX type {attrs['to']} is not supported")
        self._emit(node, torch.Tensor.to, self._input(node.input[0]), dtype)


def _same_pads(spatial: tuple[int, ...], kernel: list[int], strides: list[int], dilations: list[int],
               upper: bool) -> list[int]:
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if upper else large)
        end.append(large if upper else small)
    return begin + end


def torch_name(layer: str) -> str:
    """The submodule path :func:`to_torch` gives the ONNX layer ``layer``."""
    return ".".join(_identifier(part) for part in layer.split("."))


def _identifier(name: str) -> str:
    """A module or input name: ONNX names may hold '/', ':' and the like; digits stay (as in nn.Sequential)."""
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return cleaned or "_"

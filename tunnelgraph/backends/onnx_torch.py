"""ONNX to PyTorch: an ``onnx.ModelProto`` as an ordinary ``torch.fx.GraphModule``.

Layers become the modules PyTorch users know (``nn.Conv2d``, ``nn.Linear``,
``nn.BatchNorm2d``), named after their weights as the ONNX frontend names
them (``fc.weight`` -> submodule ``fc``), so ``tg.find_sites`` on the result
finds the same sites as on the ONNX model, and the model can be trained and
measured (``tg.a_statistics``). A layer whose parameters are graph inputs or
computed at run time becomes the matching functional call
(``F.conv2d``, ``F.batch_norm``, ``torch.matmul``). Other operators become
torch functions in a generated fx graph. Gemm's ``alpha`` and ``beta`` are
folded into the linear layer's weight and bias; asymmetric pads become an
explicit ``F.pad``.

Every operator the ONNX frontend (:mod:`tunnelgraph.frontends.onnx`) reads
is translated here, shape computations included (``Shape``, ``Gather``,
``Unsqueeze``, ``Concat`` feeding a ``Reshape``, as the TorchScript exporter
writes ``x.view(x.size(0), -1)``); so are the reductions (``ReduceMax``,
``ReduceSum``, ...), softmax and layer norm. An operator without a
translation, or an attribute value this module does not support, raises
:class:`~tunnelgraph.errors.TraceError` naming the operator, the node and
the reason. Shape computations whose result only a ``Reshape`` reads are
dropped when the reshape is proven a flatten.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Callable

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from tunnelgraph.errors import TraceError, missing_onnx

try:
    import onnx
    from onnx import numpy_helper
except ImportError as error:  # the optional extra is not installed
    raise missing_onnx(error) from error

from tunnelgraph.frontends.onnx import (
    Dim,
    Dims,
    OnnxSource,
    ShapeValues,
    constant_value,
    flatten_range,
    layer_name,
    linear_patterns,
    read_onnx,
    reshaped,
    value_dims,
)

_UNARY: dict[str, Callable[..., Any]] = {
    "Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Softsign": F.softsign,
    "HardSwish": F.hardswish, "Erf": torch.erf, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal, "Neg": torch.neg, "Abs": torch.abs, "Mish": F.mish,
}
_ARITHMETIC: dict[str, Callable[..., Any]] = {
    "Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv, "Pow": torch.pow,
}
_NUMPY_ARITHMETIC: dict[str, Callable[..., Any]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Pow": np.power,
}
# comparisons: the torch function, the one that gives the same result with the operands swapped, numpy's
_COMPARISONS: dict[str, tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]] = {
    "Greater": (torch.gt, torch.lt, np.greater), "Less": (torch.lt, torch.gt, np.less),
    "GreaterOrEqual": (torch.ge, torch.le, np.greater_equal), "LessOrEqual": (torch.le, torch.ge, np.less_equal),
    "Equal": (torch.eq, torch.eq, np.equal),
}
_REDUCTIONS = {
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare",
}
_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}
_INTEGER_TYPES = {
    onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
}


def to_torch(source: OnnxSource) -> torch.fx.GraphModule:
    """The ONNX model as a PyTorch module computing the same function (see the module docstring).

    Raises:
        TraceError: the model uses an operator, or an attribute value, that
            has no translation; the message names it and the node.
    """
    model, _ = read_onnx(source)
    return _Builder(model).build()


def _fx_leaf(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` as one opaque call when torch.fx traces the generated module again (``tg.trace``)."""

    @functools.wraps(function)
    def leaf(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.fx.Proxy):
                return value.tracer.create_proxy("call_function", leaf, args, kwargs)
        return function(*args, **kwargs)

    return leaf


@_fx_leaf
def onnx_reshape(x: torch.Tensor, shape: torch.Tensor, allowzero: bool = False) -> torch.Tensor:
    """ONNX ``Reshape`` to a target shape computed at run time (``0`` copies the input's size unless ``allowzero``)."""
    target = [int(v) for v in shape.reshape(-1).tolist()]
    if not allowzero:
        target = [x.shape[axis] if size == 0 else size for axis, size in enumerate(target)]
    return torch.reshape(x, tuple(target))


@_fx_leaf
def onnx_constant_of_shape(shape: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """ONNX ``ConstantOfShape``: a tensor of the run-time ``shape`` filled with the one-element ``value``."""
    return value.reshape(()).expand(tuple(int(v) for v in shape.reshape(-1).tolist())).clone()


@_fx_leaf
def onnx_expand(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """ONNX ``Expand``: ``x`` broadcast with a run-time ``shape`` (either side may be 1, unlike ``Tensor.expand``)."""
    target = torch.broadcast_shapes(tuple(x.shape), tuple(int(v) for v in shape.reshape(-1).tolist()))
    return x.expand(target)


def _divide(a: Any, b: Any) -> Any:
    """ONNX ``Div`` of integer tensors: truncated towards zero."""
    return torch.div(a, b, rounding_mode="trunc")


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
        self.outputs = {value.name for value in model.graph.output}
        self.linear_patterns = linear_patterns(model)
        self.fused: set[str] = set()  # Add nodes folded into a MatMul layer
        self.untranslated: dict[str, str] = {}  # extra outputs of translated nodes -> why they are missing
        self.constants = 0
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as error:
            raise TraceError(f"ONNX shape inference failed ({type(error).__name__}: {error})") from error
        values = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
        self.dims: dict[str, Dims | None] = {value.name: value_dims(value) for value in values}
        self.types = {value.name: value.type.tensor_type.elem_type for value in values}
        for tensor in model.graph.initializer:
            self.dims[tensor.name] = tuple(tensor.dims)
            self.types[tensor.name] = tensor.data_type
        self.shape_values = ShapeValues(model.graph.node, self.arrays.get, self.dims)

    def build(self) -> torch.fx.GraphModule:
        for value in self.model.graph.input:
            if value.name not in self.arrays:
                self.values[value.name] = self.graph.placeholder(_identifier(value.name))
        for node in self.model.graph.node:
            if node.output[0] in self.fused:
                continue
            self._node(node)
        outputs = [self._input(o.name) for o in self.model.graph.output]
        self.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        for fx_node in reversed(list(self.graph.nodes)):  # shape computations a proven flatten made unused
            if fx_node.op in ("call_function", "call_method", "get_attr") and not fx_node.users:
                self.graph.erase_node(fx_node)
        module = torch.fx.GraphModule(self.root, self.graph, self.model.graph.name or "OnnxModel")
        return module.eval()

    # -- helpers -------------------------------------------------------------------------
    def _refuse(self, node: onnx.NodeProto, why: str) -> TraceError:
        return TraceError(f"to_torch: {node.op_type} node '{node.name or node.output[0]}' {why}")

    def _input(self, name: str) -> Any:
        """The fx value of tensor ``name`` (a stored tensor becomes a buffer)."""
        if name in self.values:
            return self.values[name]
        if name in self.arrays:
            attribute = f"_constant_{self.constants}"
            self.constants += 1
            self.root.register_buffer(attribute, torch.from_numpy(np.array(self.arrays[name])), persistent=True)
            self.values[name] = self.graph.get_attr(attribute)
            return self.values[name]
        if name in self.untranslated:
            raise TraceError(f"to_torch: tensor '{name}' is {self.untranslated[name]}, which has no translation")
        raise TraceError(f"tensor '{name}' is used before it is computed")

    def _operand(self, name: str) -> Any:
        """Like :meth:`_input`, but a stored number is passed as a Python number (as torch code writes it)."""
        array = self.arrays.get(name)
        if array is not None and array.ndim == 0 and array.dtype.kind in "fiub" and name not in self.values:
            return array.item()
        return self._input(name)

    def _optional(self, node: onnx.NodeProto, index: int) -> str | None:
        return node.input[index] if len(node.input) > index and node.input[index] else None

    def _tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self.arrays[name]))

    def _rank(self, name: str) -> int | None:
        dims = self.dims.get(name)
        return None if dims is None else len(dims)

    def _ints(self, node: onnx.NodeProto, attrs: dict[str, Any], name: str, index: int) -> list[int] | None:
        """An integer list given as attribute ``name`` (older opsets) or as constant input ``index``."""
        if name in attrs:
            return [int(v) for v in attrs[name]]
        tensor = self._optional(node, index)
        if tensor is None:
            return None
        if tensor not in self.arrays:
            raise self._refuse(node, f"takes its {name} from '{tensor}', which is computed at run time")
        return [int(v) for v in np.asarray(self.arrays[tensor]).reshape(-1)]

    def _layer(self, name: str, module: nn.Module) -> str:
        parts = name.split(".")
        parent = self.root
        for part in parts[:-1]:
            part = _identifier(part)
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent.get_submodule(part)
        leaf = _identifier(parts[-1])
        while leaf in parent._modules or hasattr(parent, leaf):
            leaf += "_"
        parent.add_module(leaf, module)
        return ".".join([_identifier(p) for p in parts[:-1]] + [leaf])

    def _emit(self, node: onnx.NodeProto, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.values[node.output[0]] = self.graph.call_function(function, args, kwargs)

    def _size(self, tensor: str, axis: int) -> Any:
        """Size ``axis`` of ``tensor``: the number when it is known, else read when the model runs."""
        dims = self.dims.get(tensor)
        if dims is not None and axis < len(dims) and isinstance(dims[axis], int):
            return dims[axis]
        return self.graph.call_method("size", (self._input(tensor), axis))

    def _pads(self, node: onnx.NodeProto, attrs: dict[str, Any], kernel: list[int], strides: list[int],
              dilations: list[int]) -> tuple[list[int], list[int]]:
        """(begin, end) padding per spatial axis, ``auto_pad`` resolved."""
        dims = len(kernel)
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            shape = self.dims.get(node.input[0])
            spatial = shape[2:] if shape is not None else None
            if spatial is None or not all(isinstance(d, int) for d in spatial):
                raise self._refuse(node, f"uses auto_pad={auto} on an input of unknown spatial size")
            pads = _same_pads(spatial, kernel, strides, dilations, upper=auto == "SAME_UPPER")  # type: ignore[arg-type]
        elif auto == "VALID":
            pads = [0] * 2 * dims
        else:
            pads = [int(p) for p in attrs.get("pads", [0] * 2 * dims)]
        return pads[:dims], pads[dims:]

    def _only_first_output(self, node: onnx.NodeProto, what: str) -> None:
        for index, tensor in enumerate(node.output[1:], start=1):
            if tensor and (tensor in self.users or tensor in self.outputs):
                raise self._refuse(node, f"output {index} ({what}) is used, and has no translation")

    # -- nodes ------------------------------------------------------------------------------
    def _node(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise TraceError(
                f"to_torch has no translation for ONNX operator {node.domain}::{op} "
                f"(node '{node.name or node.output[0]}')"
            )
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for index, tensor in enumerate(node.output[1:], start=1):
            if tensor:
                self.untranslated[tensor] = f"output {index} of {op} node '{node.name or node.output[0]}'"
        if op == "Constant":
            value = constant_value(node)
            if value is None:
                raise self._refuse(node, "holds a sparse or string value")
            self.arrays[node.output[0]] = value
            return None
        if op in _UNARY:
            return self._emit(node, _UNARY[op], self._input(node.input[0]))
        handler = getattr(self, f"_onnx_{op.lower()}", None)
        if op in _REDUCTIONS:
            handler = self._reduce
        if op in _ARITHMETIC:
            handler = self._arithmetic
        if op in _COMPARISONS:
            handler = self._compare
        if handler is None:
            raise TraceError(
                f"to_torch has no translation for ONNX operator {op} (node '{node.name or node.output[0]}')"
            )
        return handler(node, attrs)

    def _onnx_identity(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self.values[node.output[0]] = self._input(node.input[0])

    def _arithmetic(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        op = node.op_type
        a, b = node.input[0], node.input[1]
        if a in self.arrays and b in self.arrays:  # shape arithmetic on constants: fold it
            x, y = np.asarray(self.arrays[a]), np.asarray(self.arrays[b])
            if op == "Div":
                value = np.trunc(x / y).astype(x.dtype) if x.dtype.kind in "iu" else x / y
            else:
                value = _NUMPY_ARITHMETIC[op](x, y)
            self.arrays[node.output[0]] = np.asarray(value).astype(x.dtype)
            return None
        function = _ARITHMETIC[op]
        if op == "Div" and self.types.get(node.output[0]) in _INTEGER_TYPES:
            function = _divide
        self._emit(node, function, self._operand(a), self._operand(b))

    def _compare(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        function, swapped, folded = _COMPARISONS[node.op_type]
        if node.input[0] in self.arrays and node.input[1] in self.arrays:
            self.arrays[node.output[0]] = np.asarray(folded(self.arrays[node.input[0]], self.arrays[node.input[1]]))
            return None
        a, b = self._operand(node.input[0]), self._operand(node.input[1])
        if not isinstance(a, torch.fx.Node):  # a number first: torch.gt(number, tensor) does not exist
            function, a, b = swapped, b, a
        self._emit(node, function, a, b)

    def _onnx_where(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, torch.where, self._input(node.input[0]), *(self._operand(t) for t in node.input[1:]))

    # -- layers ---------------------------------------------------------------------------
    def _onnx_conv(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        weight_name, bias_name = node.input[1], self._optional(node, 2)
        weight_dims = self.dims.get(weight_name)
        kernel = list(attrs.get("kernel_shape", weight_dims[2:] if weight_dims is not None else []))
        if not kernel or not all(isinstance(k, int) for k in kernel):
            raise self._refuse(node, "has a kernel of unknown size")
        dims = len(kernel)
        strides = list(attrs.get("strides", [1] * dims))
        dilations = list(attrs.get("dilations", [1] * dims))
        groups = int(attrs.get("group", 1))
        begin, end = self._pads(node, attrs, kernel, strides, dilations)
        symmetric = begin == end
        x = self._input(node.input[0])
        if not symmetric:
            x = self.graph.call_function(F.pad, (x, _torch_pads(begin, end)))
        padding = begin if symmetric else [0] * dims
        stored = weight_name in self.arrays and (bias_name is None or bias_name in self.arrays)
        if not stored:
            function = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
            bias = self._input(bias_name) if bias_name is not None else None
            return self._emit(node, function, x, self._input(weight_name), bias, strides, padding, dilations, groups)
        weight = self._tensor(weight_name)
        bias_tensor = self._tensor(bias_name) if bias_name is not None else None
        conv_class = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        layer = conv_class(
            weight.shape[1] * groups, weight.shape[0], tuple(kernel), stride=tuple(strides),  # type: ignore[arg-type]
            dilation=tuple(dilations), padding=tuple(padding), groups=groups,  # type: ignore[arg-type]
            bias=bias_tensor is not None,
        )
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias_tensor is not None and layer.bias is not None:
                layer.bias.copy_(bias_tensor)
        name = self._layer(layer_name(node, weight_name), layer)
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

    def _onnx_gemm(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        weight_name, bias_name = node.input[1], self._optional(node, 2)
        trans_a, trans_b = bool(attrs.get("transA", 0)), bool(attrs.get("transB", 0))
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        stored = weight_name in self.arrays and self.arrays[weight_name].ndim == 2
        out_features = (self.arrays[weight_name].shape[0 if trans_b else 1]) if stored else None
        bias_fits = bias_name is None or (bias_name in self.arrays
                                          and self.arrays[bias_name].size == out_features
                                          and self.arrays[bias_name].ndim <= 2
                                          and self.arrays[bias_name].shape[-1:] in ((out_features,), ()))
        if stored and bias_fits and not trans_a:
            weight = self._tensor(weight_name)
            weight = (weight if trans_b else weight.T) * alpha
            bias = self._tensor(bias_name).reshape(-1) * beta if bias_name is not None else None
            return self._linear(node, weight.contiguous(), bias, self._input(node.input[0]), node.output[0],
                                layer_name(node, weight_name, bias_name))
        a = self._input(node.input[0])
        if trans_a:
            a = self.graph.call_function(torch.transpose, (a, 0, 1))
        b = self._input(weight_name)
        if trans_b:
            b = self.graph.call_function(torch.transpose, (b, 0, 1))
        y = self.graph.call_function(torch.matmul, (a, b))
        if alpha != 1.0:
            y = self.graph.call_function(operator.mul, (y, alpha))
        if bias_name is not None:
            c = self._operand(bias_name)
            if beta != 1.0:
                c = self.graph.call_function(operator.mul, (c, beta))
            y = self.graph.call_function(operator.add, (y, c))
        self.values[node.output[0]] = y

    def _onnx_matmul(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        if node.input[1] not in self.arrays or self.arrays[node.input[1]].ndim != 2:
            return self._emit(node, torch.matmul, self._input(node.input[0]), self._input(node.input[1]))
        weight = self._tensor(node.input[1]).T.contiguous()
        bias, output, bias_name = None, node.output[0], None
        pattern = self.linear_patterns.get(node.output[0])
        if pattern is not None:
            bias_name, output = pattern
            bias = self._tensor(bias_name)
            self.fused.add(output)
        self._linear(node, weight, bias, self._input(node.input[0]), output,
                     layer_name(node, node.input[1], bias_name))

    def _onnx_batchnormalization(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        if attrs.get("training_mode", 0):
            raise self._refuse(node, "runs in training mode (training_mode=1), which has no translation")
        self._only_first_output(node, "a running statistic")
        eps = float(attrs.get("epsilon", 1e-5))
        names = list(node.input[1:5])
        rank = self._rank(node.input[0])
        x = self._input(node.input[0])
        if not all(name in self.arrays for name in names) or rank not in (2, 3, 4, 5):
            scale, bias, mean, var = (self._input(name) for name in names)
            return self._emit(node, F.batch_norm, x, mean, var, scale, bias, False, 0.0, eps)
        scale, bias, mean, var = (self._tensor(name) for name in names)
        layer_class = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
        layer = layer_class(scale.shape[0], eps=eps, momentum=1.0 - float(attrs.get("momentum", 0.9)))
        with torch.no_grad():
            layer.weight.copy_(scale)
            layer.bias.copy_(bias)
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        name = self._layer(layer_name(node, node.input[1]), layer)
        self.values[node.output[0]] = self.graph.call_module(name, (x,))

    def _onnx_layernormalization(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._only_first_output(node, "a statistic")
        bias_name = self._optional(node, 2)
        if node.input[1] not in self.arrays or (bias_name is not None and bias_name not in self.arrays):
            raise self._refuse(node, "takes its scale or bias from a tensor computed at run time")
        rank = self._rank(node.input[0])
        axis = int(attrs.get("axis", -1))
        scale = self._tensor(node.input[1])
        if rank is not None and (axis % rank) + scale.dim() != rank:
            raise self._refuse(node, f"normalises from axis {axis} with a scale of shape {tuple(scale.shape)}")
        bias = self._tensor(bias_name) if bias_name is not None else None
        layer = nn.LayerNorm(list(scale.shape), eps=float(attrs.get("epsilon", 1e-5)), bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(scale)
            if bias is not None:
                layer.bias.copy_(bias)
        name = self._layer(layer_name(node, node.input[1]), layer)
        self.values[node.output[0]] = self.graph.call_module(name, (self._input(node.input[0]),))

    # -- pooling and reductions -------------------------------------------------------------
    def _window(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[list[int], list[int], list[int],
                                                                             list[int], list[int]]:
        kernel = [int(k) for k in attrs["kernel_shape"]]
        dims = len(kernel)
        strides = [int(s) for s in attrs.get("strides", [1] * dims)]
        dilations = [int(d) for d in attrs.get("dilations", [1] * dims)]
        begin, end = self._pads(node, attrs, kernel, strides, dilations)
        return kernel, strides, dilations, begin, end

    def _onnx_maxpool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._only_first_output(node, "the indices of the maxima")
        if attrs.get("storage_order", 0):
            raise self._refuse(node, "uses storage_order=1, which has no translation")
        kernel, strides, dilations, begin, end = self._window(node, attrs)
        dims = len(kernel)
        ceil = bool(attrs.get("ceil_mode", 0))
        # with ceil_mode torch would keep windows that start in the explicit padding, ONNX drops them
        x, begin = self._pooling_pads(
            node, self._input(node.input[0]), kernel, begin, end, allowed=not ceil, why="ceil_mode=1",
            value=float("-inf"),
        )
        function = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
        self._emit(node, function, x, kernel, strides, begin, dilations, ceil)

    def _pooling_pads(
        self, node: onnx.NodeProto, x: Any, kernel: list[int], begin: list[int], end: list[int], *,
        allowed: bool, why: str, value: float,
    ) -> tuple[Any, list[int]]:
        """``x`` and the pads torch's pooling is left with: pads torch cannot take (asymmetric, or over
        half the kernel) become an explicit ``F.pad`` with ``value`` where ``allowed``, else a refusal."""
        if begin == end and all(2 * p <= k for p, k in zip(begin, kernel)):
            return x, begin
        if not allowed:
            raise self._refuse(node, f"pads {begin} / {end} (asymmetric, or over half the kernel) with {why}, "
                                     "which has no translation")
        return self.graph.call_function(F.pad, (x, _torch_pads(begin, end)), {"value": value}), [0] * len(kernel)

    def _onnx_averagepool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        kernel, strides, dilations, begin, end = self._window(node, attrs)
        dims = len(kernel)
        if any(d != 1 for d in dilations):
            raise self._refuse(node, f"has dilations {dilations}, which torch's average pooling lacks")
        include_pad = bool(attrs.get("count_include_pad", 0))
        ceil = bool(attrs.get("ceil_mode", 0))
        x, begin = self._pooling_pads(
            node, self._input(node.input[0]), kernel, begin, end, allowed=include_pad and not ceil,
            why=f"count_include_pad={int(include_pad)} and ceil_mode={int(ceil)}", value=0.0,
        )
        function = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
        self._emit(node, function, x, kernel, strides, begin, ceil, include_pad)

    def _onnx_lppool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        kernel, strides, dilations, begin, end = self._window(node, attrs)
        dims = len(kernel)
        if any(d != 1 for d in dilations) or attrs.get("ceil_mode", 0):
            raise self._refuse(node, "uses dilations or ceil_mode, which have no translation")
        p = float(attrs.get("p", 2))
        # (sum over the window of |x|^p)^(1/p); zero padding adds nothing to the sum
        magnitude = self.graph.call_function(torch.abs, (self._input(node.input[0]),))
        powered = self.graph.call_function(torch.pow, (magnitude, p))
        if any(begin) or any(end):
            powered = self.graph.call_function(F.pad, (powered, _torch_pads(begin, end)))
        function = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
        mean = self.graph.call_function(function, (powered, kernel, strides, [0] * dims))
        total = self.graph.call_function(operator.mul, (mean, float(math.prod(kernel))))
        self._emit(node, torch.pow, total, 1.0 / p)

    def _spatial_axes(self, node: onnx.NodeProto) -> tuple[int, ...]:
        rank = self._rank(node.input[0])
        if rank is None:
            raise self._refuse(node, "has an input of unknown rank")
        return tuple(range(2, rank))

    def _onnx_globalaveragepool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, torch.mean, self._input(node.input[0]), self._spatial_axes(node), keepdim=True)

    def _onnx_globalmaxpool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        axes = self._spatial_axes(node)
        dims = self.dims.get(node.input[0]) or ()
        size = list(dims[2:])
        if 1 <= len(size) <= 3 and all(isinstance(s, int) for s in size):  # the form the fx frontend reads
            function = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(size) - 1]
            return self._emit(node, function, self._input(node.input[0]), size)
        self._emit(node, torch.amax, self._input(node.input[0]), axes, keepdim=True)

    def _onnx_globallppool(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, torch.linalg.vector_norm, self._input(node.input[0]), float(attrs.get("p", 2)),
                   self._spatial_axes(node), keepdim=True)

    def _reduce(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        op = node.op_type
        axes = self._ints(node, attrs, "axes", 1)
        keepdim = bool(attrs.get("keepdims", 1))
        x = self._input(node.input[0])
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                self.values[node.output[0]] = x
                return None
            rank = self._rank(node.input[0])
            if rank is None:
                raise self._refuse(node, "reduces all axes of an input of unknown rank")
            axes = list(range(rank))
        dims = tuple(axes)
        call = self.graph.call_function
        if op == "ReduceMean":
            return self._emit(node, torch.mean, x, dims, keepdim=keepdim)
        rank = self._rank(node.input[0])
        if op == "ReduceMax":
            if keepdim and rank in (3, 4, 5) and sorted(a % rank for a in dims) == list(range(2, rank)):
                # global max pooling, in the form the torch.fx frontend reads as pooling
                function = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[rank - 3]
                return self._emit(node, function, x, 1)
            return self._emit(node, torch.amax, x, dims, keepdim=keepdim)
        if op == "ReduceMin":
            return self._emit(node, torch.amin, x, dims, keepdim=keepdim)
        if op == "ReduceSum":
            return self._emit(node, torch.sum, x, dims, keepdim=keepdim)
        if op == "ReduceL1":
            return self._emit(node, torch.sum, call(torch.abs, (x,)), dims, keepdim=keepdim)
        if op == "ReduceL2":
            return self._emit(node, torch.linalg.vector_norm, x, 2.0, dims, keepdim=keepdim)
        if op == "ReduceSumSquare":
            return self._emit(node, torch.sum, call(operator.mul, (x, x)), dims, keepdim=keepdim)
        if op == "ReduceLogSum":
            return self._emit(node, torch.log, call(torch.sum, (x, dims), {"keepdim": keepdim}))
        if op == "ReduceLogSumExp":
            return self._emit(node, torch.logsumexp, x, dims, keepdim=keepdim)
        # ReduceProd: torch.prod takes one axis at a time; the highest first keeps the others' numbers
        if rank is None and any(a < 0 for a in dims):
            raise self._refuse(node, "reduces negative axes of an input of unknown rank")
        for axis in sorted((a % rank if rank else a for a in dims), reverse=True):
            x = call(torch.prod, (x, axis), {"keepdim": keepdim})
        self.values[node.output[0]] = x

    # -- activations --------------------------------------------------------------------------
    def _onnx_leakyrelu(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, F.leaky_relu, self._input(node.input[0]), float(attrs.get("alpha", 0.01)))

    def _onnx_elu(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, F.elu, self._input(node.input[0]), float(attrs.get("alpha", 1.0)))

    def _onnx_celu(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, F.celu, self._input(node.input[0]), float(attrs.get("alpha", 1.0)))

    def _onnx_selu(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        if "alpha" not in attrs and "gamma" not in attrs:
            return self._emit(node, F.selu, self._input(node.input[0]))
        alpha = float(attrs.get("alpha", 1.67326319217681884765625))
        gamma = float(attrs.get("gamma", 1.05070102214813232421875))
        elu = self.graph.call_function(F.elu, (self._input(node.input[0]), alpha))
        self._emit(node, operator.mul, elu, gamma)

    def _onnx_thresholdedrelu(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, F.threshold, self._input(node.input[0]), float(attrs.get("alpha", 1.0)), 0.0)

    def _onnx_prelu(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        slope = node.input[1]
        x = self._input(node.input[0])
        if slope in self.arrays and self.arrays[slope].size == 1:
            layer = nn.PReLU(1, init=float(self.arrays[slope].reshape(-1)[0]))
            name = self._layer(layer_name(node, slope), layer)
            self.values[node.output[0]] = self.graph.call_module(name, (x,))
            return None
        negative = self.graph.call_function(operator.lt, (x, 0.0))
        scaled = self.graph.call_function(operator.mul, (x, self._input(slope)))
        self._emit(node, torch.where, negative, scaled, x)

    def _onnx_softplus(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, F.softplus, self._input(node.input[0]))

    def _onnx_hardsigmoid(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
        scaled = self.graph.call_function(operator.add, (self.graph.call_function(
            operator.mul, (self._input(node.input[0]), alpha)), beta))
        self._emit(node, torch.clamp, scaled, 0.0, 1.0)

    def _onnx_gelu(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        approximate = attrs.get("approximate", b"none")
        approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
        self._emit(node, F.gelu, self._input(node.input[0]), approximate=approximate)

    def _onnx_clip(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        bounds = []
        for index, name in ((1, "min"), (2, "max")):
            tensor = self._optional(node, index)
            if tensor is None:
                bounds.append(float(attrs[name]) if name in attrs else None)  # opset 6 attributes
            else:
                bounds.append(self._operand(tensor))
        self._emit(node, torch.clamp, self._input(node.input[0]), *bounds)

    def _onnx_softmax(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._softmax(node, attrs, F.softmax)

    def _onnx_logsoftmax(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._softmax(node, attrs, F.log_softmax)

    def _softmax(self, node: onnx.NodeProto, attrs: dict[str, Any], function: Callable[..., Any]) -> None:
        x = self._input(node.input[0])
        if self.opset >= 13:
            return self._emit(node, function, x, int(attrs.get("axis", -1)))
        # before opset 13: the input is read as a matrix, axes [0, axis) by [axis, rank)
        rank = self._rank(node.input[0])
        if rank is None:
            raise self._refuse(node, f"(opset {self.opset}) has an input of unknown rank")
        axis = int(attrs.get("axis", 1)) % rank
        if axis == rank - 1:
            return self._emit(node, function, x, -1)
        call = self.graph.call_function
        matrix = call(torch.flatten, (x, axis))
        if axis > 1:
            matrix = call(torch.flatten, (matrix, 0, axis - 1))
        elif axis == 0:
            matrix = call(torch.reshape, (x, (1, -1)))
        normalised = call(function, (matrix, -1))
        self._emit(node, torch.reshape, normalised, self.graph.call_method("size", (x,)))

    # -- shapes -------------------------------------------------------------------------------
    def _onnx_flatten(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        rank = self._rank(node.input[0])
        if rank is None:
            raise self._refuse(node, "has an input of unknown rank")
        axis = int(attrs.get("axis", 1))
        axis = axis + rank if axis < 0 else axis
        x = self._input(node.input[0])
        if axis == 0:
            return self._emit(node, torch.reshape, x, (1, -1))
        if axis == rank:
            return self._emit(node, torch.reshape, x, (-1, 1))
        if axis == 1:
            return self._emit(node, torch.flatten, x, 1)
        tail = self.graph.call_function(torch.flatten, (x, axis))
        self._emit(node, torch.flatten, tail, 0, axis - 1)

    def _onnx_reshape(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        x = self._input(node.input[0])
        allowzero = bool(attrs.get("allowzero", 0))
        target = node.input[1]
        entries: list[int | Dim] | None
        if target in self.arrays:
            entries = [int(v) for v in np.asarray(self.arrays[target]).reshape(-1)]
        else:
            entries = self.shape_values.entries(target)
        if entries is None:
            return self._emit(node, onnx_reshape, x, self._input(target), allowzero)
        both = reshaped(node.input[0], entries, self.dims, allowzero)
        merged = flatten_range(*both) if both is not None else None
        if merged is not None:
            return self._emit(node, torch.flatten, x, *merged)
        sizes: list[Any] = []
        for axis, entry in enumerate(entries):
            if isinstance(entry, Dim):
                sizes.append(self._size(entry.tensor, entry.axis))
            elif entry == 0 and not allowzero:
                sizes.append(self._size(node.input[0], axis))
            else:
                sizes.append(int(entry))
        self._emit(node, torch.reshape, x, tuple(sizes))

    def _onnx_shape(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        shape = self.graph.call_function(torch._shape_as_tensor, (self._input(node.input[0]),))
        if "start" in attrs or "end" in attrs:
            shape = self.graph.call_function(
                operator.getitem, (shape, slice(int(attrs.get("start", 0)), attrs.get("end")))
            )
        self.values[node.output[0]] = shape

    def _onnx_size(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        shape = self.graph.call_function(torch._shape_as_tensor, (self._input(node.input[0]),))
        self.values[node.output[0]] = self.graph.call_method("prod", (shape,))

    def _onnx_gather(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        axis = int(attrs.get("axis", 0))
        if axis < 0:
            rank = self._rank(node.input[0])
            if rank is None:
                raise self._refuse(node, f"gathers along axis {axis} of an input of unknown rank")
            axis += rank
        indices = self._operand(node.input[1])  # a number index drops the axis, as ONNX's scalar indices do
        index = (slice(None),) * axis + (indices,)
        self._emit(node, operator.getitem, self._input(node.input[0]), index)

    def _onnx_gathernd(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        """``x[indices[..., 0], ..., indices[..., m - 1]]``: the index tensors' shape, then ``x``'s axes after ``m``."""
        batch_dims = int(attrs.get("batch_dims", 0))
        if batch_dims:
            raise self._refuse(node, f"has batch_dims={batch_dims}; only batch_dims=0 has a translation")
        dims = self.dims.get(node.input[1])
        if not dims or not isinstance(dims[-1], int):
            raise self._refuse(node, "takes indices whose last size is unknown")
        indices = self._input(node.input[1])
        leading = (slice(None),) * (len(dims) - 1)
        get = self.graph.call_function
        columns = tuple(get(operator.getitem, (indices, leading + (i,))) for i in range(dims[-1]))
        self._emit(node, operator.getitem, self._input(node.input[0]), columns)

    def _onnx_unsqueeze(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        axes = self._ints(node, attrs, "axes", 1)
        if not axes:
            raise self._refuse(node, "has no axes")
        rank = self._rank(node.input[0])
        if any(a < 0 for a in axes):
            if rank is None:
                raise self._refuse(node, "inserts negative axes into an input of unknown rank")
            axes = [a + rank + len(axes) if a < 0 else a for a in axes]
        x = self._input(node.input[0])
        for axis in sorted(axes):
            x = self.graph.call_function(torch.unsqueeze, (x, axis))
        self.values[node.output[0]] = x

    def _onnx_squeeze(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        axes = self._ints(node, attrs, "axes", 1)
        x = self._input(node.input[0])
        if axes:
            return self._emit(node, torch.squeeze, x, tuple(axes))
        self._emit(node, torch.squeeze, x)

    def _onnx_slice(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        starts = self._ints(node, attrs, "starts", 1)
        ends = self._ints(node, attrs, "ends", 2)
        if starts is None or ends is None:
            raise self._refuse(node, "has no starts or ends")
        axes = self._ints(node, attrs, "axes", 3) or list(range(len(starts)))
        steps = self._ints(node, attrs, "steps", 4) or [1] * len(starts)
        if any(step <= 0 for step in steps):
            raise self._refuse(node, f"has steps {steps}; only positive steps have a translation")
        if any(a < 0 for a in axes):
            rank = self._rank(node.input[0])
            if rank is None:
                raise self._refuse(node, "slices negative axes of an input of unknown rank")
            axes = [a + rank if a < 0 else a for a in axes]
        index: list[slice] = [slice(None)] * (max(axes) + 1)
        for axis, start, end, step in zip(axes, starts, ends, steps):
            index[axis] = slice(start, end, step)
        self._emit(node, operator.getitem, self._input(node.input[0]), tuple(index))

    def _onnx_concat(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, torch.cat, [self._input(t) for t in node.input], int(attrs.get("axis", 0)))

    def _onnx_transpose(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        perm = attrs.get("perm")
        if perm is None:
            rank = self._rank(node.input[0])
            if rank is None:
                raise self._refuse(node, "reverses the axes of an input of unknown rank")
            perm = list(reversed(range(rank)))
        self._emit(node, torch.permute, self._input(node.input[0]), tuple(int(p) for p in perm))

    def _onnx_cast(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        to = int(attrs["to"])
        if node.input[0] in self.arrays:
            self.arrays[node.output[0]] = np.asarray(self.arrays[node.input[0]]).astype(
                onnx.helper.tensor_dtype_to_np_dtype(to))
            return None
        dtype = _DTYPES.get(to)
        if dtype is None:
            raise self._refuse(node, f"casts to ONNX type {onnx.TensorProto.DataType.Name(to)}, which has no "
                                     "translation")
        self._emit(node, torch.Tensor.to, self._input(node.input[0]), dtype)

    def _onnx_castlike(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        to = self.types.get(node.input[1])
        if node.input[0] in self.arrays and to:
            self.arrays[node.output[0]] = np.asarray(self.arrays[node.input[0]]).astype(
                onnx.helper.tensor_dtype_to_np_dtype(to))
            return None
        self._emit(node, torch.Tensor.type_as, self._input(node.input[0]), self._input(node.input[1]))

    def _onnx_constantofshape(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        value = attrs.get("value")
        fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
        if node.input[0] in self.arrays:
            shape = [int(v) for v in np.asarray(self.arrays[node.input[0]]).reshape(-1)]
            self.arrays[node.output[0]] = np.full(shape, fill.reshape(()), dtype=fill.dtype)
            return None
        self.arrays[f"{node.output[0]}::value"] = fill
        self._emit(node, onnx_constant_of_shape, self._input(node.input[0]), self._input(f"{node.output[0]}::value"))

    def _onnx_expand(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._emit(node, onnx_expand, self._input(node.input[0]), self._input(node.input[1]))

    def _onnx_dropout(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        self._only_first_output(node, "the dropout mask")
        self.values[node.output[0]] = self._input(node.input[0])


def _torch_pads(begin: list[int], end: list[int]) -> list[int]:
    """ONNX (begin, end) pads per axis as ``F.pad``'s list: last axis first."""
    return [p for axis in reversed(range(len(begin))) for p in (begin[axis], end[axis])]


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

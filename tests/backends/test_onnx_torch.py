"""to_torch on TorchScript exports and on hand-written graphs: every operator the ONNX frontend reads."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import tunnelgraph as tg
from tunnelgraph.backends.onnx import run_onnx
from tunnelgraph.backends.onnx_torch import torch_name
from tunnelgraph.frontends.onnx import TRANSLATED_OPERATORS
from zoo import TRACEABLE, ZooEntry, example_input

RNG = np.random.default_rng(0)


def torchscript(model: nn.Module, x: torch.Tensor, *, dynamic: bool, fold: bool) -> onnx.ModelProto:
    """The TorchScript exporter's ONNX (``dynamo=False``); ``dynamic``: a symbolic batch axis."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (x,), buffer, dynamo=False, opset_version=17, input_names=["input"],
            dynamic_axes={"input": {0: "batch"}} if dynamic else None, do_constant_folding=fold,
            training=torch.onnx.TrainingMode.EVAL if fold else torch.onnx.TrainingMode.PRESERVE,
        )
    return onnx.load_from_string(buffer.getvalue())


class ViewReduce(nn.Module):
    """Two fresh batch norms (exported as Identity of one initializer), x.view(x.size(0), -1), amax, sum, amin."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.bn(self.conv(x))).relu()
        pooled = x.amax(dim=(2, 3)).sum(dim=1, keepdim=True) + x.amin(dim=(2, 3)).mean(1, keepdim=True)
        return self.fc(h.view(h.size(0), -1)) + pooled


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic_batch", "static"])
def test_torchscript_shape_and_reductions(dynamic: bool, fold: bool) -> None:
    model = ViewReduce().eval()
    x = torch.randn(2, 3, 6, 6)
    proto = torchscript(model, x, dynamic=dynamic, fold=fold)
    ops = {node.op_type for node in proto.graph.node}
    assert "ReduceMax" in ops and ("Shape" in ops or not dynamic) and ("Identity" in ops or fold)
    converted = tg.to_torch(proto)
    assert tg.verify(model, converted, x, rtol=1e-5, atol=1e-6).passed
    if dynamic:  # the batch axis is symbolic: another batch size runs too
        assert tg.verify(model, converted, torch.randn(5, 3, 6, 6), rtol=1e-5, atol=1e-6).passed
    # the flatten is proven, so the converted model's analysis matches the ONNX model's
    onnx_sites = {(torch_name(s.group_name), s.channel, s.inbound_size, s.outbound_size)
                  for s in tg.find_sites(proto, through=("batchnorm",))}
    torch_sites = {(s.group_name, s.channel, s.inbound_size, s.outbound_size)
                   for s in tg.find_sites(converted, x, through=("batchnorm",))}
    assert onnx_sites == torch_sites
    assert sorted(sizes for *_, sizes in [(s[:2], s[2:]) for s in onnx_sites]) == [(3 * 9 + 1, 5 * 16)] * 4


@pytest.mark.parametrize("entry", TRACEABLE, ids=[e.name for e in TRACEABLE])
def test_torchscript_exports_of_the_zoo(entry: ZooEntry) -> None:
    model = entry.build().eval()
    x = example_input(entry)
    proto = torchscript(model, x, dynamic=True, fold=False)
    converted = tg.to_torch(proto)
    assert tg.verify(model, converted, x, rtol=1e-5, atol=1e-5).passed
    batch = torch.cat([x, x[:1]])  # a batch size the export never saw
    assert tg.verify(model, converted, batch, rtol=1e-5, atol=1e-5).passed


# -- hand-written graphs: one case per operator ----------------------------------------------------------------


@dataclass
class Case:
    """One small ONNX graph; inputs are float tensors of the given shapes unless ``feeds`` says otherwise."""

    name: str
    nodes: list[Any]
    inputs: dict[str, tuple[int, ...]]
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    output: str = "y"
    output_type: int = TensorProto.FLOAT
    opset: int = 18
    positive: bool = False
    feeds: dict[str, np.ndarray] = field(default_factory=dict)

    def model(self) -> onnx.ModelProto:
        values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in self.inputs.items()]
        values += [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                   for n, a in self.feeds.items()]
        graph = helper.make_graph(
            self.nodes, self.name, values, [helper.make_tensor_value_info(self.output, self.output_type, None)],
            [numpy_helper.from_array(a, n) for n, a in self.initializers.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # declares the output's shape
        onnx.checker.check_model(model, full_check=True)
        return model

    def arrays(self) -> list[np.ndarray]:
        generator = np.random.default_rng(1)
        arrays = []
        for shape in self.inputs.values():
            array = generator.standard_normal(shape).astype(np.float32)
            arrays.append(np.abs(array) + 0.5 if self.positive else array)
        return arrays + list(self.feeds.values())


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def node(op: str, inputs: list[str], output: str = "y", **attrs: Any) -> Any:
    return helper.make_node(op, inputs, [output], **attrs)


def unary(op: str, positive: bool = False, opset: int = 18, **attrs: Any) -> Case:
    return Case(op, [node(op, ["x"], **attrs)], {"x": (2, 3, 4)}, positive=positive, opset=opset)


X4 = {"x": (2, 3, 5, 5)}
BOOL = TensorProto.BOOL
INT = TensorProto.INT64

CASES: list[Case] = [
    # layers
    Case("Conv", [node("Conv", ["x", "w", "b"], pads=[0, 1, 1, 0], strides=[2, 1])], X4,
         {"w": f32(4, 3, 3, 3), "b": f32(4)}),
    Case("Conv_same_lower", [node("Conv", ["x", "w"], auto_pad="SAME_LOWER", strides=[2, 2])], X4,
         {"w": f32(4, 3, 3, 2)}),
    Case("Conv_weight_input", [node("Conv", ["x", "w"], group=3)], {"x": (2, 3, 5, 5), "w": (6, 1, 3, 3)}),
    Case("Gemm", [node("Gemm", ["x", "w", "c"], transB=1, alpha=0.5, beta=2.0)], {"x": (2, 6)},
         {"w": f32(4, 6), "c": f32(4)}),
    Case("Gemm_transA_broadcast", [node("Gemm", ["x", "w", "c"], transA=1, alpha=1.5)], {"x": (6, 2)},
         {"w": f32(6, 4), "c": f32(2, 4)}),
    Case("Gemm_weight_input", [node("Gemm", ["x", "w"], transB=1)], {"x": (2, 6), "w": (4, 6)}),
    Case("MatMul", [node("MatMul", ["x", "w"], "m"), node("Add", ["m", "b"])], {"x": (2, 5, 6)},
         {"w": f32(6, 4), "b": f32(4)}),
    Case("MatMul_computed", [node("MatMul", ["x", "v"])], {"x": (2, 5, 6), "v": (2, 6, 3)}),
    Case("BatchNormalization", [node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)], X4,
         {"s": f32(3), "b": f32(3), "m": f32(3), "v": np.abs(f32(3)) + 0.5}),
    Case("BatchNormalization_inputs", [node("BatchNormalization", ["x", "s", "b", "m", "v"])],
         {"x": (2, 3, 4), "s": (3,), "b": (3,), "m": (3,)}, {"v": np.abs(f32(3)) + 0.5}),
    Case("LayerNormalization", [node("LayerNormalization", ["x", "s", "b"], epsilon=1e-4)], {"x": (2, 3, 4)},
         {"s": f32(4), "b": f32(4)}),
    # activations
    unary("Relu"), unary("LeakyRelu", alpha=0.2), unary("Sigmoid"), unary("Tanh"), unary("Elu", alpha=0.7),
    unary("Selu"), unary("Selu", alpha=1.5, gamma=1.1), unary("Softplus"), unary("Softsign"), unary("HardSwish"),
    unary("HardSigmoid", alpha=0.3, beta=0.4), unary("Gelu", opset=20, approximate="tanh"), unary("Erf"),
    unary("Celu", alpha=0.8), unary("Mish"), unary("ThresholdedRelu", alpha=0.5), unary("Abs"), unary("Neg"),
    unary("Exp"), unary("Log", positive=True), unary("Sqrt", positive=True), unary("Reciprocal", positive=True),
    unary("Identity"), unary("Softmax", axis=1), unary("LogSoftmax", axis=1),
    unary("Softmax", opset=11, axis=1),  # before opset 13: the input as a matrix
    Case("Clip", [node("Clip", ["x", "lo", "hi"])], {"x": (2, 3, 4)},
         {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}),
    Case("Clip_computed_bounds", [node("Clip", ["x", "lo"])], {"x": (2, 3, 4), "lo": ()}),
    Case("PRelu", [node("PRelu", ["x", "a"])], X4, {"a": np.array([0.25], np.float32)}),
    Case("PRelu_per_channel", [node("PRelu", ["x", "a"])], X4, {"a": f32(3, 1, 1)}),
    Case("Dropout", [node("Dropout", ["x"], ratio=0.5)], {"x": (2, 3)}, opset=11),
    # comparisons and selection
    Case("Greater", [node("Greater", ["x", "c"])], {"x": (2, 3)}, {"c": np.array(0.1, np.float32)},
         output_type=BOOL),
    Case("Less_number_first", [node("Less", ["c", "x"])], {"x": (2, 3)}, {"c": np.array(0.1, np.float32)},
         output_type=BOOL),
    Case("GreaterOrEqual", [node("GreaterOrEqual", ["x", "z"])], {"x": (2, 3), "z": (2, 3)}, output_type=BOOL),
    Case("LessOrEqual", [node("LessOrEqual", ["x", "c"])], {"x": (2, 3)}, {"c": np.array(0.0, np.float32)},
         output_type=BOOL),
    Case("Equal", [node("Relu", ["x"], "r"), node("Equal", ["r", "c"])], {"x": (2, 3)},
         {"c": np.array(0.0, np.float32)}, output_type=BOOL),
    Case("Where", [node("Greater", ["x", "c"], "g"), node("Where", ["g", "x", "c"])], {"x": (2, 3)},
         {"c": np.array(0.2, np.float32)}),
    # element-wise arithmetic
    Case("Add", [node("Add", ["x", "z"])], {"x": (2, 3, 4), "z": (3, 1)}),
    Case("Sub_number_first", [node("Sub", ["c", "x"])], {"x": (2, 3)}, {"c": np.array(1.5, np.float32)}),
    Case("Mul", [node("Mul", ["x", "c"])], {"x": (2, 3)}, {"c": f32(3)}),
    Case("Div", [node("Div", ["x", "z"])], {"x": (2, 3)}, {"z": np.abs(f32(2, 3)) + 0.5}),
    # pooling and reductions
    Case("MaxPool", [node("MaxPool", ["x"], kernel_shape=[3, 2], pads=[1, 0, 2, 1], strides=[2, 1])], X4),
    Case("MaxPool_ceil", [node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
                               dilations=[1, 2])], X4),
    Case("AveragePool_ceil", [node("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
                                   pads=[1, 1, 1, 1])], X4),
    Case("MaxPool_same", [node("MaxPool", ["x"], kernel_shape=[2, 2], auto_pad="SAME_UPPER", strides=[2, 2])], X4),
    Case("AveragePool", [node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])], X4),
    Case("AveragePool_include_pad_asymmetric", [node("AveragePool", ["x"], kernel_shape=[2, 2],
                                                     pads=[0, 1, 1, 0], count_include_pad=1)], X4),
    Case("LpPool", [node("LpPool", ["x"], kernel_shape=[2, 3], pads=[1, 1, 1, 1], strides=[1, 2], p=3)], X4),
    Case("GlobalAveragePool", [node("GlobalAveragePool", ["x"])], X4),
    Case("GlobalMaxPool", [node("GlobalMaxPool", ["x"])], X4),
    Case("GlobalLpPool", [node("GlobalLpPool", ["x"], p=2)], X4),
    Case("ReduceMean", [node("ReduceMean", ["x", "a"], keepdims=0)], X4, {"a": i64(2, -1)}),
    Case("ReduceMax", [node("ReduceMax", ["x", "a"])], X4, {"a": i64(1)}),
    Case("ReduceMax_global", [node("ReduceMax", ["x", "a"])], X4, {"a": i64(-1, 2)}),
    Case("ReduceMax_all_axes", [node("ReduceMax", ["x"], keepdims=0)], X4),
    Case("ReduceMin", [node("ReduceMin", ["x", "a"], keepdims=0)], X4, {"a": i64(-1, 1)}),
    Case("ReduceSum", [node("ReduceSum", ["x", "a"])], X4, {"a": i64(2, 3)}),
    Case("ReduceSum_opset11_attribute", [node("ReduceSum", ["x"], axes=[1], keepdims=0)], X4, opset=11),
    Case("ReduceProd", [node("ReduceProd", ["x", "a"], keepdims=0)], X4, {"a": i64(1, 3)}),
    Case("ReduceL1", [node("ReduceL1", ["x", "a"])], X4, {"a": i64(1)}),
    Case("ReduceL2", [node("ReduceL2", ["x", "a"], keepdims=0)], X4, {"a": i64(2, 3)}),
    Case("ReduceLogSum", [node("ReduceLogSum", ["x", "a"])], X4, {"a": i64(1)}, positive=True),
    Case("ReduceLogSumExp", [node("ReduceLogSumExp", ["x", "a"])], X4, {"a": i64(3)}),
    Case("ReduceSumSquare", [node("ReduceSumSquare", ["x", "a"], keepdims=0)], X4, {"a": i64(0, 2)}),
    # shapes
    Case("Concat", [node("Concat", ["x", "z"], axis=1)], {"x": (2, 3, 4), "z": (2, 2, 4)}),
    Case("Flatten_axis2", [node("Flatten", ["x"], axis=2)], X4),
    Case("Flatten_axis0", [node("Flatten", ["x"], axis=0)], X4),
    Case("Flatten_negative", [node("Flatten", ["x"], axis=-1)], X4),
    Case("Reshape", [node("Reshape", ["x", "s"])], X4, {"s": i64(0, -1, 5)}),
    Case("Reshape_computed", [  # x.view(x.size(0), 3, -1) as TorchScript writes it
        node("Shape", ["x"], "shape"), node("Gather", ["shape", "zero"], "batch", axis=0),
        node("Unsqueeze", ["batch", "axes"], "batch1"), node("Concat", ["batch1", "rest"], "target", axis=0),
        node("Reshape", ["x", "target"])], X4, {"zero": np.array(0, np.int64), "axes": i64(0), "rest": i64(3, -1)}),
    Case("Reshape_target_input", [node("Reshape", ["x", "s"])], X4, feeds={"s": i64(2, 0, -1)}),
    Case("Shape", [node("Shape", ["x"], start=1, end=-1)], X4, output_type=INT),
    Case("ConstantOfShape_Expand", [  # a target of ones the length of x's rank, as TorchScript's x.expand writes it
        node("Shape", ["x"], "s"), node("Shape", ["s"], "rank"),
        node("ConstantOfShape", ["rank"], "ones", value=helper.make_tensor("v", INT, [1], [1])),
        node("Mul", ["ones", "scale"], "target"), node("Expand", ["x", "target"])], {"x": (1, 3, 4)},
        {"scale": i64(2, 1, 1)}),
    Case("Expand_broadcasts_both_ways", [node("Expand", ["x", "s"])], {"x": (3, 1)}, {"s": i64(2, 1, 4)}),
    Case("ConstantOfShape_stored_shape", [node("ConstantOfShape", ["s"], "z"), node("Add", ["x", "z"])],
         {"x": (2, 3)}, {"s": i64(2, 3)}),
    Case("Size", [node("Size", ["x"])], X4, output_type=INT),
    Case("Gather", [node("Gather", ["x", "i"], axis=1)], X4, {"i": i64(2, 0)}),
    Case("Gather_scalar", [node("Gather", ["x", "i"], axis=-1)], X4, {"i": np.array(-2, np.int64)}),
    Case("GatherND", [node("GatherND", ["x", "i"])], X4, {"i": np.array([[[1, -1], [0, 2]], [[1, 0], [0, 0]]])}),
    Case("GatherND_adaptive_pooling", [  # as the dynamo exporter writes adaptive average pooling
        node("Transpose", ["x"], "t", perm=[2, 3, 0, 1]), node("GatherND", ["t", "i"], "g"),
        node("Transpose", ["g"], "u", perm=[4, 5, 0, 1, 2, 3]), node("ReduceMean", ["u", "a"], keepdims=0)], X4,
         {"i": np.indices((2, 2, 2, 2)).transpose(1, 2, 3, 4, 0)[..., [0, 2]] * 2, "a": i64(-3, -1)}),
    Case("Transpose", [node("Transpose", ["x"], perm=[0, 2, 3, 1])], X4),
    Case("Transpose_reversed", [node("Transpose", ["x"])], X4),
    Case("Unsqueeze", [node("Unsqueeze", ["x", "a"])], {"x": (2, 3)}, {"a": i64(-1, 0)}),
    Case("Unsqueeze_opset11_attribute", [node("Unsqueeze", ["x"], axes=[1])], {"x": (2, 3)}, opset=11),
    Case("Squeeze", [node("Squeeze", ["x", "a"])], {"x": (2, 1, 3, 1)}, {"a": i64(1, -1)}),
    Case("Squeeze_all", [node("Squeeze", ["x"])], {"x": (2, 1, 3, 1)}),
    Case("Slice", [node("Slice", ["x", "s", "e", "a", "t"])], X4,
         {"s": i64(-4, 1), "e": i64(2**62, 4), "a": i64(3, 1), "t": i64(2, 1)}),
    Case("Cast", [node("Cast", ["x"], to=TensorProto.INT64)], {"x": (2, 3)}, output_type=INT),
    Case("Cast_constant", [node("Cast", ["c"], "cd", to=TensorProto.DOUBLE),
                           node("Cast", ["x"], "xd", to=TensorProto.DOUBLE), node("Mul", ["xd", "cd"])],
         {"x": (2, 3)}, {"c": f32(3)}, output_type=TensorProto.DOUBLE),
    Case("CastLike", [node("CastLike", ["c", "x"], "cc"), node("Add", ["x", "cc"])], {"x": (2, 3)},
         {"c": np.ones(3, np.float64)}),
    Case("Constant", [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(f32(3), "v")),
                      node("Mul", ["x", "c"])], {"x": (2, 3)}),
    Case("integer_shape_arithmetic", [  # ONNX Div of integers truncates
        node("Shape", ["x"], "shape"), node("Neg", ["shape"], "negative"), node("Div", ["negative", "two"])],
         X4, {"two": np.array(2, np.int64)}, output_type=INT),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hand_written_operator_matches_onnxruntime(case: Case) -> None:
    model = case.model()
    arrays = case.arrays()
    expected = run_onnx(model, arrays)[0]
    converted = tg.to_torch(model)
    with torch.no_grad():
        got = converted(*(torch.from_numpy(a) for a in arrays))
    got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    assert got.shape == expected.shape and got.dtype.kind == expected.dtype.kind, (got.dtype, expected.dtype)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_every_operator_the_frontend_reads_has_a_case() -> None:
    covered = {n.op_type for case in CASES for n in case.nodes}
    assert TRANSLATED_OPERATORS - covered == set()


def test_an_operator_without_translation_is_refused_by_name() -> None:
    nodes = [node("Trilu", ["x"], "z"), node("Add", ["x", "z"])]
    model = Case("refused", nodes, {"x": (2, 3)}).model()
    with pytest.raises(tg.TraceError, match=r"no translation for ONNX operator Trilu \(node 'z'\)"):
        tg.to_torch(model)
    used_indices = Case("indices", [helper.make_node("MaxPool", ["x"], ["p", "i"], kernel_shape=[2]),
                                    node("Cast", ["i"], to=TensorProto.FLOAT)], {"x": (1, 2, 4)}).model()
    with pytest.raises(tg.TraceError, match="MaxPool node 'p' output 1 .*indices.* has no translation"):
        tg.to_torch(used_indices)


def test_shape_computations_run_again_under_fx() -> None:
    """A runtime reshape target is one opaque call when tg.trace re-traces the converted module."""
    case = next(c for c in CASES if c.name == "Reshape_target_input")
    converted = tg.to_torch(case.model())
    arrays = [torch.from_numpy(a) for a in case.arrays()]
    graph = tg.trace(converted, arrays)
    reshapes = [n for n in graph if n.attrs.get("detail") == "function onnx_reshape"]
    assert len(reshapes) == 1


def test_batchnorm_parameters_from_constant_nodes() -> None:
    """Constant nodes and Identity of an initializer are read as stored tensors (KeyError before)."""
    constant = helper.make_node("Constant", [], ["bn.weight"], value=numpy_helper.from_array(f32(4) + 2, "v"))
    nodes = [node("Conv", ["x", "c.weight", "c.bias"], "h"), constant,
             node("Identity", ["bias"], "bn.bias"), node("Identity", ["bn.bias"], "bn.running_mean"),
             node("BatchNormalization", ["h", "bn.weight", "bn.bias", "bn.running_mean", "var"], "n"),
             node("Relu", ["n"], "r"), node("Conv", ["r", "d.weight"])]
    case = Case("constants", nodes, {"x": (2, 2, 6, 6)},
                {"c.weight": f32(4, 2, 3, 3), "c.bias": f32(4), "bias": f32(4), "var": np.abs(f32(4)) + 0.5,
                 "d.weight": f32(3, 4, 3, 3)})
    model = case.model()
    converted = tg.to_torch(model)
    assert isinstance(converted.get_submodule("bn"), nn.BatchNorm2d)
    x = torch.from_numpy(case.arrays()[0])
    assert tg.verify(model, converted, x, rtol=1e-5, atol=1e-6).passed

"""ONNX written by hand (not by PyTorch), unknown operators, and safe loading."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import tunnelgraph as tg
from tunnelgraph.frontends.onnx import read_onnx

RNG = np.random.default_rng(0)


def _init(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def hand_written(custom: bool = False) -> onnx.ModelProto:
    """conv (auto_pad SAME_UPPER) -> relu -> flatten -> Gemm(transB=0, alpha=0.5) -> tanh -> MatMul+Add -> out.

    With ``custom``, a custom-domain op sits between the Gemm and the tanh.
    """
    nodes = [
        helper.make_node("Conv", ["x", "c.weight", "c.bias"], ["c"], auto_pad="SAME_UPPER", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "g_w", "g_b"], ["g"], alpha=0.5, beta=1.0, transB=0),
    ]
    if custom:
        nodes.append(helper.make_node("Mystery", ["g"], ["m"], domain="com.example"))
        nodes.append(helper.make_node("Tanh", ["m"], ["t"]))
    else:
        nodes.append(helper.make_node("Tanh", ["g"], ["t"]))
    nodes += [
        helper.make_node("MatMul", ["t", "m_w"], ["mm"]),
        helper.make_node("Add", ["mm", "m_b"], ["y"]),
    ]
    initializers = [
        _init("c.weight", 4, 2, 3, 3), _init("c.bias", 4), _init("g_w", 4 * 5 * 5, 6), _init("g_b", 6),
        _init("m_w", 6, 3), _init("m_b", 3),
    ]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], initializers,
    )
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("com.example", 1)] if custom else [])
    model = helper.make_model(graph, opset_imports=opsets)
    if not custom:
        onnx.checker.check_model(model, full_check=True)
    return model


def test_hand_written_onnx_is_analysed_and_rewritten() -> None:
    model = hand_written()
    x = torch.randn(2, 2, 5, 5)
    report = tg.analyze(model)
    sites = {s.name: s for s in report.sites}
    # the conv (named after its weight) and the Gemm (named after its node output) are sites
    assert sites["c[0]"].inbound_size == 2 * 9 + 1 and sites["c[0]"].outbound_size == 6 * 25
    gemm = next(s for s in report.sites if s.group_name not in ("c",))
    assert gemm.inbound_size == 4 * 25 + 1 and gemm.outbound_size == 3
    for site in (sites["c[2]"], gemm):
        lam = RNG.uniform(0, 1, site.outbound_size)
        rewritten = tg.rewrite(model, site, lam)
        onnx.checker.check_model(rewritten, full_check=True)
        assert tg.verify(model, rewritten, x, rtol=1e-5, atol=1e-6).passed
    widths = {t.name: tuple(t.dims) for t in tg.rewrite(model, gemm, 0.5).graph.initializer}
    assert widths["g_w"] == (100, 7) and widths["g_b"] == (7,) and widths["m_w"] == (7, 3)


def test_unknown_operator_blocks_and_is_named() -> None:
    report = tg.analyze(hand_written(custom=True))
    blocked = [g for g in report.groups if not g.legal]
    text = report.to_markdown()
    assert any("com.example::Mystery" in reason for g in blocked for reason in g.reasons)
    assert "com.example::Mystery" in text
    assert {s.group_name for s in report.sites} == {"c"}


def test_reducibility_of_a_planted_onnx_model() -> None:
    model = hand_written()
    tensors = {t.name: t for t in model.graph.initializer}
    weight = numpy_helper.to_array(tensors["c.weight"]).copy()
    bias = numpy_helper.to_array(tensors["c.bias"]).copy()
    weight[3], bias[3] = weight[1], bias[1]  # redundant filter
    matmul = numpy_helper.to_array(tensors["m_w"]).copy()
    matmul[4] = 0  # the Gemm's unit 4 (through tanh) feeds the MatMul's row 4: inconsequential
    for name, value in (("c.weight", weight), ("c.bias", bias), ("m_w", matmul)):
        tensors[name].CopyFrom(numpy_helper.from_array(value, name))
    found = {(f.unit.split("[")[0] == "c", f.channel, f.condition) for f in tg.analyze(model).reducibility}
    assert found == {(True, 3, "redundant"), (False, 4, "inconsequential")}


def test_truncated_and_foreign_files_get_clear_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.onnx"
    onnx.save(hand_written(), good)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(tg.TraceError, match="not an ONNX model or is truncated"):
        tg.load_onnx(truncated)
    foreign = tmp_path / "notes.onnx"
    foreign.write_text("this is not a model\n" * 10)
    with pytest.raises(tg.TraceError, match="not an ONNX model"):
        tg.find_sites(foreign)
    with pytest.raises(tg.TraceError, match="no ONNX file"):
        tg.load_onnx(tmp_path / "missing.onnx")


def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    model = hand_written()
    folder = tmp_path / "model"
    folder.mkdir()
    tensor = next(t for t in model.graph.initializer if t.name == "g_w")
    onnx.external_data_helper.set_external_data(tensor, location="../../etc/passwd")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    path = folder / "evil.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(tg.TraceError, match="outside the model's folder"):
        tg.load_onnx(path)


def test_external_data_beside_the_model_loads_and_saves(tmp_path: Path) -> None:
    model = hand_written()
    path = tmp_path / "big.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="big.data",
              size_threshold=0)
    assert (tmp_path / "big.data").is_file()
    sites = tg.find_sites(path)
    rewritten = tg.rewrite(path, sites[0], 0.5)
    out = tmp_path / "rewritten.onnx"
    onnx.save(rewritten, out, save_as_external_data=True, location="rewritten.data", size_threshold=0)
    x = torch.randn(2, 2, 5, 5)
    assert tg.verify(path, out, x, rtol=1e-5, atol=1e-6).passed


NO_TORCH = '''
import sys
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import tunnelgraph as tg

rng = np.random.default_rng(0)
def init(name, *shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
graph = helper.make_graph(
    [helper.make_node("Conv", ["x", "a.weight", "a.bias"], ["h"], pads=[1, 1, 1, 1]),
     helper.make_node("Relu", ["h"], ["r"]),
     helper.make_node("Conv", ["r", "b.weight", "b.bias"], ["y"])],
    "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
    [init("a.weight", 4, 2, 3, 3), init("a.bias", 4), init("b.weight", 3, 4, 3, 3), init("b.bias", 3)])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
sites = tg.find_sites(model)
report = tg.analyze(model)
opened = tg.rewrite(model, sites[1], 0.25)
closed = tg.merge(opened, "a[4]", into=1)
same = tg.reorganize(model, merge=(sites[2], 0), clone=3, lam=0.5)
assert [s.name for s in sites] == ["a[0]", "a[1]", "a[2]", "a[3]"], sites
assert "torch" not in sys.modules, "torch was imported"
print("ok", len(report.groups))
'''


def test_the_onnx_path_does_not_import_torch() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_reduce_an_onnx_model() -> None:
    model = hand_written()
    tensors = {t.name: t for t in model.graph.initializer}
    weight, bias = numpy_helper.to_array(tensors["c.weight"]).copy(), numpy_helper.to_array(tensors["c.bias"]).copy()
    weight[3], bias[3] = weight[1], bias[1]  # filter 3 redundant with filter 1
    gemm_w = numpy_helper.to_array(tensors["g_w"]).copy()
    gemm_b = numpy_helper.to_array(tensors["g_b"]).copy()
    gemm_w[:, 2], gemm_b[2] = 0.0, 0.8  # Gemm unit 2 is constant tanh(0.5 * 0 + 0.8)
    for name, value in (("c.weight", weight), ("c.bias", bias), ("g_w", gemm_w), ("g_b", gemm_b)):
        tensors[name].CopyFrom(numpy_helper.from_array(value, name))
    x = torch.randn(2, 2, 5, 5)
    smaller, report = tg.reduce(model, x)
    assert {(f.unit.startswith("c["), f.channel, f.condition) for f in report.applied} == {
        (True, 3, "redundant"), (False, 2, "constant"),
    }
    shapes = {t.name: tuple(t.dims) for t in smaller.graph.initializer}
    assert shapes["c.weight"] == (3, 2, 3, 3) and shapes["g_w"] == (75, 5) and shapes["m_w"] == (5, 3)
    # conv 3 x (2*3*3) + 3, Gemm 75 x 5 + 5, MatMul 5 x 3 + 3
    assert (report.parameters_before, report.parameters_after) == (703, 3 * 18 + 3 + 75 * 5 + 5 + 5 * 3 + 3)
    assert tg.verify(model, smaller, x, rtol=1e-5, atol=1e-6).passed


# -- constants, graph inputs, framework-neutral names ---------------------------------------------------------


def _conv_bn_conv(bn_nodes: list[onnx.NodeProto], extra_inputs: list[onnx.ValueInfoProto],
                  initializers: list[TensorProto]) -> onnx.ModelProto:
    """conv 'c' -> BatchNormalization(bn.weight, bn.bias, bn.running_mean, bn.running_var) -> relu -> conv 'd'."""
    nodes = [helper.make_node("Conv", ["x", "c.weight", "c.bias"], ["h"], pads=[1, 1, 1, 1])] + bn_nodes + [
        helper.make_node("BatchNormalization", ["h", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
                         ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Conv", ["r", "d.weight"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 5, 5])] + extra_inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 3, 3])],
        [_init("c.weight", 4, 2, 3, 3), _init("c.bias", 4), _init("d.weight", 3, 4, 3, 3)] + initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_batchnorm_parameters_from_constant_nodes_are_read() -> None:
    """A Constant node and an Identity of an initializer as batch-norm parameters (KeyError before)."""
    variance = numpy_helper.from_array((np.abs(RNG.standard_normal(4)) + 0.5).astype(np.float32), "v")
    bn_nodes = [
        helper.make_node("Constant", [], ["bn.weight"], value=numpy_helper.from_array(
            RNG.standard_normal(4).astype(np.float32) + 2, "w")),
        helper.make_node("Constant", [], ["bn.running_var"], value=variance),
        helper.make_node("Identity", ["shared"], ["bn.bias"]),
        helper.make_node("Identity", ["shared"], ["bn.running_mean"]),
    ]
    model = _conv_bn_conv(bn_nodes, [], [_init("shared", 4)])
    sites = tg.find_sites(model, through=("batchnorm",))
    assert [s.name for s in sites] == [f"c[{c}]" for c in range(4)]
    assert sites[0].inbound_size == 2 * 9 + 1 and sites[0].outbound_size == 3 * 9
    assert tg.find_sites(model) == []  # batch norm is not passed by default
    x = torch.randn(2, 2, 5, 5)
    rewritten = tg.rewrite(model, sites[2], RNG.uniform(0, 1, sites[2].outbound_size), through=("batchnorm",))
    assert tg.verify(model, rewritten, x, rtol=1e-5, atol=1e-6).passed
    widths = {t.name: tuple(t.dims) for t in rewritten.graph.initializer}
    # each Identity output became its own parameter, rewritten with the channel; the source stays
    assert widths["bn.bias"] == widths["bn.running_mean"] == widths["bn.weight"] == (5,)
    assert widths["shared"] == (4,)
    assert tg.verify(model, tg.merge(rewritten, "c[4]", into=2, through=("batchnorm",)), x, rtol=1e-5,
                     atol=1e-6).passed


def test_batchnorm_parameter_as_graph_input_blocks_with_the_reason() -> None:
    inputs = [helper.make_tensor_value_info("bn.running_mean", TensorProto.FLOAT, [4])]
    variance = numpy_helper.from_array((np.abs(RNG.standard_normal(4)) + 0.5).astype(np.float32), "bn.running_var")
    model = _conv_bn_conv([], inputs, [_init("bn.weight", 4), _init("bn.bias", 4), variance])
    report = tg.analyze(model, through=("batchnorm",))
    assert report.sites == []
    (group,) = [g for g in report.groups if g.name == "c"]
    assert any("running_mean 'bn.running_mean' is a graph input" in reason for reason in group.reasons), group.reasons
    # the graph input is no parameter: to_torch reads it when the model runs
    converted = tg.to_torch(model)
    x, mean = torch.randn(2, 2, 5, 5), torch.randn(4)
    assert tg.verify(model, converted, (x, mean), rtol=1e-5, atol=1e-6).passed


def test_a_literal_width_in_a_reshape_target_computed_at_run_time_blocks() -> None:
    """x.view(x.size(0), 100) as a traced export writes it: rewrites could not update the 100."""
    nodes = [
        helper.make_node("Conv", ["x", "c.weight"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["h"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "width"], ["target"], axis=0),
        helper.make_node("Reshape", ["h", "target"], ["f"]),
        helper.make_node("Gemm", ["f", "g.weight"], ["y"], transB=1),
    ]
    initializers = [_init("c.weight", 4, 2, 3, 3), _init("g.weight", 3, 100),
                    numpy_helper.from_array(np.array(0, np.int64), "zero"),
                    numpy_helper.from_array(np.array([0], np.int64), "axes")]

    def model(width: int) -> onnx.ModelProto:
        literal = numpy_helper.from_array(np.array([width], np.int64), "width")
        graph = helper.make_graph(
            nodes, "view", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 5, 5])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], initializers + [literal],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    report = tg.analyze(model(100))
    (group,) = [g for g in report.groups if g.name == "c"]
    assert not group.legal and any("literal size 100" in reason for reason in group.reasons), group.reasons
    # with -1 the width follows the channels: the symbolic batch axis cancels and the flatten is proven
    sites = tg.find_sites(model(-1))
    assert [s.name for s in sites] == [f"c[{c}]" for c in range(4)] and sites[0].outbound_size == 3 * 25
    rewritten = tg.rewrite(model(-1), sites[1], 0.3)
    assert tg.verify(model(-1), rewritten, torch.randn(3, 2, 5, 5), rtol=1e-5, atol=1e-6).passed


class _PoolNet(torch.nn.Module):
    """conv1 (a planted unit) -> activation -> pooling -> conv2 -> flatten -> linear."""

    def __init__(self, activation: torch.nn.Module, pool: torch.nn.Module, features: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.act = activation
        self.pool = pool
        self.conv2 = torch.nn.Conv2d(4, 3, 1)
        self.fc = torch.nn.Linear(features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv2(self.pool(self.act(self.conv1(x)))), 1))


POOLINGS = [  # (name, activation, pooling, features after conv2, planted factor of unit 3 over unit 1)
    ("avg_pool", torch.nn.Tanh(), torch.nn.AvgPool2d(2), 3 * 3 * 3, -1.0),
    ("global_avg_pool", torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1), 3, -1.0),
    ("max_pool", torch.nn.ReLU(), torch.nn.MaxPool2d(2), 3 * 3 * 3, 2.0),
    ("global_max_pool", torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1), 3, 2.0),
]


@pytest.mark.parametrize("name, activation, pool, features, factor", POOLINGS, ids=[p[0] for p in POOLINGS])
def test_pytorch_and_onnx_give_the_same_reducibility_findings(
    name: str, activation: torch.nn.Module, pool: torch.nn.Module, features: int, factor: float
) -> None:
    """Pooling kinds and activations are matched by their framework-neutral names, not by spelling."""
    model = _PoolNet(activation, pool, features).eval()
    with torch.no_grad():
        model.conv1.weight[3] = factor * model.conv1.weight[1]
        model.conv1.bias[3] = factor * model.conv1.bias[1]
    x = torch.randn(2, 2, 6, 6)
    proto = tg.export_onnx(model, x)
    pooling_ops = {n.op_type for n in proto.graph.node} & {"AveragePool", "GlobalAveragePool", "MaxPool",
                                                             "GlobalMaxPool", "ReduceMean", "ReduceMax"}
    assert pooling_ops, [n.op_type for n in proto.graph.node]

    def findings(report: tg.AnalysisReport) -> set[tuple[str, str, int | None, float]]:
        return {(f.unit, f.condition, f.partner, round(f.factor, 5)) for f in report.reducibility}

    expected = {("conv1[3]", "negated" if factor < 0 else "relu_scaled", 1, factor)}
    assert findings(tg.analyze(model, x, through=("pooling",))) == expected
    assert findings(tg.analyze(proto, through=("pooling",))) == expected


def test_activation_and_pooling_names_are_framework_neutral() -> None:
    from tunnelgraph.frontends import fx
    from tunnelgraph.frontends.onnx import _ACTIVATIONS, _POOLING
    from tunnelgraph.ir import ACTIVATION_FUNCTIONS, POOLING_FUNCTIONS, activation_function

    # every spelling either frontend knows maps into the IR's vocabulary
    torch_spellings = [m.__name__ for m in fx._ACTIVATION_MODULES] + ["PReLU", "clamp", "gt", "lt", "ge", "le", "eq"]
    torch_spellings += [f.__name__ for f in fx._ACTIVATION_FUNCTIONS] + sorted(fx._ACTIVATION_METHODS)
    assert {activation_function(s) for s in torch_spellings} <= ACTIVATION_FUNCTIONS
    pools = [m.__name__ for m in fx._POOLING_MODULES] + [f.__name__ for f in fx._POOLING_FUNCTIONS]
    # "mean" comes from reductions, "gather" from ONNX Gather and GatherND (adaptive pooling as dynamo writes it)
    assert {fx._pooling_kind(p) for p in pools} == POOLING_FUNCTIONS - {"mean", "gather"}
    assert set(_POOLING.values()) == POOLING_FUNCTIONS - {"mean", "gather"}

    # an ONNX chain of every activation the frontend reads, and the PyTorch spellings of the same
    ops = sorted(_ACTIVATIONS)
    nodes = [helper.make_node(op, [f"t{i}"], [f"t{i + 1}"]) for i, op in enumerate(ops)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info(f"t{len(ops)}", TensorProto.FLOAT, [2, 3])])
    loaded = tg.load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    onnx_names = {n.attrs["op_type"]: n.attrs["function"] for n in loaded if n.op == "activation"}
    assert set(onnx_names) == set(ops) and set(onnx_names.values()) <= ACTIVATION_FUNCTIONS
    assert onnx_names["LeakyRelu"] == activation_function("LeakyReLU") == "leaky_relu"
    assert onnx_names["HardSwish"] == activation_function("Hardswish") == "hardswish"
    assert onnx_names["Clip"] == "clamp" and onnx_names["ThresholdedRelu"] == "thresholded_relu"
    traced = tg.trace(torch.nn.Sequential(torch.nn.LeakyReLU(), torch.nn.AvgPool1d(2), torch.nn.ReLU6()),
                      torch.randn(2, 3, 4))
    assert [n.attrs["function"] for n in traced if n.op in ("activation", "pooling")] == ["leaky_relu", "avg", "relu6"]


def test_a_gemm_bias_factor_is_a_neutral_attribute() -> None:
    """Gemm's beta multiplies the bias: the graph says so as ``bias_scale``, not as an ONNX attribute."""
    model = hand_written()
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    next(a for a in gemm.attribute if a.name == "beta").f = 2.0
    graph = tg.load_onnx(model)
    layers = {node.name: node for node in graph if node.op == "linear"}
    assert layers["g"].attrs["bias_scale"] == 2.0
    assert "bias_scale" not in layers["y"].attrs  # MatMul + Add: the bias is added as it is
    assert "bias_scale" not in tg.load_onnx(hand_written())["g"].attrs  # beta = 1


def _shared_bias_model() -> onnx.ModelProto:
    """conv a -> relu -> conv b -> relu -> conv c -> flatten -> Gemm; a and b read one zero bias ``zeros``
    (as the TorchScript exporter stores equal initializers once) and b and c one weight ``w`` (a layer
    applied twice)."""
    zeros = numpy_helper.from_array(np.zeros(3, dtype=np.float32), "zeros")
    nodes = [
        helper.make_node("Conv", ["x", "a.weight", "zeros"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w", "zeros"], ["h2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w", "c.bias"], ["h3"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["h3"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "g.weight", "g.bias"], ["y"], transB=1),
    ]
    initializers = [_init("a.weight", 3, 2, 3, 3), zeros, _init("w", 3, 3, 3, 3), _init("c.bias", 3),
                    _init("g.weight", 4, 3 * 5 * 5), _init("g.bias", 4)]
    graph = helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_initializers_read_by_several_layers_get_a_copy_each_and_every_layer_gets_sites() -> None:
    model = _shared_bias_model()
    original = model.SerializeToString()
    sites = tg.find_sites(model)
    groups = {s.group_name for s in sites}
    assert len(groups) == 3, groups  # a, b and c: none is blocked by the shared 'zeros' or 'w'
    x = torch.randn(2, 2, 5, 5)
    for group in sorted(groups):
        site = next(s for s in sites if s.group_name == group)
        rewritten = tg.rewrite(model, site, RNG.uniform(0, 1, site.outbound_size))
        onnx.checker.check_model(rewritten, full_check=True)
        assert tg.verify(model, rewritten, x, rtol=1e-5, atol=1e-6).passed
        names = [t.name for t in rewritten.graph.initializer]
        assert len(names) == len(set(names)) and {"zeros__1", "w__1"} <= set(names)
    assert model.SerializeToString() == original  # the given model is never modified


class _AdaptivePoolNet(torch.nn.Module):
    """conv -> relu -> AdaptiveAvgPool2d(out) -> flatten -> linear, as alexnet's and the VGGs' classifier entry."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(out)
        self.fc = torch.nn.Linear(4 * out * out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.conv(x).relu()), 1))


def _dynamo_adaptive_pool(model: _AdaptivePoolNet, batch: int, side: int) -> onnx.ModelProto:
    """``model`` on a ``batch x 2 x side x side`` input as the dynamo exporter writes it (alexnet, VGG at 64x64).

    The pooling: ``Transpose`` (spatial axes first), ``GatherND`` of every
    window's positions, ``Transpose`` back (``N, C, out, K, out, K``), then
    a ``ReduceMean`` over the windows when all have ``K`` positions, else
    ``Where`` with stored masks zeroing the shorter windows' padding, a sum
    of ``Gather`` selections and a ``Div`` by the stored window sizes.
    """
    out = model.pool.output_size
    starts = [i * side // out for i in range(out)]
    sizes = [-(-(i + 1) * side // out) - start for i, start in enumerate(starts)]
    k = max(sizes)
    rows = np.array([[min(start + j, side - 1) for j in range(k)] for start in starts])  # (out, K)
    indices = np.stack(np.broadcast_arrays(rows[:, :, None, None], rows[None, None]), axis=-1)
    padding = np.array([[j >= size for j in range(k)] for size in sizes])
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "conv.weight", "conv.bias"], ["h"], pads=[1, 1, 1, 1]),
        node("Relu", ["h"], ["r"]),
        node("Transpose", ["r"], ["t"], perm=[2, 3, 0, 1]),
        node("GatherND", ["t", "windows"], ["g"]),
        node("Transpose", ["g"], ["u"], perm=[4, 5, 0, 1, 2, 3]),
    ]
    arrays: dict[str, np.ndarray] = {"windows": indices.astype(np.int64)}
    if len(set(sizes)) == 1:
        nodes.append(node("ReduceMean", ["u", "window_axes"], ["pooled"], keepdims=0))
        arrays["window_axes"] = np.array([-3, -1], np.int64)
    else:
        nodes += [node("Where", ["row_padding", "zero", "u"], ["m1"]),
                  node("Where", ["column_padding", "zero", "m1"], ["m2"])]
        arrays.update(row_padding=padding[:, :, None, None], column_padding=padding, zero=np.array(0, np.float32),
                      counts=np.outer(sizes, sizes).astype(np.float32))
        terms = []
        for i in range(k):
            arrays[f"i{i}"] = np.array(i, np.int64)
            nodes.append(node("Gather", ["m2", f"i{i}"], [f"row{i}"], axis=3))
            for j in range(k):
                nodes.append(node("Gather", [f"row{i}", f"i{j}"], [f"s{i}{j}"], axis=4))
                terms.append(f"s{i}{j}")
        for index, term in enumerate(terms[1:], start=1):
            nodes.append(node("Add", [terms[0] if index == 1 else f"a{index - 1}", term], [f"a{index}"]))
        nodes.append(node("Div", [f"a{len(terms) - 1}", "counts"], ["pooled"]))
    arrays["target"] = np.array([batch, 4 * out * out], np.int64)
    nodes += [node("Reshape", ["pooled", "target"], ["f"], allowzero=1),
              node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=1)]
    arrays.update({name: p.detach().numpy() for name, p in model.named_parameters()})
    graph = helper.make_graph(
        nodes, "adaptive", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(a, name) for name, a in arrays.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(proto, full_check=True)
    return proto


@pytest.mark.parametrize("side, out", [(1, 3), (2, 3)], ids=["uniform_windows_ReduceMean", "masked_windows_Div"])
def test_adaptive_pooling_as_the_dynamo_exporter_writes_it_has_the_pytorch_groups(side: int, out: int) -> None:
    from tunnelgraph.backends.onnx import run_onnx

    model = _AdaptivePoolNet(out).eval()
    x = torch.randn(2, 2, side, side)
    proto = _dynamo_adaptive_pool(model, 2, side)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(run_onnx(proto, [x.numpy()])[0], expected, rtol=1e-5, atol=1e-6)
    for through in ((), ("pooling",)):
        (ours,) = [g for g in tg.analyze(proto, through=through).groups if g.name == "conv"]
        (theirs,) = [g for g in tg.analyze(model, x, through=through).groups if g.name == "conv"]
        assert (ours.legal, ours.size, ours.inbound_size, ours.outbound_size) == (
            theirs.legal, theirs.size, theirs.inbound_size, theirs.outbound_size)
        assert ours.legal == bool(through), ours.reasons
        if not through:  # the gather of the windows is the pooling, as nn.AdaptiveAvgPool2d is in PyTorch
            assert ours.reasons[0] == 'feeds pooling \'g\' (pass through=("pooling",) to clone through it)'
    sites = [s for s in tg.find_sites(proto, through=("pooling",)) if s.group_name == "conv"]
    assert sites[0].outbound_size == 3 * out * out
    rewritten = proto
    for site in (sites[1], sites[3]):  # one after the other: the second reads the first's widths
        site = next(s for s in tg.find_sites(rewritten, through=("pooling",)) if s.name == site.name)
        rewritten = tg.rewrite(rewritten, site, RNG.uniform(-1, 2, site.outbound_size), through=("pooling",))
    onnx.checker.check_model(rewritten, full_check=True)
    assert tg.verify(proto, rewritten, x, rtol=1e-5, atol=1e-6).passed
    widths = {t.name: tuple(t.dims) for t in rewritten.graph.initializer}
    assert widths["conv.weight"][0] == 6 and widths["fc.weight"] == (3, 6 * out * out)
    target = next(t for t in rewritten.graph.initializer if t.name == "target")
    assert numpy_helper.to_array(target).tolist() == [2, 6 * out * out]
    converted = tg.to_torch(rewritten)  # the ONNX -> PyTorch converter reads the pattern too
    with torch.no_grad():
        np.testing.assert_allclose(converted(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def _layout_model(nodes: list[onnx.NodeProto], arrays: dict[str, np.ndarray], out: list[int]) -> onnx.ModelProto:
    """conv ``c`` (2 -> 4 channels, 3x3 map) -> ``nodes`` -> ``y`` of shape ``out``."""
    head = [helper.make_node("Conv", ["x", "c.weight", "c.bias"], ["h"], pads=[1, 1, 1, 1])]
    arrays = {"c.weight": RNG.standard_normal((4, 2, 3, 3)).astype(np.float32),
              "c.bias": RNG.standard_normal(4).astype(np.float32), **arrays}
    graph = helper.make_graph(
        head + nodes, "layout", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        [numpy_helper.from_array(a, name) for name, a in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


LAYOUTS = [  # (name, nodes after the conv 'c' (output 'h', 2x4x3x3), stored arrays, output shape, reason)
    ("channels_last_then_flatten", [  # NHWC flattened: channel c lands at every 4th feature
        helper.make_node("Transpose", ["h"], ["t"], perm=[0, 2, 3, 1]), helper.make_node("Flatten", ["t"], ["f"]),
        helper.make_node("Gemm", ["f", "g.weight"], ["y"], transB=1)],
     {"g.weight": _f32(5, 36)}, [2, 5], r"flatten at node 'f' interleaves the channels \(channel axis 3"),
    ("channels_moved_before_a_conv", [  # the second conv reads axis 1, which now holds the rows
        helper.make_node("Transpose", ["h"], ["t"], perm=[0, 2, 1, 3]),
        helper.make_node("Conv", ["t", "d.weight"], ["y"])],
     {"d.weight": _f32(2, 3, 1, 1)}, [2, 2, 4, 3], r"conv 'd' reads axis 1, not the channel axis 2"),
    ("gather_of_channels", [  # GatherND indexes the axis that holds the channels
        helper.make_node("Transpose", ["h"], ["t"], perm=[1, 0, 2, 3]),
        helper.make_node("GatherND", ["t", "pick"], ["g"]),
        helper.make_node("Transpose", ["g"], ["u"], perm=[1, 0, 2, 3]), helper.make_node("Flatten", ["u"], ["f"]),
        helper.make_node("Gemm", ["f", "g.weight"], ["y"], transB=1)],
     {"pick": np.array([[0], [2], [2]], np.int64), "g.weight": _f32(5, 27)}, [2, 5],
     r"pooling 'g' at node 'g' gathers along the channel axis 0"),
    ("division_by_a_per_channel_tensor", [
        helper.make_node("Div", ["h", "scale"], ["s"]), helper.make_node("Flatten", ["s"], ["f"]),
        helper.make_node("Gemm", ["f", "g.weight"], ["y"], transB=1)],
     {"scale": np.abs(_f32(4, 1, 3)) + 1, "g.weight": _f32(5, 36)}, [2, 5],
     r"scale 's' at node 's' applies a stored tensor of shape \(4, 1, 3\) that varies along the channel axis 1"),
]


@pytest.mark.parametrize("name, nodes, arrays, out, reason", LAYOUTS, ids=[case[0] for case in LAYOUTS])
def test_a_transpose_or_gather_the_channels_cannot_follow_blocks_with_the_reason(
    name: str, nodes: list[onnx.NodeProto], arrays: dict[str, np.ndarray], out: list[int], reason: str
) -> None:
    model = _layout_model(nodes, arrays, out)
    onnx.checker.check_model(model, full_check=True)
    for through in ((), ("pooling",)):
        (group,) = [g for g in tg.analyze(model, through=through).groups if g.name == "c"]
        assert not group.legal and any(re.search(reason, r) for r in group.reasons), group.reasons
    assert "c" not in {s.group_name for s in tg.find_sites(model, through=("pooling",))}
    tg.to_torch(model)  # translated all the same


def test_a_transpose_the_channels_follow_keeps_the_group_legal() -> None:
    """Channels last, a per-position divisor, channels first again: the conv 'c' stays one legal group."""
    nodes = [
        helper.make_node("Transpose", ["h"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Div", ["t", "scale"], ["s"]),  # varies along the rows and columns only
        helper.make_node("Transpose", ["s"], ["u"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["u", "d.weight"], ["y"]),
    ]
    model = _layout_model(nodes, {"scale": np.abs(_f32(3, 3, 1)) + 1, "d.weight": _f32(2, 4, 1, 1)}, [2, 2, 3, 3])
    onnx.checker.check_model(model, full_check=True)
    sites = [s for s in tg.find_sites(model) if s.group_name == "c"]
    assert len(sites) == 4 and sites[0].outbound_size == 2
    rewritten = tg.rewrite(model, sites[2], RNG.uniform(-1, 2, 2))
    assert tg.verify(model, rewritten, torch.randn(2, 2, 3, 3), rtol=1e-5, atol=1e-6).passed


@pytest.mark.parametrize("build", ["constants_and_identities", "shared_initializers"])
def test_a_file_bytes_and_a_model_are_prepared_alike_and_the_given_model_is_untouched(
    build: str, tmp_path: Path
) -> None:
    """A file or bytes tunnelgraph parses are converted in place (no copy of their weights); a given model is copied."""
    if build == "shared_initializers":
        model = _shared_bias_model()
    else:
        variance = numpy_helper.from_array((np.abs(RNG.standard_normal(4)) + 0.5).astype(np.float32), "v")
        model = _conv_bn_conv([
            helper.make_node("Constant", [], ["bn.weight"], value=numpy_helper.from_array(
                RNG.standard_normal(4).astype(np.float32) + 2, "w")),
            helper.make_node("Constant", [], ["bn.running_var"], value=variance),
            helper.make_node("Identity", ["shared"], ["bn.bias"]),
            helper.make_node("Identity", ["shared"], ["bn.running_mean"]),
        ], [], [_init("shared", 4)])
    original = model.SerializeToString()
    path = tmp_path / "model.onnx"
    path.write_bytes(original)
    from_model, _ = read_onnx(model)
    assert model.SerializeToString() == original
    prepared = from_model.SerializeToString()
    assert prepared != original  # something was converted
    assert read_onnx(original)[0].SerializeToString() == prepared
    assert read_onnx(path)[0].SerializeToString() == prepared

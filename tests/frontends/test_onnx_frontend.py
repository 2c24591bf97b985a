"""ONNX written by hand (not by PyTorch), unknown operators, and safe loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import tunnelgraph as tg

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

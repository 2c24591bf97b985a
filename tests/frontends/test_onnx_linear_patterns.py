"""MatMul + Add as one linear layer: one pattern match, read by the frontend and by to_torch alike."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tunnelgraph as tg
from tunnelgraph.frontends.onnx import LinearPattern, linear_patterns

RNG = np.random.default_rng(0)


def _model(nodes: list[onnx.NodeProto], outputs: list[str], bias_shape: tuple[int, ...] = (3,)) -> onnx.ModelProto:
    initializers = [
        numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "fc.weight"),
        numpy_helper.from_array(RNG.standard_normal(bias_shape).astype(np.float32), "fc.bias"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


MATMUL = helper.make_node("MatMul", ["x", "fc.weight"], ["mm"])


def test_a_matmul_whose_only_reader_adds_a_bias_is_one_layer() -> None:
    model = _model([MATMUL, helper.make_node("Add", ["fc.bias", "mm"], ["y"])], ["y"])
    assert linear_patterns(model) == {"mm": LinearPattern("fc.bias", "y")}
    (layer,) = [node for node in tg.load_onnx(model) if node.op == "linear"]
    assert layer.name == "y" and set(layer.params) == {"weight", "bias"}
    converted = tg.to_torch(model)
    assert [name for name, _ in converted.named_children()] == ["fc"]
    assert converted.fc.bias is not None


@pytest.mark.parametrize(
    "nodes, outputs, bias_shape",
    [
        ([MATMUL, helper.make_node("Add", ["mm", "fc.bias"], ["y"])], ["y", "mm"], (3,)),  # the product is read
        ([MATMUL, helper.make_node("Add", ["mm", "fc.bias"], ["y"]), helper.make_node("Relu", ["mm"], ["r"])],
         ["y", "r"], (3,)),
        ([MATMUL, helper.make_node("Add", ["mm", "fc.bias"], ["y"])], ["y"], (5, 3)),  # a broadcast bias
        ([MATMUL, helper.make_node("Add", ["mm", "mm"], ["y"])], ["y"], (3,)),
        ([MATMUL, helper.make_node("Sub", ["mm", "fc.bias"], ["y"])], ["y"], (3,)),
    ],
    ids=["product_is_an_output", "product_read_twice", "broadcast_bias", "add_to_itself", "sub"],
)
def test_other_pairs_stay_apart(nodes: list[onnx.NodeProto], outputs: list[str], bias_shape: tuple[int, ...]) -> None:
    model = _model(nodes, outputs, bias_shape)
    assert linear_patterns(model) == {}
    graph = tg.load_onnx(model)
    (layer,) = [node for node in graph if node.op == "linear"]
    assert layer.name == "mm" and set(layer.params) == {"weight"}
    assert tg.to_torch(model).fc.bias is None

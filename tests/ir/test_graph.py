"""The IR on its own: construction order, edges with channel maps, immutable nodes, map composition."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from tunnelgraph.ir import IDENTITY, ChannelMap, Graph, Node, OpKind, ParamRef


def _graph() -> Graph:
    graph = Graph("toy")
    graph.add(Node("x", OpKind.INPUT, "input", shape=(2, 3)))
    graph.add(Node("a", OpKind.PARAMETRIC, "linear", ("x",), channel_axis=1, shape=(2, 4)))
    graph.add(Node("b", OpKind.PARAMETRIC, "linear", ("x",), channel_axis=1, shape=(2, 5)))
    graph.add(
        Node(
            "cat", OpKind.COUPLING, "concat", ("a", "b", "a"), shape=(2, 13), attrs={"dim": 1},
            input_maps={0: ChannelMap(0), 1: ChannelMap(4), 2: ChannelMap(9)},
        )
    )
    graph.add(Node("out", OpKind.OUTPUT, "output", ("cat",)))
    return graph


def test_nodes_keep_topological_order_and_users() -> None:
    graph = _graph()
    assert [node.name for node in graph] == ["x", "a", "b", "cat", "out"]
    assert [node.name for node in graph.users("x")] == ["a", "b"]
    assert graph.index("cat") == 3 and len(graph) == 5 and "cat" in graph


def test_an_input_used_twice_keeps_one_map_per_use() -> None:
    graph = _graph()
    assert graph.maps("a", "cat") == (ChannelMap(0), ChannelMap(9))
    assert graph.maps("b", "cat") == (ChannelMap(4),)
    assert graph.maps("x", "a") == (IDENTITY,)


def test_edge_maps_come_from_the_nodes_input_maps() -> None:
    graph = _graph()
    cat = graph["cat"]
    assert [cat.input_map(i) for i in range(3)] == [ChannelMap(0), ChannelMap(4), ChannelMap(9)]
    assert graph["a"].input_maps == {} and graph["a"].input_map(0) == IDENTITY
    for source in ("a", "b"):
        uses = [i for i, name in enumerate(cat.inputs) if name == source]
        assert graph.maps(source, "cat") == tuple(cat.input_map(i) for i in uses)
    assert "_maps" not in cat.attrs and dict(cat.attrs) == {"dim": 1}


def test_nodes_are_immutable() -> None:
    node = Node(
        "conv", OpKind.PARAMETRIC, "conv", ("x",), module="conv", channel_axis=1,
        params={"weight": ParamRef("conv.weight", (4, 3, 3, 3))},
        attrs={"groups": 1, "literal_widths": {1: ((1,), 36)}, "reduces": [2, 3]},
        input_maps={0: ChannelMap(0, 1)}, meta={"seen": True},
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        node.module = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        node.channel_axis = 0  # type: ignore[misc]
    for mapping in (node.attrs, node.params, node.input_maps, node.meta, node.attrs["literal_widths"]):
        with pytest.raises(TypeError):
            mapping["new"] = 1  # type: ignore[index]
        with pytest.raises((TypeError, AttributeError)):
            mapping.pop("groups", None)  # type: ignore[attr-defined]
    assert node.attrs["reduces"] == (2, 3)  # lists are frozen into tuples
    assert pickle.loads(pickle.dumps(node)) == node and copy.deepcopy(node) == node
    assert hash(node) == hash(dataclasses.replace(node))


def test_input_maps_must_name_inputs() -> None:
    with pytest.raises(ValueError, match="input_maps"):
        Node("flat", OpKind.RESHAPE, "flatten", ("x",), input_maps={1: ChannelMap(0, 4)})


def test_annotate_replaces_the_node_and_keeps_the_old_one_unchanged() -> None:
    graph = _graph()
    before = graph["cat"]
    after = graph.annotate("cat", visited=1)
    assert graph["cat"] is after and after.meta == {"visited": 1} and before.meta == {}
    assert graph.annotate("cat", visited=2, axis=1).meta == {"visited": 2, "axis": 1}
    assert graph.maps("a", "cat") == (ChannelMap(0), ChannelMap(9))


def test_bad_construction_is_refused() -> None:
    graph = _graph()
    with pytest.raises(ValueError, match="duplicate"):
        graph.add(Node("a", OpKind.CHANNELWISE, "activation", ("x",)))
    with pytest.raises(ValueError, match="before it is defined"):
        graph.add(Node("late", OpKind.CHANNELWISE, "activation", ("nowhere",)))
    assert "late" not in graph and len(graph) == 5  # a refused node leaves the graph as it was


def test_channel_maps_compose() -> None:
    concat_then_flatten = ChannelMap(4, 1).then(ChannelMap(0, 9))
    assert concat_then_flatten == ChannelMap(36, 9)
    assert list(concat_then_flatten.positions(2)) == list(range(54, 63))
    assert IDENTITY.then(ChannelMap(3, 2)) == ChannelMap(3, 2)

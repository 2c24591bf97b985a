"""The IR on its own: construction order, edges with channel maps, map composition."""

from __future__ import annotations

import pytest

from tunnelgraph.ir import IDENTITY, ChannelMap, Graph, Node, OpKind


def _graph() -> Graph:
    graph = Graph("toy")
    graph.add(Node("x", OpKind.INPUT, "input", shape=(2, 3)))
    graph.add(Node("a", OpKind.PARAMETRIC, "linear", ("x",), channel_axis=1, shape=(2, 4)))
    graph.add(Node("b", OpKind.PARAMETRIC, "linear", ("x",), channel_axis=1, shape=(2, 5)))
    graph.add(
        Node("cat", OpKind.COUPLING, "concat", ("a", "b", "a"), shape=(2, 13), attrs={"dim": 1}),
        maps={0: ChannelMap(0), 1: ChannelMap(4), 2: ChannelMap(9)},
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


def test_bad_construction_is_refused() -> None:
    graph = _graph()
    with pytest.raises(ValueError, match="duplicate"):
        graph.add(Node("a", OpKind.CHANNELWISE, "activation", ("x",)))
    with pytest.raises(ValueError, match="before it is defined"):
        graph.add(Node("late", OpKind.CHANNELWISE, "activation", ("nowhere",)))


def test_channel_maps_compose() -> None:
    concat_then_flatten = ChannelMap(4, 1).then(ChannelMap(0, 9))
    assert concat_then_flatten == ChannelMap(36, 9)
    assert list(concat_then_flatten.positions(2)) == list(range(54, 63))
    assert IDENTITY.then(ChannelMap(3, 2)) == ChannelMap(3, 2)

"""The torch.fx frontend: node kinds, shapes, channel maps, and the error path."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tunnelgraph as tg
from tunnelgraph.ir import ChannelMap, OpKind
from zoo import ZOO_BY_NAME, ZooEntry, example_input


def test_paper_cnn_graph_has_kinds_shapes_and_parameters() -> None:
    entry = ZOO_BY_NAME["paper_cnn"]
    graph = tg.trace(entry.build(), example_input(entry))
    kinds = [(node.op, node.kind) for node in graph]
    assert kinds == [
        ("input", OpKind.INPUT),
        ("conv", OpKind.PARAMETRIC),
        ("activation", OpKind.CHANNELWISE),
        ("flatten", OpKind.RESHAPE),
        ("linear", OpKind.PARAMETRIC),
        ("output", OpKind.OUTPUT),
    ]
    conv = graph["conv"]
    assert conv.shape == (4, 8, 24, 24) and conv.channel_axis == 1
    assert conv.params["weight"].name == "conv.weight" and conv.params["weight"].shape == (8, 1, 5, 5)
    flatten = graph["flatten"]
    assert (flatten.attrs["start"], flatten.attrs["end"]) == (1, 3)
    assert graph.maps("conv", "act") == (ChannelMap(0, 1),)
    assert graph.maps("act", "flatten") == (ChannelMap(0, 24 * 24),)


def test_concat_edges_carry_offsets() -> None:
    entry = ZOO_BY_NAME["inception_concat"]
    graph = tg.trace(entry.build(), example_input(entry))
    (concat,) = [node for node in graph if node.op == "concat"]
    offsets = [graph.maps(name, concat.name)[0].offset for name in concat.inputs]
    assert offsets == [0, 4, 10]


def test_every_traceable_zoo_model_traces_with_shapes(zoo_entry: ZooEntry) -> None:
    model = zoo_entry.build()
    graph = tg.trace(model, example_input(zoo_entry))
    assert len(graph) >= 3
    for node in graph:
        if node.kind in (OpKind.PARAMETRIC, OpKind.CHANNELWISE, OpKind.COUPLING, OpKind.RESHAPE):
            assert node.shape is not None, node.name


def test_untraceable_model_raises_trace_error_with_ways_out() -> None:
    entry = ZOO_BY_NAME["untraceable"]
    with pytest.raises(tg.TraceError, match="concrete_args") as info:
        tg.find_sites(entry.build(), example_input(entry))
    assert "is_leaf_module" in str(info.value)


def test_wrong_example_inputs_raise_trace_error() -> None:
    entry = ZOO_BY_NAME["paper_cnn"]
    with pytest.raises(tg.TraceError, match="example_inputs"):
        tg.trace(entry.build(), torch.randn(2, 3, 28, 28))


def test_tracing_leaves_training_flags_and_buffers_alone() -> None:
    entry = ZOO_BY_NAME["resnet_stack"]
    model = entry.build().train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    tg.trace(model, example_input(entry))
    assert all(module.training for module in model.modules())
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())


def test_unknown_module_becomes_a_blocking_node() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Softmin(dim=1), nn.Linear(6, 2))
    graph = tg.trace(model, torch.randn(3, 4))
    assert graph["_1"].kind == OpKind.BLOCKING
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.Flatten(), nn.Linear(6, 2))
    graph = tg.trace(model, torch.randn(3, 4))
    assert graph["_1"].kind == OpKind.BLOCKING and "Unflatten" in graph["_1"].attrs["detail"]


def test_a_custom_tracer_keeps_a_submodule_opaque() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), Branchy(), nn.Linear(6, 2))

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module: nn.Module, name: str) -> bool:
            return isinstance(module, Branchy) or super().is_leaf_module(module, name)

    with pytest.raises(tg.TraceError):
        tg.trace(model, torch.randn(3, 4))
    graph = tg.trace(model, torch.randn(3, 4), tracer=Tracer())
    report = tg.analyze(graph)
    (group,) = [g for g in report.groups if g.name == "0"]
    assert any("Branchy" in reason for reason in group.reasons)


def test_functional_batch_norm_on_a_modules_own_tensors_is_that_modules_batch_norm() -> None:
    """timm's BatchNormAct2d (F.batch_norm on its own buffers): sites through it, exact rewrites, A as the oracle."""
    import torch.nn.functional as F

    from tunnelgraph.testing import naive_a_matrix
    from zoo import ZOO_BY_NAME, example_input

    entry = ZOO_BY_NAME["functional_batchnorm"]
    torch.manual_seed(0)
    model = entry.build().double().eval()
    x = example_input(entry).double()
    assert tg.find_sites(model, x) == []  # units feeding batch norm are not sites by default, as in the paper
    sites = tg.find_sites(model, x, through=("batchnorm", "pooling"))
    assert {s.group_name for s in sites} == {"conv1", "conv2"} and len(sites) == 14
    for site in (sites[0], sites[-1]):
        opened = tg.rewrite(model, site, lam=torch.rand(site.outbound_size, dtype=torch.float64))
        assert tg.verify(model, opened, x).passed
        bn = opened.bn1 if site.group_name == "conv1" else opened.bn2
        assert bn.num_features == site.group.size + 1 and bn.running_mean.shape == (site.group.size + 1,)
    y = torch.randint(0, 3, (x.shape[0],))
    stats = tg.a_statistics(model, sites[:2], [(x, y)], F.cross_entropy, method="exact", progress=False)
    reference = naive_a_matrix(model, sites[1], [(x, y)], F.cross_entropy)
    assert torch.allclose(stats[sites[1].name].a, reference, rtol=1e-8, atol=1e-12 * float(reference.abs().max()))


def test_functional_batch_norm_on_computed_tensors_blocks_with_the_reason() -> None:
    import torch.nn.functional as F

    class Computed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 3, 3)
            self.scale = torch.nn.Parameter(torch.ones(3))
            self.fc = torch.nn.Linear(3 * 4 * 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.batch_norm(self.conv(x), None, None, self.scale * 2, None, True)
            return self.fc(h.flatten(1))

    report = tg.analyze(Computed(), torch.randn(2, 1, 6, 6), through=("batchnorm",))
    assert "function batch_norm with a computed weight" in report.to_markdown()


def test_a_one_channel_group_passes_flatten_into_a_linear_layer() -> None:
    """``(N, 1, 4) -> (N, 4)`` fits merging ``N, 1`` and ``1, 4``: the flatten keeps the batch axis.

    Found by the random-architecture test: the group was blocked as "interleaves the channels".
    """
    from tunnelgraph.frontends.shapes import merged_range

    assert merged_range((5, 1, 4), (5, 4)) == (0, 1)  # ambiguous shapes alone: read as the blocking one
    model = nn.Sequential(nn.Conv1d(2, 1, 1), nn.ReLU(), nn.Flatten(1), nn.Linear(4, 3)).double()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    (site,) = tg.find_sites(model, x)
    opened = tg.rewrite(model, site, 0.3)
    assert opened[3].in_features == 8 and tg.verify(model, opened, x).passed


def test_a_flatten_of_the_batch_and_a_one_channel_axis_blocks_the_group() -> None:
    """``torch.flatten(x, 0, 1)`` on ``(N, 1, 8)`` gives the shapes of ``flatten(x, 1)``; a clone would double N.

    Found by the random-architecture test after the first fix read such shapes as ``flatten(x, 1)``.
    """

    class BatchFlatten(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 1, 1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 0, 1))

    x = torch.randn(5, 2, 8)
    for frontend in ("fx", "export"):
        groups = {g.name: g for g in tg.analyze(tg.trace(BatchFlatten(), x, frontend=frontend)).groups}
        assert not groups["conv"].legal, frontend
        assert any("interleaves the channels" in reason for reason in groups["conv"].reasons), frontend

"""The torch.fx frontend: node kinds, shapes, channel maps, and the error path."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

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


# -- transposes: torch.permute, transpose, movedim and their kin move the channel axis ------------------
TO_CHANNELS_LAST: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "x.permute(0, 2, 3, 1)": lambda x: x.permute(0, 2, 3, 1),
    "torch.permute(x, (0, 2, 3, 1))": lambda x: torch.permute(x, (0, 2, 3, 1)),
    "x.permute(dims=[0, -2, -1, 1])": lambda x: x.permute(dims=[0, -2, -1, 1]),
    "x.movedim(1, -1)": lambda x: x.movedim(1, -1),
    "torch.moveaxis(x, (1,), (3,))": lambda x: torch.moveaxis(x, (1,), (3,)),
    "x.transpose(1, 3).transpose(1, 2)": lambda x: x.transpose(1, 3).transpose(1, 2),
    "torch.transpose(x, 1, -1).swapaxes(1, 2)": lambda x: torch.transpose(x, 1, -1).swapaxes(1, 2),
    "x.mT.swapdims(1, 3)": lambda x: x.mT.swapdims(1, 3),
}
TO_CHANNELS_FIRST: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "x.permute(0, 3, 1, 2)": lambda x: x.permute(0, 3, 1, 2),
    "torch.permute(x, [0, -1, 1, 2])": lambda x: torch.permute(x, [0, -1, 1, 2]),
    "torch.movedim(x, (3,), (1,))": lambda x: torch.movedim(x, (3,), (1,)),
    "x.moveaxis(-1, 1)": lambda x: x.moveaxis(-1, 1),
    "x.transpose(1, 3).transpose(2, 3)": lambda x: x.transpose(1, 3).transpose(2, 3),
    "x.swapaxes(2, 3).swapdims(1, 2)": lambda x: x.swapaxes(2, 3).swapdims(1, 2),
    "torch.swapdims(x, 1, 3).mT": lambda x: torch.swapdims(x, 1, 3).mT,
    "torch.swapaxes(x, -1, -3).transpose(-1, 2)": lambda x: torch.swapaxes(x, -1, -3).transpose(-1, 2),
}


class ChannelsLastBlock(nn.Module):
    """conv -> channels last -> linear -> GELU -> linear -> channels first -> residual add -> conv head.

    ConvNeXt's block without its depthwise conv, layer norm and layer scale. The stream (the stem
    and ``fc2``, read by ``fc1`` on the last axis and by the head on axis 1) and ``fc1``'s hidden
    units are legal groups.
    """

    def __init__(self, to_last: Callable[[torch.Tensor], torch.Tensor], to_first: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.to_last, self.to_first = to_last, to_first
        self.stem = nn.Conv2d(3, 5, 3, padding=1)
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 5)
        self.head = nn.Conv2d(5, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.stem(x))
        x = x + self.to_first(self.fc2(F.gelu(self.fc1(self.to_last(x)))))
        return self.head(x).flatten(1)


def test_every_spelling_of_a_transpose_is_one_transpose_node_with_its_axis_map() -> None:
    """Function and method forms, constant dims (negative ones normalised): the ONNX frontend's node."""

    class Spellings(nn.Module):
        def forward(self, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return (
                x.permute(0, 2, 3, 1), torch.permute(x, (0, 2, 3, 1)), x.permute(dims=(0, -2, -1, 1)),
                x.transpose(1, -1), torch.transpose(x, 1, 3), x.swapaxes(1, 3), torch.swapdims(x, 1, 3),
                x.movedim(1, -1), torch.movedim(x, (1, 2), (3, 0)), torch.moveaxis(x, 1, 3), x.mT,
                m.T, m.t(), torch.t(m),
            )

    expected = [
        (0, 2, 3, 1), (0, 2, 3, 1), (0, 2, 3, 1), (0, 3, 2, 1), (0, 3, 2, 1), (0, 3, 2, 1), (0, 3, 2, 1),
        (0, 2, 3, 1), (2, 0, 3, 1), (0, 2, 3, 1), (0, 1, 3, 2), (1, 0), (1, 0), (1, 0),
    ]
    x, m = torch.randn(2, 3, 4, 5), torch.randn(3, 6)
    for frontend in ("fx", "export"):
        graph = tg.trace(Spellings(), (x, m), frontend=frontend)
        (output,) = [node for node in graph if node.kind == OpKind.OUTPUT]
        moves = [graph[name] for name in output.inputs]  # in the order of the returned tuple
        assert [(node.kind, node.op) for node in moves] == [(OpKind.CHANNELWISE, "transpose")] * len(expected), frontend
        assert [node.attrs["perm"] for node in moves] == expected, frontend
        for node, perm in zip(moves, expected):
            # axis_map is the inverse permutation: input axis a lands on output axis axis_map[a]
            assert tuple(perm[node.attrs["axis_map"][axis]] for axis in range(len(perm))) == tuple(range(len(perm)))
            assert len(node.inputs) == 1 and graph[node.inputs[0]].op == "input", (frontend, node.name)


@pytest.mark.parametrize(
    "to_last, to_first", list(zip(TO_CHANNELS_LAST, TO_CHANNELS_FIRST)), ids=[f"spelling{i}" for i in range(8)]
)
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_stream_through_channels_last_linear_layers_is_one_group_and_every_site_rewrites_exactly(
    to_last: str, to_first: str, frontend: str
) -> None:
    """Conv producer -> channels last -> linear consumer, and linear producer -> channels first -> conv consumer."""
    torch.manual_seed(0)
    model = tg.perturbed(
        ChannelsLastBlock(TO_CHANNELS_LAST[to_last], TO_CHANNELS_FIRST[to_first]).double(),
        generator=torch.Generator().manual_seed(1),
    ).eval()
    x = torch.randn(3, 3, 4, 6, dtype=torch.float64)
    graph = tg.trace(model, x, frontend=frontend)
    groups = {group.name: group for group in tg.analyze(graph).groups}
    stream = groups["stem"]
    assert stream.legal, stream.reasons
    assert stream.producers == ("stem", "fc2") and stream.consumers == ("fc1", "head")
    assert groups["fc1"].legal and groups["fc1"].consumers == ("fc2",)
    sites = tg.find_sites(graph)
    assert sorted({site.group_name for site in sites}) == ["fc1", "stem"] and len(sites) == 5 + 7
    generator = torch.Generator().manual_seed(2)
    for site in sites:
        lam = torch.rand(site.outbound_size, generator=generator, dtype=torch.float64) * 2 - 0.5
        opened = tg.rewrite(model, site, lam)
        report = tg.verify(model, opened, x, rtol=1e-10, atol=0)
        assert report.passed, (site.name, str(report))
        if site.group_name == "stem":  # every coupled tensor gained the channel, along its own axis
            assert (opened.stem.out_channels, opened.fc2.out_features, opened.fc1.in_features) == (6, 6, 6)
            assert opened.head.in_channels == 6
        else:
            assert (opened.fc1.out_features, opened.fc2.in_features) == (8, 8)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_rewritten_channels_last_model_exports_to_onnx_and_replays() -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = ChannelsLastBlock(TO_CHANNELS_LAST["x.permute(0, 2, 3, 1)"], TO_CHANNELS_FIRST["x.permute(0, 3, 1, 2)"])
    x = torch.randn(3, 3, 4, 6)
    site = next(site for site in tg.find_sites(model, x) if site.group_name == "stem")
    opened = tg.rewrite(model, site, 0.3)
    proto = tg.export_onnx(opened, x)
    assert tg.verify(opened, proto, x, rtol=1e-5, atol=1e-6).passed
    assert _signature(tg.find_sites(proto)) == _signature(tg.find_sites(opened, x))
    fresh = ChannelsLastBlock(TO_CHANNELS_LAST["x.permute(0, 2, 3, 1)"], TO_CHANNELS_FIRST["x.permute(0, 3, 1, 2)"])
    replayed = tg.replay(fresh, opened)
    replayed.load_state_dict(opened.state_dict())
    assert tg.verify(opened, replayed, x, rtol=1e-6, atol=0).passed


def _signature(sites: list[tg.Site]) -> set[tuple[str, int, int]]:
    return {(s.name, s.inbound_size, s.outbound_size) for s in sites}


def test_a_conv1d_read_by_a_linear_layer_after_mT_is_one_group() -> None:
    """Audio-style: conv1d over time, then ``.mT`` puts the filters last for a linear layer."""

    class Conv1dThenLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mT).sum(1)

    model = Conv1dThenLinear().double()
    x = torch.randn(5, 2, 9, dtype=torch.float64)
    sites = tg.find_sites(model, x)
    assert [site.name for site in sites] == [f"conv[{c}]" for c in range(4)]
    assert sites[0].outbound_size == 3
    opened = tg.rewrite(model, sites[2], torch.tensor([0.2, -0.4, 1.3], dtype=torch.float64))
    assert opened.fc.in_features == 5 and tg.verify(model, opened, x, rtol=1e-10, atol=0).passed


def test_per_channel_layers_and_consumers_that_read_another_axis_after_a_transpose_block_with_the_reason() -> None:
    class Moved(nn.Module):
        def __init__(self, after: str) -> None:
            super().__init__()
            self.after = after
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(5)  # normalises axis 1: the rows once the channels are last
            self.fc = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)  # (N, 4, 5, 6)
            if self.after == "batchnorm":
                return self.bn(h.permute(0, 2, 3, 1)).flatten(1)
            if self.after == "pooling":
                return F.max_pool2d(h.transpose(1, 2), 2).flatten(1)  # pools over the channels and columns
            return self.fc(h.transpose(1, 2)).flatten(1)  # a linear layer over the columns, channels on axis 2

    x = torch.randn(2, 3, 5, 6)
    expected = {
        "batchnorm": "batchnorm 'bn' acts on axis 1, but the channels are on axis 3",
        "pooling": "pooling 'max_pool2d' acts on axis 1, but the channels are on axis 2",
        "linear": "linear 'fc' reads axis 3, not the channel axis 2",
    }
    for after, reason in expected.items():
        report = tg.analyze(Moved(after), x, through=tg.THROUGH_OPTIONS)
        (group,) = [g for g in report.groups if g.name == "conv"]
        assert not group.legal and reason in group.reasons, (after, group.reasons)
        assert not any(site.group_name == "conv" for site in report.sites)


def test_a_transpose_with_dims_computed_at_run_time_blocks_with_the_reason() -> None:
    class RuntimeDims(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.fc(h.permute(0, 2, h.dim() - 1, 1)).flatten(1)

    report = tg.analyze(RuntimeDims(), torch.randn(2, 3, 5, 6))
    (group,) = [g for g in report.groups if g.name == "conv"]
    assert not group.legal
    assert any("method .permute() with dims computed at run time" in reason for reason in group.reasons), group.reasons
    # torch.export specialises the dims to the example's numbers: the group is legal there
    exported = tg.analyze(tg.trace(RuntimeDims(), torch.randn(2, 3, 5, 6), frontend="export"))
    assert next(g for g in exported.groups if g.name == "conv").legal


def test_an_in_place_transpose_blocks_with_its_name() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).transpose_(1, 3)).flatten(1)

    report = tg.analyze(InPlace(), torch.randn(2, 3, 5, 5))
    (group,) = [g for g in report.groups if g.name == "conv"]
    assert any("method .transpose_()" in reason for reason in group.reasons), group.reasons

"""The rule engine: which channels are sites, how they couple, and why the others are not."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tunnelgraph as tg
from zoo import ZOO_BY_NAME, ZooEntry, example_input


def _report(name: str, through: tuple[str, ...] = ()) -> tg.AnalysisReport:
    entry = ZOO_BY_NAME[name]
    return tg.analyze(entry.build(), example_input(entry), through=through)


def _group(report: tg.AnalysisReport, name: str) -> tg.ChannelGroup:
    return {group.name: group for group in report.groups}[name]


def test_paper_cnn_has_exactly_its_eight_filters_as_sites() -> None:
    report = _report("paper_cnn")
    sites = report.sites
    assert [s.name for s in sites] == [f"conv[{c}]" for c in range(8)]
    site = sites[3]
    assert site.channel == 3
    assert site.inbound_size == 1 * 5 * 5 + 1
    assert site.outbound_size == 10 * 24 * 24
    assert site.producers == ("conv",) and site.consumers == ("fc",)


def test_deep_cnn_sites_follow_the_paper_default_and_through() -> None:
    default = {s.group_name for s in _report("paper_deep_cnn").sites}
    assert default == {"features.12", "features.14"}
    through = _report("paper_deep_cnn", ("batchnorm", "pooling"))
    assert {s.group_name for s in through.sites} == {
        "features.0", "features.4", "features.8", "features.12", "features.14"
    }
    assert len(through.sites) == 5 * 64
    blocked = _group(_report("paper_deep_cnn"), "features.0")
    assert any("batch norm 'features.1'" in reason for reason in blocked.reasons)
    pooled = _report("paper_deep_cnn", ("batchnorm",))
    assert any("pooling 'features.3'" in r for r in _group(pooled, "features.0").reasons)


def test_resnet_residual_stream_is_one_coupled_group() -> None:
    report = _report("resnet_stack", ("batchnorm", "pooling"))
    stream = _group(report, "stem.0")
    assert stream.legal
    assert set(stream.producers) == {"stem.0", "layer1.0.conv2", "layer1.1.conv2"}
    assert set(stream.consumers) == {"layer1.0.conv1", "layer1.1.conv1", "fc"}
    assert {"stem.1", "layer1.0.bn2", "layer1.1.bn2"} <= set(stream.through)
    assert stream.inbound_size == 3 * 9 + 2 * 8 * 9  # the zoo's convs before batch norm have no bias
    assert stream.outbound_size == 2 * (8 * 9) + 10
    names = {group.name for group in report.groups}
    assert "layer1.0.conv2" not in names  # no separate group: it is part of the stream


def test_transformer_mlp_hidden_units_are_sites_and_the_stream_is_not() -> None:
    report = _report("transformer_mlp")
    assert [s.name for s in report.sites] == [f"fc1[{c}]" for c in range(32)]
    stream = _group(report, "fc2")
    assert any("model input" in reason for reason in stream.reasons)
    assert any("layer norm" in reason for reason in stream.reasons)


def test_a_stream_made_by_a_concat_no_group_reaches_is_reported_blocked() -> None:
    """ViT's residual stream: the class-token concat is not reached, yet its producers are reported."""
    report = _report("patch_transformer", tg.THROUGH_OPTIONS)
    stream = _group(report, "blocks.0.fc2")
    assert set(stream.producers) == {"blocks.0.fc2", "blocks.1.fc2"}
    assert not stream.legal
    assert "coupled to the output of concat at node 'cat'" in stream.reasons[0]
    assert any("layer norm" in reason for reason in stream.reasons)
    assert not any("broadcasts" in reason for reason in stream.reasons)  # the axis is aligned at the entry
    assert [s.name for s in report.sites] == [f"blocks.{b}.fc1[{c}]" for b in range(2) for c in range(16)]
    producers = [p for group in report.groups for p in group.producers]
    assert sorted(producers) == sorted(
        name for name, module in report_modules("patch_transformer") if isinstance(module, (nn.Linear, nn.Conv2d))
    )


def test_a_flatten_no_group_reaches_blocks_the_layers_added_to_it() -> None:
    class FlattenedSum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.side = nn.Linear(5, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            # the channels land on axis 2, inside the flatten's merged axes 1..3: no group reaches it
            z = self.conv(x).transpose(1, 2).flatten(1) + self.side(y)
            return self.head(torch.relu(z))

    report = tg.analyze(FlattenedSum(), (torch.randn(4, 3, 1, 3), torch.randn(4, 5)))
    side = _group(report, "side")
    assert not side.legal and "flatten at node" in side.reasons[0]
    conv = _group(report, "conv")
    assert any("interleaves the channels (channel axis 2" in reason for reason in conv.reasons), conv.reasons
    assert not report.sites or all(site.group_name != "side" for site in report.sites)


def report_modules(name: str) -> list[tuple[str, nn.Module]]:
    return list(ZOO_BY_NAME[name].build().named_modules())


def test_concat_maps_channels_with_offsets() -> None:
    report = _report("inception_concat")
    b2 = _group(report, "b2_conv")
    (consumer,) = [s for s in b2.slices if s.role == "outbound"]
    assert consumer.module == "conv_out" and consumer.offset == 4 and consumer.block == 1
    b3 = _group(report, "b3_conv")
    assert [s.offset for s in b3.slices if s.role == "outbound"] == [10]


def test_flatten_maps_a_filter_to_a_block_of_features() -> None:
    group = _group(_report("paper_cnn"), "conv")
    (consumer,) = [s for s in group.slices if s.role == "outbound"]
    assert (consumer.module, consumer.axis, consumer.offset, consumer.block) == ("fc", 1, 0, 24 * 24)


def test_grouped_convolution_blocks_with_a_reason() -> None:
    report = _report("grouped_conv")
    assert any("grouped convolution 'conv2'" in r for r in _group(report, "conv1").reasons)
    assert any("groups=4" in r for r in _group(report, "conv2").reasons)
    assert _group(report, "conv3").legal


def test_depthwise_needs_through() -> None:
    assert not _group(_report("depthwise_separable"), "expand").legal
    group = _group(_report("depthwise_separable", ("depthwise",)), "expand")
    assert group.legal and "depthwise" in group.through
    assert [s.param for s in group.slices if s.role == "channelwise"] == [
        "depthwise.weight", "depthwise.bias"
    ]


def test_output_layer_units_are_not_sites(zoo_entry: ZooEntry) -> None:
    model = zoo_entry.build()
    x = example_input(zoo_entry)
    report = tg.analyze(model, x, through=tg.THROUGH_OPTIONS)
    output_groups = [g for g in report.groups if any("network output" in r for r in g.reasons)]
    assert output_groups, "the last layer of every zoo model is reported as the output"
    assert all(s.group_name not in {g.name for g in output_groups} for s in report.sites)


class _Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.cumsum(x, dim=1)  # mixes channels: must never be guessed element-wise
        return self.fc3(torch.tanh(self.fc2(x)))


def test_unknown_operation_blocks_and_is_named() -> None:
    report = tg.analyze(_Unknown(), torch.randn(3, 6))
    fc1 = _group(report, "fc1")
    assert not fc1.legal
    assert any("cumsum" in r and "cumsum" in r.split("node")[-1] for r in fc1.reasons)
    assert _group(report, "fc2").legal


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(6, 4)
        self.hidden = nn.Linear(4, 4)
        self.decode = nn.Linear(4, 6)
        self.decode.weight = nn.Parameter(self.encode.weight.t().contiguous())
        self.hidden2 = self.hidden  # the same layer, reused below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.encode(x))
        h = torch.tanh(self.hidden(h))
        h = torch.tanh(self.hidden2(h))
        return self.decode(h)


def test_a_layer_called_twice_blocks_its_sites() -> None:
    report = tg.analyze(_Tied(), torch.randn(2, 6))
    assert not report.sites
    assert any("shared" in r for r in _group(report, "encode").reasons)


class _TiedStorage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 5)
        self.c = nn.Linear(5, 3)
        self.d = nn.Linear(5, 3)
        self.d.weight = self.c.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.c(h) + self.d(h)


def test_tied_weights_block_the_site() -> None:
    report = tg.analyze(_TiedStorage(), torch.randn(2, 4))
    assert _group(report, "a").legal
    assert any("shared" in r for r in _group(report, "b").reasons)


def test_unknown_through_option_is_refused() -> None:
    entry = ZOO_BY_NAME["mlp_tanh"]
    with pytest.raises(ValueError, match="batchnorm"):
        tg.find_sites(entry.build(), example_input(entry), through=("batchnorms",))


def test_report_renders_every_group_with_its_reasons() -> None:
    report = _report("paper_deep_cnn")
    as_dict = report.to_dict()
    assert as_dict["sites"] == 128
    assert len(as_dict["groups"]) == 6
    markdown = report.to_markdown()
    assert "features.0" in markdown and "blocked: feeds batch norm" in markdown
    assert "128 sites in 2 of 6 channel groups" in markdown


class _ShapeScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        h = h / h.size(1)  # counts channels: a clone would change it
        h = 2.0 - torch.tanh(self.fc2(h)) * 3
        return self.fc3(h)


def test_scaling_by_a_shape_blocks_and_scaling_by_a_number_does_not() -> None:
    report = tg.analyze(_ShapeScaled(), torch.randn(3, 4))
    assert any("computed from shapes" in r for r in _group(report, "fc1").reasons)
    assert _group(report, "fc2").legal


def test_a_group_coupled_to_the_model_input_gives_that_reason_alone() -> None:
    """The input's channel axis is unknown: what reads it must not add "reads axis 1, not the channel axis -1"."""

    class InputResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv1d(3, 3, 1)
            self.b = nn.Conv1d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x) + x))

    groups = {g.name: g for g in tg.analyze(InputResidual(), torch.randn(5, 3, 4)).groups}
    assert groups["a"].reasons == ("coupled to the model input 'x', whose channels cannot be cloned",)

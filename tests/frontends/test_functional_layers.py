"""Layers called as functions on their own tensors: F.conv2d / F.linear, padding, weight standardisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tunnelgraph as tg
from tunnelgraph.analysis.groups import channel_groups
from tunnelgraph.errors import StatisticsError
from tunnelgraph.ir import OpKind
from zoo import ZOO_BY_NAME, example_input

THROUGH = ("pooling",)


def _model() -> tuple[nn.Module, torch.Tensor]:
    entry = ZOO_BY_NAME["weight_standardized"]
    torch.manual_seed(0)
    return entry.build().double().eval(), example_input(entry).double()


def test_standardised_and_functional_convs_are_layers_of_their_modules() -> None:
    model, x = _model()
    graph = tg.trace(model, x)
    layers = {node.module: node for node in graph if node.kind == OpKind.PARAMETRIC}
    assert set(layers) == {"stem", "conv1", "conv2", "fc"}
    assert layers["stem"].attrs["computed_weight"] and layers["conv1"].attrs["computed_weight"]
    assert "computed_weight" not in layers["conv2"].attrs  # a stored weight, called as F.conv2d after F.pad
    assert set(layers["conv1"].params) == {"weight", "gain", "bias"}  # the gain is one value per filter
    # the weight's computation is made of constants, not of operations that block channels
    blocking = [node for node in graph if node.kind == OpKind.BLOCKING]
    assert [node.name for node in blocking] == ["conv2d_3"]
    assert "mixes output filters" in blocking[0].attrs["detail"]


def test_a_standardised_conv_is_an_exact_producer_and_refuses_to_be_a_consumer() -> None:
    model, x = _model()
    groups = {group.name: group for group in channel_groups(tg.trace(model, x), THROUGH)}
    assert groups["conv1"].legal  # ScaledStdConv2d's filters, read by a plain (functional) conv
    (reason,) = groups["stem"].reasons  # StdConv2d's filters, read by the ScaledStdConv2d
    assert "feeds 'conv1', whose weight is computed in forward" in reason and "weight standardisation" in reason
    assert any("mixes output filters" in reason for reason in groups["conv2"].reasons)


def test_every_site_of_a_standardised_producer_rewrites_exactly() -> None:
    model, x = _model()
    model = tg.perturbed(model, generator=torch.Generator().manual_seed(1))
    sites = [site for site in tg.find_sites(model, x, through=THROUGH) if site.group_name == "conv1"]
    assert len(sites) == 8
    generator = torch.Generator().manual_seed(2)
    for site in sites:
        lam = torch.rand(site.outbound_size, generator=generator, dtype=torch.float64)
        opened = tg.rewrite(model, site, lam=lam)
        assert opened.conv1.gain.shape == (9, 1, 1, 1) and opened.conv1.out_channels == 9
        assert opened.conv2.weight.shape[1] == 9
        report = tg.verify(model, opened, x)
        assert report.passed and report.max_rel <= 1e-10, report
        # a stored filter changed after the clone is no longer standardised like its twin: a real clone
        assert not torch.equal(opened(x), model(x) + 1)


def test_a_broken_clone_of_a_standardised_filter_is_caught() -> None:
    """The check can fail: cloning the weight but not the gain changes the function."""
    model, x = _model()
    model = tg.perturbed(model, generator=torch.Generator().manual_seed(1))
    site = next(site for site in tg.find_sites(model, x, through=THROUGH) if site.group_name == "conv1")
    opened = tg.rewrite(model, site, lam=torch.full((site.outbound_size,), 0.5, dtype=torch.float64))
    with torch.no_grad():
        opened.conv1.gain[-1] *= 2
    assert not tg.verify(model, opened, x).passed


def test_sites_of_functional_layers_are_left_out_of_the_statistics_with_the_reason() -> None:
    from tunnelgraph.statistics.engine import measurable

    model, x = _model()
    sites = tg.find_sites(model, x, through=THROUGH)
    assert sites and not any(measurable(site) for site in sites)
    assert any("computes its weight in forward" in note for note in sites[0].group.unmeasured)
    y = torch.randint(0, 3, (x.shape[0],))
    with pytest.raises(StatisticsError, match="not measured .* computes its weight in forward"):
        tg.a_statistics(model, sites[:1], [(x, y)], F.cross_entropy, progress=False)


def test_equal_standardised_filters_are_redundant_and_scaled_ones_are_not_claimed() -> None:
    """A filter twice another standardises to the same filter: with the bias doubled too the units are
    not ``relu_scaled`` (x = 2 x'), as they would be for a plain conv; only equal filters are claimed."""
    from zoo import StdConv2d

    class Standardised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = StdConv2d(2, 5, 3)
            self.fc = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = Standardised().double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        model.conv.weight[1] = model.conv.weight[0]
        model.conv.bias[1] = model.conv.bias[0]
        model.conv.weight[3] = 2 * model.conv.weight[2]
        model.conv.bias[3] = 2 * model.conv.bias[2]
    findings = {(f.channel, f.condition) for f in tg.analyze(model, x, through=THROUGH).reducibility}
    assert findings == {(1, "redundant")}
    plain = nn.Conv2d(2, 5, 3).double()
    plain.load_state_dict(model.conv.state_dict())
    model.conv = plain  # the same stored filters in a plain conv: channel 3 is 2 x channel 2 after ReLU
    findings = {(f.channel, f.condition) for f in tg.analyze(model, x, through=THROUGH).reducibility}
    assert findings == {(1, "redundant"), (3, "relu_scaled")}


def test_pad_passes_channels_unless_it_pads_their_axis() -> None:
    class Padded(nn.Module):
        def __init__(self, pads: tuple[int, ...]) -> None:
            super().__init__()
            self.pads = pads
            self.conv = nn.Conv2d(2, 4, 3)
            self.head = nn.Conv2d(4 + sum(pads[4:6]), 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.pad(torch.relu(self.conv(x)), self.pads, value=0.3))

    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    spatial = Padded((1, 2, 0, 1)).double()
    sites = tg.find_sites(spatial, x)
    assert len(sites) == 4
    for site in sites:
        opened = tg.rewrite(spatial, site, lam=torch.rand(site.outbound_size, dtype=torch.float64))
        assert tg.verify(spatial, opened, x).passed
    channels = Padded((0, 0, 0, 0, 1, 0)).double()
    (group,) = [g for g in channel_groups(tg.trace(channels, x)) if g.name == "conv"]
    assert any("pads the channel axis 1" in reason for reason in group.reasons)


def test_functional_linear_on_a_root_parameter_rewrites_exactly() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(5, 4))
            self.b1 = nn.Parameter(torch.randn(5))
            self.out = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(F.linear(x, self.w1, self.b1)))

    model = Functional().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    sites = tg.find_sites(model, x)
    assert len(sites) == 5 and sites[0].group.producers == ("w1",)
    opened = tg.rewrite(model, sites[2], lam=torch.rand(2, dtype=torch.float64))
    assert opened.w1.shape == (6, 4) and opened.b1.shape == (6,) and opened.out.in_features == 6
    assert tg.verify(model, opened, x).passed


class TwoOfOneModule(nn.Module):
    """Two layers written as F.linear on bare parameters of one module: two layers, two names."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(3, 4))
        self.b1 = nn.Parameter(torch.randn(3))
        self.w2 = nn.Parameter(torch.randn(3, 3))
        self.w3 = nn.Parameter(torch.randn(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2)), self.w3)


def test_layers_on_tensors_of_one_module_are_named_by_their_tensors() -> None:
    model = TwoOfOneModule().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    sites = tg.find_sites(model, x)
    assert [site.group_name for site in sites] == ["w1"] * 3 + ["w2"] * 3
    assert len({site.name for site in sites}) == 6
    opened = tg.rewrite(model, "w2[1]", 0.3, example_inputs=x)
    assert opened.w2.shape == (4, 3) and opened.w3.shape == (2, 4) and tg.verify(model, opened, x).passed


def test_a_constant_unit_read_by_a_functional_layer_is_kept_with_the_reason() -> None:
    """Removing a constant unit folds its value into the consumers' biases, done for modules only."""
    model = TwoOfOneModule().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        model.w1[1] = 0.0  # unit w1[1] is relu(b1[1]) whatever the input
        model.w3[:, 2] = 0.0  # unit w2[2] leads nowhere
    reduced, report = tg.reduce(model, x)
    assert tg.verify(model, reduced, x).passed
    assert reduced.w2.shape == (2, 3) and reduced.w1.shape == (3, 4)  # w2[2] removed, w1[1] kept
    (kept,) = report.skipped
    assert kept[0].unit == "w1[1]" and "layers called as modules only" in kept[1]
    analysed = tg.analyze(model, x, data=[x], progress=False)  # the units are not measured, and that is no error
    assert analysed.measures == ()


class BlurPool(nn.Module):
    """timm's BlurPool2d: a fixed depthwise filter called with the channel count written as a number."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("filt", torch.ones(channels, 1, 3, 3) / 9, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=self.channels)


class BlurNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.blur = BlurPool(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.dw(torch.relu(self.b(self.blur(torch.relu(self.a(x)))))))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_functional_grouped_conv_with_a_written_count_blocks_and_a_module_conv_does_not(frontend: str) -> None:
    """A clone cannot update ``groups=8`` written into forward: the group before it is blocked, named.

    The module's own depthwise conv (``groups=self.groups``, which a torch.export capture also
    writes as a function call) passes its channels, and its sites rewrite exactly.
    """
    model = BlurNet().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    graph = tg.trace(model, x, frontend=frontend)
    groups = {g.name: g for g in tg.analyze(graph, through=("depthwise",), progress=False).groups}
    assert not groups["a"].legal
    assert any("groups=8 written as a number in forward" in reason for reason in groups["a"].reasons)
    assert groups["b"].legal and groups["b"].size == 8
    opened = tg.rewrite(model, "b[3]", 0.3, example_inputs=x, through=("depthwise",))
    assert opened.dw.groups == 9 and opened.dw.weight.shape == (9, 1, 3, 3)
    assert tg.verify(model, opened, x).passed

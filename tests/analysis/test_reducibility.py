"""Sussmann reducibility: planted units are found exactly, reduced exactly, and random networks flag nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tunnelgraph as tg
from zoo import TRACEABLE, ZooEntry, example_input


class MLP(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.act = activation
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self, pad: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=pad)
        self.fc = nn.Linear(6 * (4 + 2 * pad) ** 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        return self.fc(torch.relu(self.conv2(h)).flatten(1))


class Residual(nn.Module):
    """A stream of 6 channels: the stem and the block's second conv produce it; conv_a and fc read it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_a = nn.Conv2d(6, 5, 3, padding=1)
        self.conv_b = nn.Conv2d(5, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.conv_b(torch.relu(self.conv_a(h))))
        return self.fc(h.flatten(1))


class ChannelsLast(nn.Module):
    """conv (8 filters) -> relu -> channels last -> linear over the filters -> tanh -> channels first -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 5)
        self.head = nn.Linear(5 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).permute(0, 2, 3, 1)
        return self.head(torch.tanh(self.fc(h)).permute(0, 3, 1, 2).flatten(1))


def planted_channels_last() -> tuple[nn.Module, set[tuple[str, str]]]:
    """The relations hold through the transposes: they move entries and change none."""
    model = ChannelsLast().double()
    with torch.no_grad():
        model.fc.weight[:, 2] = 0
        model.conv.weight[6], model.conv.bias[6] = model.conv.weight[1], model.conv.bias[1]
        model.conv.weight[7], model.conv.bias[7] = 2.5 * model.conv.weight[3], 2.5 * model.conv.bias[3]
        model.fc.weight[4], model.fc.bias[4] = -model.fc.weight[0], -model.fc.bias[0]
    planted = {("conv[2]", "inconsequential"), ("conv[6]", "redundant"), ("conv[7]", "relu_scaled"),
               ("fc[4]", "negated")}
    return model, planted


def planted_mlp(kind: str) -> tuple[nn.Module, set[tuple[str, str]]]:
    activation = {"negated": nn.Tanh(), "sigmoid_complement": nn.Sigmoid(), "relu_scaled": nn.ReLU()}[kind]
    model = MLP(activation).double()
    with torch.no_grad():
        model.fc2.weight[:, 2] = 0
        model.fc1.weight[4] = 0
        model.fc1.weight[6], model.fc1.bias[6] = model.fc1.weight[1], model.fc1.bias[1]
        factor = 2.5 if kind == "relu_scaled" else -1.0
        model.fc1.weight[7], model.fc1.bias[7] = factor * model.fc1.weight[3], factor * model.fc1.bias[3]
    planted = {("fc1[2]", "inconsequential"), ("fc1[4]", "constant"), ("fc1[6]", "redundant"), ("fc1[7]", kind)}
    return model, planted


def planted_conv(pad: int = 0) -> tuple[nn.Module, set[tuple[str, str]]]:
    model = ConvNet(pad).double()
    with torch.no_grad():
        model.conv2.weight[:, 2] = 0
        model.conv1.weight[4], model.conv1.bias[4] = 0, 0.7  # relu(0.7): a non-zero constant
        model.conv1.weight[6], model.conv1.bias[6] = model.conv1.weight[1], model.conv1.bias[1]
        model.conv1.weight[7], model.conv1.bias[7] = 0.5 * model.conv1.weight[3], 0.5 * model.conv1.bias[3]
        model.conv2.weight[5] = 0
    planted = {
        ("conv1[2]", "inconsequential"), ("conv1[4]", "constant"), ("conv1[6]", "redundant"),
        ("conv1[7]", "relu_scaled"), ("conv2[5]", "constant"),
    }
    return model, planted


def planted_residual() -> tuple[nn.Module, set[tuple[str, str]]]:
    model = Residual().double()
    with torch.no_grad():
        for layer in (model.stem, model.conv_b):
            layer.weight[4], layer.bias[4] = layer.weight[1], layer.bias[1]
        model.conv_a.weight[:, 2] = 0
        model.fc.weight.view(2, 6, 16)[:, 2] = 0
    return model, {("stem[4]", "redundant"), ("stem[2]", "inconsequential")}


# The parameter count of each network without its planted units, layer by layer.
_MLP_WITHOUT = (6 * 6 + 6) + (3 * 6 + 3)  # 10 -> 6 hidden units
_CONV_WITHOUT = (4 * 3 * 9 + 4) + (5 * 4 * 9 + 5) + (2 * 5 * 16 + 2)  # conv1 8 -> 4, conv2 6 -> 5
_CHANNELS_LAST_WITHOUT = (5 * 3 * 9 + 5) + (4 * 5 + 4) + (2 * 4 * 4 + 2)  # conv 8 -> 5, fc 5 -> 4
_RESIDUAL_WITHOUT = (4 * 3 * 9 + 4) + (5 * 4 * 9 + 5) + (4 * 5 * 9 + 4) + (2 * 4 * 16 + 2)  # stream 6 -> 4

PLANTED = {
    "mlp_negated": (lambda: planted_mlp("negated"), (4, 6), _MLP_WITHOUT),
    "mlp_sigmoid_complement": (lambda: planted_mlp("sigmoid_complement"), (4, 6), _MLP_WITHOUT),
    "mlp_relu_scaled": (lambda: planted_mlp("relu_scaled"), (4, 6), _MLP_WITHOUT),
    "conv": (planted_conv, (4, 3, 8, 8), _CONV_WITHOUT),
    "residual": (planted_residual, (4, 3, 4, 4), _RESIDUAL_WITHOUT),
    "channels_last": (planted_channels_last, (4, 3, 4, 4), _CHANNELS_LAST_WITHOUT),
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_parametric_detection_finds_exactly_the_planted_units(name: str) -> None:
    build, shape, _ = PLANTED[name]
    model, planted = build()
    report = tg.analyze(model, torch.randn(shape, dtype=torch.float64))
    assert {(f.unit, f.condition) for f in report.reducibility} == planted
    assert all(f.exact and f.action for f in report.reducibility)
    assert "## Reducibility" in report.to_markdown()
    assert len(report.to_dict()["reducibility"]) == len(planted)


@pytest.mark.parametrize("name", list(PLANTED))
def test_reduce_removes_the_planted_units_and_keeps_the_function(name: str) -> None:
    build, shape, expected = PLANTED[name]
    model, planted = build()
    x = torch.randn(shape, dtype=torch.float64)
    smaller, report = tg.reduce(model, x)
    assert {(f.unit, f.condition) for f in report.applied} == planted and not report.skipped
    assert report.parameters_after == expected
    assert sum(p.numel() for p in smaller.parameters()) == report.parameters_after
    check = tg.verify(model, smaller, torch.randn(shape, dtype=torch.float64), rtol=1e-6, atol=0)
    assert check.passed and report.equivalence is not None and report.equivalence.max_rel <= 1e-6
    assert tg.analyze(smaller, x).reducibility == ()


def test_a_constant_unit_that_a_padding_conv_reads_is_skipped_with_the_reason() -> None:
    model, _ = planted_conv(pad=1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    smaller, report = tg.reduce(model, x)
    skipped = {f.unit: reason for f, reason in report.skipped}
    assert "conv1[4]" in skipped and "not a bias" in skipped["conv1[4]"]
    assert "conv1[4]" not in {f.unit for f in report.applied}
    assert tg.verify(model, smaller, x).passed


@pytest.mark.parametrize("entry", TRACEABLE, ids=[e.name for e in TRACEABLE])
def test_random_zoo_networks_flag_nothing(entry: ZooEntry) -> None:
    model = entry.build()
    report = tg.analyze(model, example_input(entry), through=tg.THROUGH_OPTIONS)
    assert report.reducibility == ()


def test_theorem_loop_open_then_reduce_restores_the_network() -> None:
    model = MLP(nn.Tanh()).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    site = tg.find_sites(model, x)[3]

    inconsequential = tg.rewrite(model, site, 1.0)
    findings = tg.analyze(inconsequential, x).reducibility
    assert [(f.unit, f.condition) for f in findings] == [("fc1[10]", "inconsequential")]

    lam = torch.rand(site.outbound_size, dtype=torch.float64)
    opened = tg.rewrite(model, site, lam)
    findings = tg.analyze(opened, x).reducibility
    assert [(f.unit, f.condition, f.partner) for f in findings] == [("fc1[10]", "redundant", 3)]

    for wider in (inconsequential, opened):
        restored, report = tg.reduce(wider, x)
        assert restored.fc1.out_features == 10 and restored.fc2.in_features == 10
        assert tg.verify(model, restored, x).passed
        for name, tensor in model.state_dict().items():
            assert torch.allclose(restored.state_dict()[name], tensor, rtol=1e-12, atol=1e-14), name


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def threads(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Run under 1 and 2 intra-op threads: BLAS then sums in different orders."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("split", [16, 64, 7])
@pytest.mark.parametrize("name", ["conv", "residual", "mlp_sigmoid_complement"])
def test_empirical_measures_find_the_planted_units(name: str, split: int, threads: int) -> None:
    build, shape, expected = PLANTED[name]
    model, planted = build()
    x = torch.randn((64, *shape[1:]), dtype=torch.float64)
    data = [(x[i:i + split], None) for i in range(0, 64, split)]
    report = tg.analyze(model, x[:4], data=data, progress=False)
    assert len(report.measures) == len(report.sites) and report.measures[0].samples == 64
    assert "Empirical measures (64 samples)" in report.to_markdown()
    from tunnelgraph.analysis.reducibility import empirical_findings

    found = {(f.unit, f.condition) for f in empirical_findings(report.groups, {m.unit: m for m in report.measures}, tol=1e-9)}
    # the data see every planted unit; relations show as redundant (an affine fit)
    assert {unit for unit, _ in found} == {unit for unit, _ in planted}
    # reducing with data only (parametric tolerance 0 finds exact zeros and equalities too)
    smaller, reduction = tg.reduce(model, x[:4], data=data, tol=1e-9)
    assert reduction.parameters_after == expected
    assert tg.verify(model, smaller, x, rtol=1e-6, atol=1e-9).passed


def test_data_find_a_dead_relu_unit_that_the_weights_do_not() -> None:
    model = MLP(nn.ReLU()).double()
    with torch.no_grad():
        model.fc1.bias[5] = -100.0  # never active on standard-normal inputs
    x = torch.randn(256, 6, dtype=torch.float64)
    data = [(x[i:i + 64], None) for i in range(0, 256, 64)]
    assert tg.analyze(model, x).reducibility == ()
    smaller, report = tg.reduce(model, x[:8], data=data)
    assert [(f.unit, f.condition, f.exact) for f in report.applied] == [("fc1[5]", "constant", False)]
    assert smaller.fc1.out_features == 9
    assert tg.verify(model, smaller, x).passed


def test_reorganize_picks_the_planted_near_redundant_pair() -> None:
    torch.manual_seed(3)
    model = MLP(nn.Tanh()).double()
    with torch.no_grad():
        noise = 1e-3 * torch.randn(6, dtype=torch.float64)
        model.fc1.weight[8] = model.fc1.weight[2] + noise
        model.fc1.bias[8] = model.fc1.bias[2]
    x = torch.randn(512, 6, dtype=torch.float64)
    y = torch.randn(512, 3, dtype=torch.float64)
    data = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]
    site = tg.find_sites(model, x[:2])[0]
    loss = lambda out, target: ((out - target) ** 2).mean()  # noqa: E731
    new, report = tg.reorganize_from_data(model, clone=site, lam=0.5, data=data, loss_fn=loss)
    assert {report.merged, report.into} == {"fc1[2]", "fc1[8]"}
    assert report.correlation > 0.999 and report.samples == 512
    assert new.fc1.weight.shape == model.fc1.weight.shape
    # against merging a random pair of the same group, the planted pair changes the function far less
    random_pair = tg.reorganize(model, merge=(tg.find_sites(model, x[:2])[5], 1), clone=0, lam=0.5)
    random_change = tg.function_change(model, random_pair, data, loss)
    assert report.max_abs_change < random_change["max_abs_change"] / 10
    assert abs(report.loss_after - report.loss_before) < abs(random_change["loss_after"] - random_change["loss_before"])
    with pytest.raises(TypeError, match="reorganize_from_data"):
        tg.reorganize(model, clone=site, lam=0.5)


@pytest.mark.parametrize("tol", [0.0, 1e-12, 1e-6])
def test_candidate_partners_hold_every_related_pair(tol: float) -> None:
    """The sorted-projection search misses no pair that the pairwise check relates (equal, negated, scaled
    by a tiny or a huge factor, off by just under the tolerance), so the findings are those of C^2 checks."""
    import numpy as np

    from tunnelgraph.analysis.reducibility import _candidate_partners, _relation

    generator = np.random.default_rng(7)
    base = generator.normal(size=(12, 30))
    rows = [base[i] for i in range(12)]
    for source, factor in [(0, 1.0), (1, -1.0), (2, 1e-3), (3, 1e3), (4, 2.5), (5, -1.0), (0, 7.0)]:
        planted = factor * rows[source]
        scale = np.abs(planted).max()
        rows.append(planted + 0.9 * tol * min(scale, np.abs(rows[source]).max()) * generator.choice([-1.0, 1.0], 30))
    rows.append(np.zeros(30))
    rows.append(rows[3] + 1e-2)  # not related
    matrix = np.stack(rows)
    order = generator.permutation(len(rows))
    matrix = matrix[order]
    empty = np.zeros((0,))
    chain = {"activation:neg"}  # odd and positively homogeneous: every relation is allowed
    related = {
        (p, c) for c in range(len(matrix)) for p in range(c)
        if _relation(matrix[p], matrix[c], empty, empty, chain, tol if tol else 1e-15) is not None
    }
    candidates = _candidate_partners(matrix, tol if tol else 1e-15)
    assert len(related) >= 6
    assert related <= {(p, c) for c, found in candidates.items() for p in found}
    assert all(p < c for c, found in candidates.items() for p in found)


def test_channel_rows_are_views_whose_measures_match_the_float64_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of a float32 producer (a slice of a larger weight) and its bias: each measure read slice by slice,
    a block of channels at a time, equals the one of the concatenated float64 rows."""
    import numpy as np

    from tunnelgraph.analysis.groups import ParamSlice
    from tunnelgraph.analysis.reducibility import ChannelRows, channel_rows

    generator = np.random.default_rng(3)
    weight = generator.normal(size=(40, 6, 3, 3)).astype(np.float32)
    bias = generator.normal(size=40).astype(np.float32)
    weights = {"w": weight, "b": bias}
    slices = [ParamSlice("w", "conv", "inbound", weight.shape, 0, offset=8, part="weight"),
              ParamSlice("b", "conv", "inbound", bias.shape, 0, offset=8, part="bias")]
    monkeypatch.setattr(ChannelRows, "BLOCK", 100)  # several blocks of channels
    rows = ChannelRows(weights, slices, 24)
    direction = generator.uniform(-1, 1, rows.width)
    dense = channel_rows(weights, slices, 24)
    assert dense.shape == (24, 55) and dense.dtype == np.float64
    assert np.shares_memory(rows.parts[0], weight)  # a view, no copy of the weights
    np.testing.assert_allclose(rows.project(direction), dense @ direction, rtol=1e-13, atol=1e-12)
    np.testing.assert_array_equal(rows.largest(), np.abs(dense).max(axis=1))
    np.testing.assert_array_equal(rows.row(5), dense[5])

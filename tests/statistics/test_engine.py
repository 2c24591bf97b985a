"""A-statistics against autograd on every site kind of the zoo (docs/MATH.md sections 4, 5, 7)."""

from __future__ import annotations

import copy

import pytest
import torch

import tunnelgraph as tg
from conftest import inbound_gradient, mean_gradients, regression_data, relative, squared_error
from zoo import ZOO_BY_NAME, ZooEntry

THROUGH = tg.THROUGH_OPTIONS


def one_site_per_group(sites: list[tg.Site], generator: torch.Generator) -> list[tg.Site]:
    groups: dict[str, list[tg.Site]] = {}
    for site in sites:
        groups.setdefault(site.group_name, []).append(site)
    return [
        members[int(torch.randint(len(members), (1,), generator=generator))] for members in groups.values()
    ]


def test_a_matches_autograd_in_the_rewritten_model(zoo_entry: ZooEntry) -> None:
    """A @ lam and A @ (1 - lam) are the two inbound gradients after opening; A @ 1 the current one."""
    model = zoo_entry.build().double()
    data = regression_data(model, zoo_entry, torch.float64)
    # A is not defined where a layer both produces and reads a group (tested below)
    sites = [site for site in tg.find_sites(model, data[0][0], through=THROUGH) if not site.group.self_consumers]
    if not sites:
        pytest.skip(f"{zoo_entry.name} has no sites")
    generator = torch.Generator().manual_seed(1)
    chosen = one_site_per_group(sites, generator)
    stats = tg.a_statistics(model, chosen, data, squared_error, method="exact", progress=False)
    before = mean_gradients(model, data, squared_error)
    for site in chosen:
        entry = stats[site.name]
        assert entry.a is not None and entry.a.shape == (site.inbound_size, site.outbound_size)
        lam = torch.rand(site.outbound_size, generator=generator, dtype=torch.float64) * 2 - 0.5
        opened = tg.rewrite(model, site, lam)
        after = mean_gradients(opened, data, squared_error)
        original = inbound_gradient(after, site, site.channel)
        clone = inbound_gradient(after, site, site.group.size)
        assert relative(entry.a @ lam, original) <= 1e-6, site.name
        assert relative(entry.a @ (1 - lam), clone) <= 1e-6, site.name
        assert relative(entry.gradient, inbound_gradient(before, site, site.channel)) <= 1e-6, site.name
        assert original.norm() > 0 or entry.sigma == 0


@pytest.mark.parametrize("name", ["paper_cnn", "resnet_stack", "inception_concat", "conv1d"])
def test_gradient_norm_identity_after_opening_with_lambda_t(name: str) -> None:
    """||g_u||^2 + ||g_u'||^2 = ||A 1||^2 / 2 + 2 t^2 sigma_max(A)^2 (docs/MATH.md section 4)."""
    entry = ZOO_BY_NAME[name]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64)
    sites = tg.find_sites(model, data[0][0], through=THROUGH)
    site = max(sites, key=lambda s: (s.outbound_size, s.name))
    stats = tg.a_statistics(model, [site], data, squared_error, progress=False)[site.name]
    for t in (0.1, 1.0, 5.0):
        opened = tg.rewrite(model, site, tg.lambda_t(stats, t))
        after = mean_gradients(opened, data, squared_error)
        norm = inbound_gradient(after, site, site.channel).norm() ** 2
        norm += inbound_gradient(after, site, site.group.size).norm() ** 2
        expected = stats.gradient.norm() ** 2 / 2 + 2 * t**2 * stats.sigma**2
        assert relative(norm, expected) <= 1e-6, t


def test_exact_triplet_is_the_svd_of_a() -> None:
    entry = ZOO_BY_NAME["paper_cnn"]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64)
    sites = tg.find_sites(model, data[0][0])
    stats = tg.a_statistics(model, sites[:3], data, squared_error, progress=False)
    for entry_stats in stats.values():
        u, s, vh = torch.linalg.svd(entry_stats.a, full_matrices=False)
        assert entry_stats.sigma == pytest.approx(float(s[0]), rel=1e-9)
        assert abs(float(vh[0] @ entry_stats.direction)) == pytest.approx(1.0, abs=1e-9)
        largest = entry_stats.direction.abs().argmax()
        assert entry_stats.direction[largest] > 0


class _InPlace(torch.nn.Module):
    """In-place activations right after a producer and a consumer, and a functional concat partner."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(3, 2, 1)
        self.conv3 = torch.nn.Conv2d(6, 5, 3)
        self.relu = torch.nn.ReLU(inplace=True)
        self.fc = torch.nn.Linear(5 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.conv1(x))
        b = torch.tanh(self.conv2(x)) * 2.0
        h = torch.cat([a, b], dim=1)
        h = torch.relu_(self.conv3(h))
        return self.fc(h.flatten(1))


def test_in_place_operations_and_recomputed_externals() -> None:
    model = _InPlace().double()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    data = [(x, torch.randn(5, 3, dtype=torch.float64))]
    sites = tg.find_sites(model, x)
    assert {s.group_name for s in sites} == {"conv1", "conv2", "conv3"}
    stats = tg.a_statistics(model, sites, data, squared_error, method="exact", progress=False)
    before = mean_gradients(model, data, squared_error)
    generator = torch.Generator().manual_seed(3)
    for site in sites:
        lam = torch.rand(site.outbound_size, generator=generator, dtype=torch.float64)
        after = mean_gradients(tg.rewrite(model, site, lam), data, squared_error)
        assert relative(stats[site.name].a @ lam, inbound_gradient(after, site, site.channel)) <= 1e-6
        assert relative(stats[site.name].gradient, inbound_gradient(before, site, site.channel)) <= 1e-6


class _Geometry(torch.nn.Module):
    """Padding modes, string padding, a 3d conv and a conv1d with dilation: index arithmetic only."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.b = torch.nn.Conv2d(4, 3, (3, 2), padding="same", padding_mode="circular", dilation=(1, 2))
        self.c = torch.nn.Conv2d(3, 5, 2, stride=(2, 1), padding="valid")
        self.fc = torch.nn.Linear(5 * 3 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.a(x))
        x = torch.sigmoid(self.b(x))
        return self.fc(torch.relu(self.c(x)).flatten(1))


class _Volume(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv3d(2, 3, 2, padding=1, stride=(1, 2, 1))
        self.b = torch.nn.Conv3d(3, 2, (2, 1, 2), dilation=(2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).mean((2, 3, 4))


@pytest.mark.parametrize(
    ("build", "shape"), [(_Geometry, (4, 2, 6, 6)), (_Volume, (3, 2, 4, 5, 4))], ids=["padding_modes", "conv3d"]
)
@pytest.mark.parametrize("method", ["exact", "matrix_free"])
def test_conv_geometry(build, shape, method: str) -> None:  # type: ignore[no-untyped-def]
    model = build().double()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        data = [(x, torch.randn_like(model(x)))]
    sites = tg.find_sites(model, x)
    assert sites
    stats = tg.a_statistics(model, sites, data, squared_error, method=method, progress=False)
    exact = tg.a_statistics(model, sites, data, squared_error, method="exact", progress=False)
    generator = torch.Generator().manual_seed(5)
    for site in sites[:: max(1, len(sites) // 4)]:
        lam = torch.rand(site.outbound_size, generator=generator, dtype=torch.float64)
        after = mean_gradients(tg.rewrite(model, site, lam), data, squared_error)
        assert relative(exact[site.name].a @ lam, inbound_gradient(after, site, site.channel)) <= 1e-6
        assert stats[site.name].sigma == pytest.approx(exact[site.name].sigma, rel=1e-6)


@pytest.mark.parametrize("name", ["paper_cnn", "inception_concat", "resnet_stack"])
def test_a_subset_of_channels_gets_the_same_a_as_the_whole_group(name: str) -> None:
    """Non-contiguous channel subsets (gathered, not sliced) give the same A as measuring every channel."""
    entry = ZOO_BY_NAME[name]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64)
    sites = tg.find_sites(model, data[0][0], through=THROUGH)
    group = [s for s in sites if s.group_name == sites[0].group_name]
    subset = [group[0], group[2], group[-1]]
    every = tg.a_statistics(model, group, data, squared_error, method="exact", progress=False)
    some = tg.a_statistics(model, subset, data, squared_error, method="exact", progress=False)
    for site in subset:
        # other channel subsets batch the products differently, so sums run in another order
        assert relative(some[site.name].a, every[site.name].a) <= 1e-12


def test_a_group_that_a_layer_both_produces_and_reads_is_refused_by_name() -> None:
    """The inverted residual's stream: the rewrite is exact, the paper's A is not defined."""
    entry = ZOO_BY_NAME["inverted_residual"]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64)
    sites = tg.find_sites(model, data[0][0], through=THROUGH)
    stream = [site for site in sites if site.group.self_consumers]
    assert stream and stream[0].group.self_consumers == ("project1",)
    with pytest.raises(tg.StatisticsError, match="project1.*both produce and read"):
        tg.a_statistics(model, stream[:1], data, squared_error, progress=False)
    opened, tunnels = tg.open_tunnels(model, data, squared_error, k=2, through=THROUGH, progress=False)
    assert len(tunnels) == 2 and not any(t.site.group.self_consumers for t in tunnels)
    assert tg.verify(model, opened, data[0][0]).passed


def test_a_given_graph_is_used_instead_of_tracing_again(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = ZOO_BY_NAME["inception_concat"]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64)
    graph = tg.trace(model, data[0][0])
    sites = tg.find_sites(graph)
    traced = tg.a_statistics(model, sites, data, squared_error, method="exact", progress=False)

    def no_second_trace(*args: object, **kwargs: object) -> None:
        raise AssertionError("a_statistics traced the model although graph= was given")

    monkeypatch.setattr("tunnelgraph.statistics.engine.trace", no_second_trace)
    given = tg.a_statistics(model, sites, data, squared_error, method="exact", progress=False, graph=graph)
    for site in sites:
        assert torch.equal(given[site.name].a, traced[site.name].a)


def test_a_graph_of_another_model_is_refused() -> None:
    entry = ZOO_BY_NAME["paper_cnn"]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64)
    graph = tg.trace(model, data[0][0])
    sites = tg.find_sites(graph)
    with pytest.raises(tg.StatisticsError, match="not traced from this model"):
        tg.a_statistics(copy.deepcopy(model), sites, data, squared_error, progress=False, graph=graph)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("part", ["direction", "gradient"])
def test_statistics_that_are_not_finite_are_refused_naming_the_site(bad: float, part: str) -> None:
    """The check reads each group's tensor once (by its minimum and maximum); one bad entry names its site."""
    import dataclasses
    import re

    from tunnelgraph.statistics.engine import check_statistics

    entry = ZOO_BY_NAME["paper_cnn"]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64)
    sites = tg.find_sites(model, data[0][0])
    results = tg.a_statistics(model, sites, data, squared_error, method="matrix_free", progress=False)
    check_statistics(results.values())  # the real ones pass
    victim = sites[-1].name
    spoiled = getattr(results[victim], part).clone()
    spoiled[len(spoiled) // 2] = bad
    results[victim] = dataclasses.replace(results[victim], **{part: spoiled})
    with pytest.raises(tg.StatisticsError, match=re.escape(f"site {victim}: the statistics are not finite")):
        check_statistics(results.values())

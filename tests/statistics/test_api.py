"""lambda_t, random_lambda, rank_sites, open_tunnels, and what a_statistics refuses or leaves alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tunnelgraph as tg
import tunnelgraph.statistics.engine as engine
from conftest import inbound_gradient, mean_gradients, regression_data, relative, squared_error
from zoo import ZOO_BY_NAME


@pytest.fixture
def cnn() -> tuple[torch.nn.Module, list, list[tg.Site]]:
    entry = ZOO_BY_NAME["paper_cnn"]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64, batches=2, batch=4)
    return model, data, tg.find_sites(model, data[0][0])


def test_lambda_t_and_random_lambda(cnn) -> None:  # type: ignore[no-untyped-def]
    model, data, sites = cnn
    stats = tg.a_statistics(model, sites[:1], data, squared_error, progress=False)[sites[0].name]
    lam = tg.lambda_t(stats, 0.3)
    assert lam.shape == (sites[0].outbound_size,) and lam.dtype == torch.float64
    assert float((lam - 0.5).norm()) == pytest.approx(0.3)
    assert torch.equal(lam, tg.lambda_t(stats, 0.3))
    one = tg.random_lambda(sites[0], 0.3, torch.Generator().manual_seed(7))
    two = tg.random_lambda(sites[0], 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(one, two) and float((one - 0.5).norm()) == pytest.approx(0.3)
    assert not torch.equal(one, tg.random_lambda(sites[0], 0.3, torch.Generator().manual_seed(8)))


def test_lambda_t_beats_random_lambda_of_the_same_radius(cnn) -> None:  # type: ignore[no-untyped-def]
    model, data, sites = cnn
    site = sites[0]
    stats = tg.a_statistics(model, [site], data, squared_error, progress=False)[site.name]

    def opened_norm(lam: torch.Tensor) -> float:
        grads = mean_gradients(tg.rewrite(model, site, lam), data, squared_error)
        return float(
            inbound_gradient(grads, site, site.channel).norm() ** 2
            + inbound_gradient(grads, site, site.group.size).norm() ** 2
        )

    best = opened_norm(tg.lambda_t(stats, 1.0))
    generator = torch.Generator().manual_seed(0)
    assert all(opened_norm(tg.random_lambda(site, 1.0, generator)) <= best for _ in range(5))


def test_rank_sites_orders_by_sigma(cnn) -> None:  # type: ignore[no-untyped-def]
    model, data, sites = cnn
    stats = tg.a_statistics(model, sites, data, squared_error, progress=False)
    ranked = tg.rank_sites(stats)
    assert [s.sigma for s in ranked] == sorted((s.sigma for s in stats.values()), reverse=True)
    assert tg.rank_sites(list(stats.values())) == ranked


def test_open_tunnels_opens_the_k_steepest_and_keeps_the_function(cnn) -> None:  # type: ignore[no-untyped-def]
    model, data, sites = cnn
    before = copy.deepcopy(model.state_dict())
    new, opened = tg.open_tunnels(model, iter(data), squared_error, k=2, t=0.5, progress=False)
    ranked = tg.rank_sites(tg.a_statistics(model, sites, data, squared_error, progress=False))
    assert [o.site for o in opened] == [s.site for s in ranked[:2]]
    assert [o.clone for o in opened] == [8, 9]
    assert new.conv.out_channels == 10
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert tg.verify(model, new, data[0][0]).passed
    # the first tunnel's pair has the gradients A lam and A (1 - lam)
    first = opened[0]
    grads = mean_gradients(new, data, squared_error)
    site = first.site
    a = first.statistics.a
    assert relative(a @ first.lam, inbound_gradient(grads, site, site.channel)) <= 1e-6
    assert relative(a @ (1 - first.lam), inbound_gradient(grads, site, first.clone)) <= 1e-6


def test_a_statistics_leaves_the_model_alone(cnn) -> None:  # type: ignore[no-untyped-def]
    model, data, sites = cnn
    model.train()
    before = copy.deepcopy(model.state_dict())
    tg.a_statistics(model, sites, data, squared_error, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model.conv._forward_hooks and not model._forward_pre_hooks


def test_partial_pass_uses_the_first_batches(cnn) -> None:  # type: ignore[no-untyped-def]
    model, data, sites = cnn
    partial = tg.a_statistics(model, sites[:1], data, squared_error, batches=1, progress=False)
    first = tg.a_statistics(model, sites[:1], data[:1], squared_error, progress=False)
    name = sites[0].name
    assert partial[name].samples == 4 and torch.equal(partial[name].a, first[name].a)


def test_bad_inputs_get_clear_errors(cnn) -> None:  # type: ignore[no-untyped-def]
    model, data, sites = cnn
    with pytest.raises(tg.StatisticsError, match="no batches"):
        tg.a_statistics(model, sites, [], squared_error)
    with pytest.raises(tg.StatisticsError, match="pair"):
        tg.a_statistics(model, sites, [data[0][0]], squared_error)
    with pytest.raises(tg.StatisticsError, match="scalar"):
        tg.a_statistics(model, sites, data, lambda out, y: (out - y) ** 2, progress=False)
    with pytest.raises(ValueError, match="method"):
        tg.a_statistics(model, sites, data, squared_error, method="fast")  # type: ignore[arg-type]
    other = ZOO_BY_NAME["paper_cnn"].build().double()
    wider = tg.rewrite(other, tg.find_sites(other, data[0][0])[0])
    with pytest.raises(tg.StatisticsError, match="does not fit"):
        tg.a_statistics(wider, sites, data, squared_error)
    with pytest.raises(ValueError, match="k must be"):
        tg.open_tunnels(model, data, squared_error, k=0)


class _TwoInputs(torch.nn.Module):
    """Two inputs joined after their first layers: the statistics pass passes tuples positionally."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(5, 4)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.tanh(self.a(x)), torch.relu(self.b(y))], dim=1))


def test_data_loader_tuple_inputs_and_a_data_parallel_wrapper() -> None:
    model = _TwoInputs().double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64)
    targets = torch.randn(12, 2, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, targets), batch_size=5)
    data = [((xb, yb), tb) for xb, yb, tb in loader]
    sites = tg.find_sites(model, (x[:2], y[:2]))
    assert {s.group_name for s in sites} == {"a", "b"}
    wrapped = torch.nn.DataParallel(model)
    stats = tg.a_statistics(wrapped, sites, data, squared_error, method="exact", progress=False)
    assert [stats[s.name].samples for s in sites] == [12] * len(sites)
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for (xb, yb), tb in data:
        loss = squared_error(model(xb, yb), tb) * (xb.shape[0] / 12)
        for (name, _), grad in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()))):
            total[name] += grad
    for site in sites:
        assert relative(stats[site.name].gradient, inbound_gradient(total, site, site.channel)) <= 1e-12


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_batch_raises_naming_it_and_opens_nothing(bad: float) -> None:
    from tunnelgraph.models import paper_cnn

    model = paper_cnn()
    data = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))) for _ in range(3)]
    data[2][0][1, 0, 5, 5] = bad  # one pixel of the third batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tg.StatisticsError, match="batch 2"):
        tg.open_tunnels(model, data, F.cross_entropy, progress=False)
    with pytest.raises(tg.StatisticsError, match="batch 2.*not finite|batch 2: the loss is"):
        tg.a_statistics(model, tg.find_sites(model, data[0][0]), data, F.cross_entropy, method="matrix_free",
                        progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_tracker_skips_a_non_finite_iteration_and_keeps_its_average() -> None:
    from tunnelgraph.models import paper_cnn

    model = paper_cnn().double()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    sites = tg.find_sites(model, x)[:2]
    with tg.StatisticsTracker(model, sites, example_inputs=x) as tracker:
        for batch in (x, x * float("nan"), x):
            loss = F.cross_entropy(model(batch), y)
            torch.autograd.grad(loss, list(model.parameters()))
        stats = tracker.statistics()
    assert tracker.updates == 2 and tracker.skipped == 1
    assert all(torch.isfinite(entry.a).all() for entry in stats.values())


class _ConvBatchNorm(torch.nn.Module):
    """conv -> batch norm -> ReLU -> conv -> global pool -> linear: its sites pass batch norm or pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 3, 3, padding=1)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.bn(self.conv(x))))
        return self.head(y.mean((2, 3)))


def test_open_tunnels_refuses_sites_of_other_through_options_before_measuring(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With k > 1 each tunnel after the first finds its site again under the call's own through=: sites found with
    other options are refused up front, naming the way out, with nothing measured and the model untouched."""
    torch.manual_seed(0)
    model = _ConvBatchNorm().double().eval()
    data = [(torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)) for _ in range(2)]
    sites = tg.find_sites(model, data[0][0], through=("batchnorm", "pooling"))
    assert {site.group_name for site in sites} == {"conv", "conv2"}
    assert tg.find_sites(model, data[0][0]) == []  # under the default rules neither group is legal
    before = copy.deepcopy(model.state_dict())
    measured: list[int] = []  # open_tunnels imports a_statistics from the engine when called
    real = engine.a_statistics
    monkeypatch.setattr(engine, "a_statistics", lambda *args, **kwargs: measured.append(1) or real(*args, **kwargs))
    with pytest.raises(tg.SiteError, match=r"conv\[0\] is not a site of this model under the default rules.*"
                                           r"pass it the through= you gave tg.find_sites"):
        tg.open_tunnels(model, data, squared_error, k=2, sites=sites, progress=False)
    with pytest.raises(tg.SiteError, match=r'with through=\("pooling",\)'):
        tg.open_tunnels(model, data, squared_error, k=2, sites=sites, through=("pooling",), progress=False)
    assert measured == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # with the options the sites were found with, both tunnels open and the function is kept
    new, opened = tg.open_tunnels(model, data, squared_error, k=2, sites=sites, through=("batchnorm", "pooling"),
                                  progress=False)
    assert len(opened) == 2 and measured == [1]
    assert tg.verify(model, new, data[0][0]).passed
    # one tunnel needs no second search: the site given is opened as it is, whatever the call's through=
    _, [single] = tg.open_tunnels(model, data, squared_error, k=1, sites=sites, progress=False)
    assert single.site.name == opened[0].site.name

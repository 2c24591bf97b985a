"""The moving-average tracker: the same A from training hooks, averaged over iterations."""

from __future__ import annotations

import pytest
import torch

import tunnelgraph as tg
from conftest import inbound_gradient, mean_gradients, regression_data, relative, squared_error
from zoo import ZOO_BY_NAME


def test_one_iteration_with_no_decay_is_a_statistics_of_that_batch() -> None:
    entry = ZOO_BY_NAME["inception_concat"]
    model = entry.build().double()
    (x, y), = regression_data(model, entry, torch.float64, batches=1)
    sites = tg.find_sites(model, x)
    with tg.StatisticsTracker(model, sites, example_inputs=x, decay=0.0) as tracker:
        squared_error(model(x), y).backward()
        tracked = tracker.statistics()
    measured = tg.a_statistics(model, sites, [(x, y)], squared_error, method="exact", progress=False)
    for site in sites:
        assert relative(tracked[site.name].a, measured[site.name].a) <= 1e-12


def test_average_over_iterations_is_the_bias_corrected_exponential_average() -> None:
    entry = ZOO_BY_NAME["paper_cnn"]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64, batches=3, batch=4)
    sites = tg.find_sites(model, data[0][0])[:3]
    decay = 0.5
    with tg.StatisticsTracker(model, sites, example_inputs=data[0][0], decay=decay) as tracker:
        for x, y in data:
            squared_error(model(x), y).backward()  # no explicit update: the next forward folds it in
        with torch.no_grad():
            model(data[0][0])  # an evaluation pass is ignored
        tracked = tracker.statistics()
        assert tracker.updates == 3
    per_batch = [
        tg.a_statistics(model, sites, [batch], squared_error, method="exact", progress=False) for batch in data
    ]
    for site in sites:
        weights = [(1 - decay) * decay ** (2 - i) for i in range(3)]
        expected = sum(w * s[site.name].a for w, s in zip(weights, per_batch)) / (1 - decay**3)
        assert relative(tracked[site.name].a, expected) <= 1e-12


def test_training_mode_batch_norm_uses_batch_statistics() -> None:
    """In training mode A @ lam is the rewritten model's training-mode gradient."""
    entry = ZOO_BY_NAME["resnet_stack"]
    model = entry.build().double().train()
    (x, y), = regression_data(model.eval(), entry, torch.float64, batches=1, batch=6)
    model.train()
    sites = tg.find_sites(model, x, through=tg.THROUGH_OPTIONS)
    with tg.StatisticsTracker(model, sites, example_inputs=x, decay=0.0) as tracker:
        squared_error(model(x), y).backward()
        stats = tracker.statistics()
    generator = torch.Generator().manual_seed(0)
    for site in sites[::5]:
        lam = torch.rand(site.outbound_size, generator=generator, dtype=torch.float64)
        opened = tg.rewrite(model, site, lam).train()
        grads = mean_gradients(opened, [(x, y)], squared_error)
        assert relative(stats[site.name].a @ lam, inbound_gradient(grads, site, site.channel)) <= 1e-6


def test_active_dropout_in_a_chain_is_refused() -> None:
    entry = ZOO_BY_NAME["mlp_bn_dropout"]
    model = entry.build().double().train()
    x = torch.randn(4, *entry.input_shape[1:], dtype=torch.float64)
    sites = [s for s in tg.find_sites(model, x, through=tg.THROUGH_OPTIONS) if "dropout" in " ".join(s.through)]
    assert sites
    with tg.StatisticsTracker(model, sites[:1], example_inputs=x) as tracker:
        model(x).sum().backward()
        with pytest.raises(tg.StatisticsError, match="dropout"):
            tracker.update()


def test_statistics_before_any_iteration_is_an_error() -> None:
    entry = ZOO_BY_NAME["mlp_tanh"]
    model = entry.build()
    x = torch.randn(2, *entry.input_shape[1:])
    tracker = tg.StatisticsTracker(model, tg.find_sites(model, x)[:1], example_inputs=x)
    with pytest.raises(tg.StatisticsError, match="no training iteration"):
        tracker.statistics()
    tracker.close()
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_the_tracker_takes_the_graph_the_sites_were_found_on(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = ZOO_BY_NAME["paper_cnn"]
    model = entry.build().double()
    (x, y), = regression_data(model, entry, torch.float64, batches=1)
    graph = tg.trace(model, x)
    sites = tg.find_sites(graph)[:2]

    def no_second_trace(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tracker traced the model although graph= was given")

    monkeypatch.setattr("tunnelgraph.statistics.tracker.trace", no_second_trace)
    with tg.StatisticsTracker(model, sites, graph=graph, decay=0.0) as tracker:
        squared_error(model(x), y).backward()
        tracked = tracker.statistics()
    measured = tg.a_statistics(model, sites, [(x, y)], squared_error, method="exact", progress=False, graph=graph)
    for site in sites:
        assert relative(tracked[site.name].a, measured[site.name].a) <= 1e-12
    with pytest.raises(ValueError, match="example_inputs= .* or graph="):
        tg.StatisticsTracker(model, sites)

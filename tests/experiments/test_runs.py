"""Escape runs: every method runs, methods share minibatches, results and reports are consistent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tunnelgraph.experiments import METHODS, RunConfig, load_task, newton_start, run
from tunnelgraph.experiments.report import markdown_table, mean_std, summary_rows
from tunnelgraph.models import paper_cnn


@pytest.fixture(scope="module")
def task():  # type: ignore[no-untyped-def]
    return load_task(None, train_samples=600, test_samples=200)


@pytest.fixture(scope="module")
def start(task):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = paper_cnn()
    flat = newton_start(model, task, samples=64, steps=2, iterations=3, progress=False)
    model.load_state_dict(flat.state)
    assert len(flat.losses) == 3 and flat.grad_norms[-1] < flat.grad_norms[0]
    return model


CONFIG = RunConfig(steps=12, batch_size=32, lr=0.1, eval_every=4, eval_samples=100, open_at=4, close_at=8,
                   statistics_batches=2, pgd_threshold=100.0, pgd_wait=3, neon_iterations=2)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_acts(method: str, task, start) -> None:  # type: ignore[no-untyped-def]
    before = {k: v.clone() for k, v in start.state_dict().items()}
    result = run(method, start, task, CONFIG, seed=1)
    assert result.steps == [0, 4, 8, 12] and len(result.losses) == 4 and len(result.batch_losses) == 12
    assert all(math.isfinite(v) for v in result.losses) and 0 <= result.test_accuracy <= 1
    actions = [e["action"] for e in result.events]
    expected = {"control": [], "noisy_sgd": [], "tunnel": ["open", "close"], "random_tunnel": ["open", "close"],
                "reorganize": ["reorganize"], "random_reorganize": ["reorganize"]}
    if method in expected:
        assert actions == expected[method]
    elif method == "pgd":
        assert actions and set(actions) == {"perturb"} and [e["step"] for e in result.events][:2] == [0, 4]
    assert all(torch.equal(before[k], v) for k, v in start.state_dict().items())  # the start is not trained


def test_every_method_sees_the_same_minibatches_until_it_acts(task, start) -> None:  # type: ignore[no-untyped-def]
    control = run("control", start, task, CONFIG, seed=2)
    tunnel = run("tunnel", start, task, CONFIG, seed=2)
    # identical up to the opening at step 4 (the opening keeps the function: the loss at step 4 agrees too)
    assert control.batch_losses[:4] == tunnel.batch_losses[:4]
    assert tunnel.losses[1] == pytest.approx(control.losses[1], rel=1e-5)
    other_seed = run("control", start, task, CONFIG, seed=3)
    assert other_seed.batch_losses[0] != control.batch_losses[0]


def test_open_at_none_waits_for_the_plateau_detector(task, start) -> None:  # type: ignore[no-untyped-def]
    config = RunConfig(steps=10, batch_size=32, lr=1e-6, eval_every=5, eval_samples=50, open_at=None, close_at=None,
                       plateau_window=4, statistics_batches=1)
    result = run("tunnel", start, task, config, seed=0)
    assert [(e["step"], e["action"], e["reason"]) for e in result.events] == [(4, "open", "plateau")]


def test_newton_start_is_cached(task, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    cache = tmp_path / "flat.pt"
    first = newton_start(paper_cnn(), task, samples=32, steps=1, iterations=2, cache=cache, progress=False)
    second = newton_start(paper_cnn(), task, samples=32, steps=1, iterations=2, cache=cache, progress=False)
    assert cache.is_file() and first.losses == second.losses
    assert all(torch.equal(first.state[k], second.state[k]) for k in first.state)


def test_summaries_and_tables(task, start) -> None:  # type: ignore[no-untyped-def]
    results = [run(m, start, task, CONFIG, seed=s) for s in (0, 1) for m in ("control", "tunnel")]
    rows = summary_rows(results, at_steps=(4, 12, 1000), level=10.0)
    assert [r["method"] for r in rows] == ["control", "tunnel"]
    assert rows[0]["seeds"] == 2 and "loss@1000" not in rows[0] and rows[0]["reached"] == "2/2"
    assert rows[0]["first<=10"] == 0.0
    mean, std = mean_std([r.loss_at(12) for r in results if r.method == "tunnel"])
    assert rows[1]["loss@12"] == mean and rows[1]["std@12"] == std
    table = markdown_table(rows)
    assert table.count("\n") == 3 and "| tunnel |" in table
    json.dumps([r.events for r in results])  # the events are JSON-serialisable
    assert all(math.isnan(v) for v in mean_std([]))  # NaN for no values


def test_unknown_method_is_named(task, start) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        run("sgd", start, task, CONFIG, seed=0)

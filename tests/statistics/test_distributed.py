"""Data-parallel statistics: two gloo processes, each with half the batches, agree with one process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tunnelgraph as tg

HERE = Path(__file__).resolve().parent


def _problem() -> tuple[torch.nn.Module, list, list[tg.Site]]:
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conftest import regression_data
    from zoo import ZOO_BY_NAME

    torch.manual_seed(0)
    entry = ZOO_BY_NAME["resnet_stack"]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64, batches=4, batch=3)
    sites = tg.find_sites(model, data[0][0], through=tg.THROUGH_OPTIONS)
    return model, data, sites


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean()


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, data, sites = _problem()
        shard = data[rank::world]
        results = {}
        for method in ("exact", "matrix_free"):
            stats = tg.a_statistics(model, sites, shard, _loss, method=method, progress=False)
            results[method] = {
                name: (s.a, s.sigma, s.direction, s.gradient, s.samples) for name, s in stats.items()
            }
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    model, data, sites = _problem()
    from conftest import relative

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for method in ("exact", "matrix_free"):
        single = tg.a_statistics(model, sites, data, _loss, method=method, progress=False)
        for site in sites:
            one = single[site.name]
            for result in ranks:
                a, sigma, direction, gradient, samples = result[method][site.name]
                assert samples == one.samples == 12
                if method == "exact":
                    assert relative(a, one.a) <= 1e-6
                assert abs(sigma - one.sigma) <= 1e-6 * one.sigma
                assert float((direction - one.direction).norm()) <= 1e-6
                assert relative(gradient, one.gradient) <= 1e-6
            # every rank holds the same lambda*
            assert torch.equal(ranks[0][method][site.name][2], ranks[1][method][site.name][2])

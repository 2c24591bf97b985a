"""Costs of the reducibility analysis, and what reorganisation's pair choice is worth.

1. Parametric analysis (``tg.analyze`` with the weights: channel groups plus
   Sussmann's conditions) of a generated ``residual_net(100, 16)`` on a
   (2, 3, 16, 16) input, ``through=("batchnorm", "pooling")``: best time,
   split into tracing + groups and the reducibility pass.
2. Empirical analysis (``tg.analyze(..., data=)``: every unit's activation
   mean, std and best affine partner) of the paper's CNN over ``--samples``
   MNIST training images read from ``--mnist DIR`` (IDX files), or random
   images of the same shape when no directory is given.
3. Reorganisation on an MLP (6 -> 10 tanh -> 3) with one planted
   near-redundant pair (unit 8 = unit 2 plus 1e-3 noise in its inbound
   weights): the pair ``tg.reorganize_from_data(clone=..., data=...)`` picks and its
   function change, against merging each other pair of the group.

Usage::

    python benchmarks/bench_reducibility.py [--mnist DIR] [--samples 10000]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn

import tunnelgraph as tg
from tunnelgraph.analysis.reducibility import parametric_findings
from tunnelgraph.analysis.groups import channel_groups
from tunnelgraph.backends.pytorch import weights_of
from tunnelgraph import datasets
from tunnelgraph.models import paper_cnn, residual_net



def best(function, repeats: int = 3):  # type: ignore[no-untyped-def]
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def parametric(repeats: int) -> dict:
    torch.manual_seed(0)
    model = residual_net(blocks=100, width=16).eval()
    x = torch.randn(2, 3, 16, 16)
    through = ("batchnorm", "pooling")
    total, report = best(lambda: tg.analyze(model, x, through=through), repeats)
    graph = tg.trace(model, x)
    groups = channel_groups(graph, through)
    weights = weights_of(model)
    findings_time, findings = best(lambda: parametric_findings(graph, groups, weights), repeats)
    return {
        "nodes": len(graph), "groups": len(groups), "units": len(report.sites),
        "analyze_s": total, "reducibility_pass_s": findings_time, "findings": len(findings),
    }


def empirical(mnist: str | None, samples: int) -> dict:
    torch.manual_seed(0)
    model = paper_cnn()
    if mnist:
        x = datasets.mnist(mnist, "train", limit=samples).images
        source = f"{len(x)} MNIST training images"
    else:
        x = torch.randn(samples, 1, 28, 28)
        source = f"{samples} random images"
    data = [(x[i:i + 256], None) for i in range(0, len(x), 256)]
    seconds, report = best(lambda: tg.analyze(model, x[:2], data=data, progress=False), 1)
    top = max(report.measures, key=lambda m: m.correlation)
    return {"data": source, "seconds": seconds, "units": len(report.measures),
            "highest_abs_corr": [top.unit, top.correlation], "findings": len(report.reducibility)}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def reorganisation() -> dict:
    torch.manual_seed(3)
    model = MLP().double()
    with torch.no_grad():
        model.fc1.weight[8] = model.fc1.weight[2] + 1e-3 * torch.randn(6, dtype=torch.float64)
        model.fc1.bias[8] = model.fc1.bias[2]
    x, y = torch.randn(2048, 6, dtype=torch.float64), torch.randn(2048, 3, dtype=torch.float64)
    data = [(x[i:i + 256], y[i:i + 256]) for i in range(0, 2048, 256)]
    loss = nn.MSELoss()
    sites = tg.find_sites(model, x[:2])
    new, chosen = tg.reorganize_from_data(model, clone=sites[0], lam=0.5, data=data, loss_fn=loss)
    others = []
    for merged in range(1, 10):
        for into in range(10):
            if into != merged and {merged, into} != {2, 8}:
                other = tg.reorganize(model, merge=(sites[merged], into), clone=0, lam=0.5)
                others.append(tg.function_change(model, other, data, loss)["max_abs_change"])
    return {
        "picked": [chosen.merged, chosen.into], "abs_corr": chosen.correlation,
        "max_abs_change": chosen.max_abs_change, "loss_before": chosen.loss_before, "loss_after": chosen.loss_after,
        "other_pairs_max_abs_change_min": min(others), "other_pairs_max_abs_change_median": float(np.median(others)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", help="directory with train-images-idx3-ubyte[.gz]")
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.repeats = 512, 1
    results = {
        "parametric_residual_100": parametric(args.repeats),
        "empirical_paper_cnn": empirical(args.mnist, args.samples),
        "reorganisation": reorganisation(),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

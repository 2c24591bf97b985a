"""Figure 1 (right): the gradient norm right after opening grows as t^2, adds up over filters, and the loss stays.

The paper's CNN is trained to convergence by full-batch gradient descent
(float64) on ``--samples`` training images; then the 1 to 4 steepest
filters are opened with lambda_t for t on a log grid, and the full-batch
squared gradient norm and loss are measured. By docs/MATH.md section 4 the
squared norm after opening is the one at t = 0 (lambda = 1/2) plus
2 t^2 sigma^2 per tunnel: the script fits the slope of log(increase) on
log(t) for every filter count (2 expected), compares k filters with the sum
of their single-filter increases, and checks that the loss does not change.
Writes fig1_right.csv, fig1_right.json, fig1_right.png and
fig1_right_loss.png into --out.

    python examples/fig1_right.py --mnist path/to/mnist --seeds 3 --out results
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import tunnelgraph as tg
from tunnelgraph.experiments.escape import load_task
from tunnelgraph.experiments.report import band_plot, write_csv
from tunnelgraph.models import paper_cnn
from tunnelgraph.statistics.lambdas import lambda_t, rank_sites


def loss_and_squared_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Full-batch loss and squared norm of the gradient over every parameter."""
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return float(loss.detach()), float(sum((g * g).sum() for g in grads))


def converge(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> tuple[float, float]:
    """Full-batch gradient descent; returns the final loss and gradient norm."""
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= lr * g
    loss, g2 = loss_and_squared_gradient(model, x, y)
    return loss, math.sqrt(g2)


def fit_slope(ts: list[float], values: list[float]) -> float:
    """Least-squares slope of log(values) on log(ts)."""
    lx = [math.log(t) for t in ts]
    ly = [math.log(v) for v in values]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="initialisations (default 3)")
    parser.add_argument("--steps", type=int, default=2000, help="full-batch gradient descent steps (default 2000)")
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--filters", type=int, default=4, help="open 1 .. this many filters (default 4)")
    parser.add_argument("--points", type=int, default=13, help="values of t on the grid 1e-2 .. 1e1")
    parser.add_argument("--out", default="results")
    parser.add_argument("--mnist", metavar="DIR", help="MNIST IDX files in DIR (default: the embedded teacher task)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    task = load_task(args.mnist, train_samples=args.samples)
    x, y = task.subset(args.samples)
    x = x.double()
    ts = [10 ** (-2 + 3 * i / (args.points - 1)) for i in range(args.points)]
    rows, checks = [], []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = paper_cnn().double()
        final_loss, final_grad = converge(model, x, y, args.steps, args.lr)
        logging.info("seed %d: full-batch GD ended at loss %.5f, gradient norm %.3g", seed, final_loss, final_grad)
        stats = tg.a_statistics(model, tg.find_sites(model, x[:1]), [(x, y)], F.cross_entropy, method="exact",
                                progress=False)
        top = rank_sites(stats)[: args.filters]
        base_loss, _ = loss_and_squared_gradient(model, x, y)
        configurations = {f"top{k}": top[:k] for k in range(1, len(top) + 1)}
        configurations.update({f"single{i}": [entry] for i, entry in enumerate(top)})
        increase: dict[str, list[float]] = {}
        worst_loss_change = 0.0
        for label, chosen in configurations.items():
            values = []
            for t in [0.0, *ts]:
                opened = model
                for entry in chosen:
                    opened = tg.rewrite(opened, entry.name, lambda_t(entry, t), example_inputs=x[:1])
                loss, g2 = loss_and_squared_gradient(opened, x, y)
                change = abs(loss - base_loss) / base_loss
                worst_loss_change = max(worst_loss_change, change)
                values.append(g2)
                rows.append({"seed": seed, "opened": label, "filters": len(chosen), "t": t, "squared_grad_norm": g2,
                             "loss": loss, "loss_before": base_loss, "rel_loss_change": change})
            increase[label] = [v - values[0] for v in values[1:]]
        for k in range(1, len(top) + 1):
            summed = [sum(increase[f"single{i}"][j] for i in range(k)) for j in range(len(ts))]
            additivity = max(abs(a - b) / b for a, b in zip(increase[f"top{k}"], summed))
            predicted = [2 * t * t * sum(e.sigma ** 2 for e in top[:k]) for t in ts]
            formula = max(abs(a - b) / b for a, b in zip(increase[f"top{k}"], predicted))
            checks.append({"seed": seed, "filters": k, "slope": fit_slope(ts, increase[f"top{k}"]),
                           "additivity_rel_error": additivity, "vs_2t2sigma2_rel_error": formula,
                           "max_rel_loss_change": worst_loss_change, "gd_final_loss": final_loss,
                           "gd_final_grad_norm": final_grad})
    out = Path(args.out)
    write_csv(out / "fig1_right.csv", rows)
    (out / "fig1_right.json").write_text(json.dumps(checks, indent=1))
    curves = {}
    for k in range(1, args.filters + 1):
        runs = []
        for seed in range(args.seeds):
            base = next(r["squared_grad_norm"] for r in rows if r["seed"] == seed and r["opened"] == f"top{k}"
                        and r["t"] == 0.0)
            runs.append([r["squared_grad_norm"] - base for r in rows
                         if r["seed"] == seed and r["opened"] == f"top{k}" and r["t"] > 0])
        curves[f"{k} filter{'s' if k > 1 else ''}"] = (ts, runs)
    band_plot(out / "fig1_right.png", curves, title="Figure 1 right: gradient norm after opening",
              xlabel="t", ylabel="increase of the squared gradient norm", logx=True, logy=True)
    loss_curves = {
        f"{k} filter{'s' if k > 1 else ''}": (ts, [[r["rel_loss_change"] + 1e-18 for r in rows if r["seed"] == s
                                                     and r["opened"] == f"top{k}" and r["t"] > 0]
                                                    for s in range(args.seeds)])
        for k in range(1, args.filters + 1)
    }
    band_plot(out / "fig1_right_loss.png", loss_curves, title="Figure 1 right: loss change after opening",
              xlabel="t", ylabel="|loss after - loss before| / loss (+1e-18)", logx=True, logy=True)
    for check in checks:
        print(f"seed {check['seed']} filters {check['filters']}: slope {check['slope']:.4f}, additivity "
              f"{check['additivity_rel_error']:.2e}, vs 2t^2 sigma^2 {check['vs_2t2sigma2_rel_error']:.2e}, "
              f"max loss change {check['max_rel_loss_change']:.2e}")


if __name__ == "__main__":
    main()

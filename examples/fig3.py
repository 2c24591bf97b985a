"""Figure 3: symmetry breaking. How fast a filter and its clone drift apart, for four choices of lambda.

From the Newton flat area of Figure 1, the steepest filter u is cloned
into u' with lambda_t, with a random lambda of the same radius, with a
constant lambda = c * 1 (c = --constant), and with lambda = 1/2 * 1; then
SGD (lr 1.0, batch 256, the same minibatches) trains on and
||K_u - K_u'||^2 (the squared distance between the two filters' inbound
weights and biases) is recorded every step. With lambda = 1/2 the two get
equal gradients forever: the symmetry is never broken. Writes fig3.csv,
fig3.png and fig3_summary.md into --out.

    python examples/fig3.py --mnist path/to/mnist --seeds 3 --steps 300 --out results
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import tunnelgraph as tg
from tunnelgraph.experiments.compare import add_common_arguments, flat_start_from_arguments, task_from_arguments
from tunnelgraph.experiments.report import band_plot, markdown_table, mean_std, write_csv
from tunnelgraph.statistics.lambdas import lambda_t, random_lambda, rank_sites


def distance(model: nn.Module, u: int, clone: int) -> float:
    """||K_u - K_u'||^2 over the conv weights and biases of the two filters."""
    conv = model.conv
    weight = conv.weight.detach()
    value = float(((weight[u] - weight[clone]) ** 2).sum())
    if conv.bias is not None:
        value += float((conv.bias[u] - conv.bias[clone]) ** 2)
    return value


def plot(path: Path, curves: dict[str, tuple[list[int], list[list[float]]]], site: str) -> None:
    """The distances on a log axis; curves that stay exactly 0 are named in the title instead."""
    zero = [label for label, (_, runs) in curves.items() if all(v == 0 for run in runs for v in run)]
    drawn = {label: value for label, value in curves.items() if label not in zero}
    note = f"\nlambda = {', '.join(zero)}: exactly 0 at every step (not drawn)" if zero else ""
    band_plot(path, drawn, title=f"Figure 3: symmetry breaking of {site} and its clone{note}",
              ylabel="||K_u - K_u'||^2", logy=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, steps=300, seeds=3)
    parser.add_argument("--t", type=float, default=100.0, help="radius of lambda_t and of the random lambda")
    parser.add_argument("--constant", type=float, default=0.75, help="c of the constant lambda (default 0.75)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    task = task_from_arguments(args)
    start, _ = flat_start_from_arguments(args, task)
    images, labels = task.train_images, task.train_labels
    statistics = [(images[i * 256:(i + 1) * 256], labels[i * 256:(i + 1) * 256]) for i in range(4)]
    stats = tg.a_statistics(start, tg.find_sites(start, images[:1]), statistics, F.cross_entropy, progress=False)
    best = rank_sites(stats)[0]
    u = best.site.channel
    rows = []
    curves: dict[str, tuple[list[int], list[list[float]]]] = {}
    for seed in range(args.seeds):
        choices = {
            "lambda_t": lambda_t(best, args.t),
            "random": random_lambda(best.site, args.t, generator=torch.Generator().manual_seed(seed)),
            f"constant {args.constant:g}": torch.full((best.site.outbound_size,), args.constant, dtype=torch.float64),
            "1/2": torch.full((best.site.outbound_size,), 0.5, dtype=torch.float64),
        }
        for label, lam in choices.items():
            model = tg.rewrite(copy.deepcopy(start), best.name, lam, example_inputs=images[:1])
            clone = model.conv.weight.shape[0] - 1
            optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
            batches = torch.Generator().manual_seed(seed)
            values = [distance(model, u, clone)]
            for _ in range(args.steps):
                index = torch.randint(0, len(images), (256,), generator=batches)
                loss = F.cross_entropy(model(images[index]), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                values.append(distance(model, u, clone))
            rows += [{"seed": seed, "lambda": label, "step": s, "distance": v} for s, v in enumerate(values)]
            curves.setdefault(label, (list(range(args.steps + 1)), []))[1].append(values)
    out = Path(args.out)
    write_csv(out / "fig3.csv", rows)
    plot(out / "fig3.png", curves, best.name)
    checkpoints = [s for s in (1, 10, 100, args.steps) if s <= args.steps]
    summary = []
    for label, (_, runs) in curves.items():
        row: dict[str, object] = {"lambda": label}
        for s in checkpoints:
            row[f"mean@{s}"], row[f"std@{s}"] = mean_std([run[s] for run in runs])
        summary.append(row)
    (out / "fig3_summary.md").write_text(markdown_table(summary) + "\n")
    print(markdown_table(summary))


if __name__ == "__main__":
    main()

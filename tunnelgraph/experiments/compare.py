"""Comparisons of escape methods over seeds, and the command-line options the example scripts share."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn

from tunnelgraph.experiments.escape import RunConfig, RunResult, Task, load_task, newton_start, run
from tunnelgraph.experiments.report import band_plot, curve_rows, markdown_table, summary_rows, write_csv
from tunnelgraph.models import paper_cnn

logger = logging.getLogger(__name__)


def compare(
    methods: Sequence[str], *, start: nn.Module, task: Task, config: RunConfig, seeds: Sequence[int], out: str | Path,
    name: str, title: str, level: float = 1.0, at_steps: Sequence[int] = (50, 100, 300, 1000), progress: bool = True,
) -> list[RunResult]:
    """Run every method for every seed from ``start``; write ``<name>_curves.csv``, ``<name>_summary.csv``/``.md``,
    ``<name>_events.json`` and ``<name>.png`` (mean and one standard deviation over seeds) into ``out``."""
    out = Path(out)
    results = []
    for seed in seeds:
        for method in methods:
            results.append(run(method, start, task, config, seed=seed, progress=progress))
    write_csv(out / f"{name}_curves.csv", curve_rows(results))
    summary = summary_rows(results, at_steps, level)
    write_csv(out / f"{name}_summary.csv", summary)
    (out / f"{name}_summary.md").write_text(markdown_table(summary) + "\n")
    events = {f"{r.method}/{r.seed}": r.events for r in results}
    (out / f"{name}_events.json").write_text(json.dumps(events, indent=1))
    curves = {method: (results[0].steps, [r.losses for r in results if r.method == method]) for method in methods}
    marks = []
    if config.open_at is not None:
        marks.append((float(config.open_at), "open"))
        if config.close_at is not None and any(m.endswith("tunnel") for m in methods):
            marks.append((float(config.close_at), "close"))
    band_plot(out / f"{name}.png", curves, title=title, marks=marks)
    return results


def add_common_arguments(parser: argparse.ArgumentParser, *, steps: int, seeds: int) -> None:
    """``--seeds --steps --out --mnist`` and the Newton start's options."""
    parser.add_argument("--seeds", type=int, default=seeds, help=f"runs per method (default {seeds})")
    parser.add_argument("--steps", type=int, default=steps, help=f"training steps per run (default {steps})")
    parser.add_argument("--out", default="results", help="folder for the CSV, JSON and PNG files")
    parser.add_argument("--mnist", metavar="DIR", help="MNIST IDX files in DIR (default: the embedded teacher task)")
    parser.add_argument("--train-samples", type=int, help="use only this many training images")
    parser.add_argument("--newton-samples", type=int, default=2000,
                        help="training images of the Newton phase (default 2000)")
    parser.add_argument("--newton-steps", type=int, default=20, help="Newton steps (the paper: 20)")
    parser.add_argument("--newton-iterations", type=int, default=50, help="MINRES iterations per Newton step")
    parser.add_argument("--no-progress", action="store_true")


def flat_start_from_arguments(
    args: argparse.Namespace, task: Task, *, seed: int = 0
) -> tuple[nn.Module, dict[str, Any]]:
    """The paper CNN (initialised with ``seed``) walked into a flat area by Newton's method, cached in ``--out``."""
    import torch

    torch.manual_seed(seed)
    model = paper_cnn()
    cache = Path(args.out) / (
        f"flat_{task.name}_seed{seed}_n{args.newton_samples}_s{args.newton_steps}_i{args.newton_iterations}.pt"
    )
    flat = newton_start(model, task, samples=args.newton_samples, steps=args.newton_steps,
                        iterations=args.newton_iterations, cache=cache, progress=not args.no_progress)
    model.load_state_dict(flat.state)
    info = {"losses": flat.losses, "grad_norms": flat.grad_norms, "seconds": flat.seconds, "samples": flat.samples}
    logger.info("flat start: loss %.4f, gradient norm %.3g (Newton %.0f s)", flat.losses[-1], flat.grad_norms[-1],
                flat.seconds)
    return model, info


def task_from_arguments(args: argparse.Namespace) -> Task:
    """The task the common options name."""
    return load_task(args.mnist, train_samples=args.train_samples)

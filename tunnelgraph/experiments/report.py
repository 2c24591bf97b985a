"""Tables and plots of experiment runs: CSV files, mean and one standard deviation over seeds, PNG bands.

Plots need matplotlib (``pip install "tunnelgraph[plots]"``); without it
:func:`band_plot` logs a warning and writes nothing, and the CSV files
still hold every number.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tunnelgraph.experiments.escape import RunResult

logger = logging.getLogger(__name__)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; NaN for no values."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (dicts with the same keys) to ``path``; returns the path."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path


def curve_rows(results: Iterable[RunResult]) -> list[dict[str, Any]]:
    """One row per method, seed and measured step: the long format of every curve."""
    return [
        {"method": r.method, "seed": r.seed, "step": step, "loss": loss}
        for r in results
        for step, loss in zip(r.steps, r.losses)
    ]


def summary_rows(
    results: Sequence[RunResult], at_steps: Sequence[int], level: float
) -> list[dict[str, Any]]:
    """Per method: loss at ``at_steps`` (mean, std), the step that first reaches ``level``, accuracy, time."""
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        row: dict[str, Any] = {"method": method, "seeds": len(runs)}
        for step in at_steps:
            if step <= min(r.steps[-1] for r in runs):
                row[f"loss@{step}"], row[f"std@{step}"] = mean_std([r.loss_at(step) for r in runs])
        reached = [r.first_below(level) for r in runs]
        hits = [s for s in reached if s is not None]
        row["reached"] = f"{len(hits)}/{len(runs)}"
        row[f"first<={level:g}"], row["first_std"] = mean_std([float(s) for s in hits])
        row["test_acc"], row["test_acc_std"] = mean_std([r.test_accuracy for r in runs])
        row["seconds"] = mean_std([r.seconds for r in runs])[0]
        row["method_seconds"] = mean_std([r.method_seconds for r in runs])[0]
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], digits: int = 4) -> str:
    """``rows`` as a Markdown table (floats rounded to ``digits`` significant digits)."""
    if not rows:
        return ""
    keys = list(rows[0])

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.{digits}g}"
        return str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(key, "")) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


def band_plot(
    path: str | Path,
    curves: Mapping[str, tuple[Sequence[float], Sequence[Sequence[float]]]],
    *,
    title: str,
    xlabel: str = "step",
    ylabel: str = "training loss",
    logx: bool = False,
    logy: bool = False,
    marks: Sequence[tuple[float, str]] = (),
) -> Path | None:
    """A PNG of each curve's mean over seeds with a one-standard-deviation band.

    Args:
        curves: label -> (x values, one sequence of y values per seed).
        marks: vertical lines ``(x, label)`` (e.g. when tunnels open).

    Returns:
        The path written, or None without matplotlib. With ``logy`` the
        lower edge of a band is cut at 1% of the mean.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'tunnelgraph[plots]'): %s not drawn", path)
        return None
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, runs) in curves.items():
        columns = list(zip(*runs))
        stats = [mean_std(list(column)) for column in columns]
        means = [m for m, _ in stats]
        lows = [m - s for m, s in stats]
        if logy:  # a band that reaches zero cannot be drawn on a log axis: cut it at 1% of the mean
            lows = [max(low, m / 100) for low, m in zip(lows, means)]
        highs = [m + s for m, s in stats]
        line = axes.plot(list(xs)[: len(means)], means, label=f"{label} (n={len(runs)})")[0]
        axes.fill_between(list(xs)[: len(means)], lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
    for x, label in marks:
        axes.axvline(x, color="grey", linestyle=":", linewidth=1)
        axes.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=8, rotation=90,
                      va="top", ha="right", color="grey")
    if logx:
        axes.set_xscale("log")
    if logy:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

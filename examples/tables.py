"""Tables 3 and 4: the wall-clock overhead of the methods and the final test accuracies.

Reads the ``*_summary.csv`` files that fig1_left.py, fig2_left.py and
fig2_right.py wrote into --out and writes tables.md there:

- Table 3: per experiment and method, the mean wall-clock time of a run,
  the time the method's own actions took (statistics, rewrites, checks,
  optimizer surgery; perturbations for the baselines) and their ratio;
- Table 4: per experiment and method, the final test accuracy (mean and
  standard deviation over seeds).

    python examples/tables.py --out results
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

EXPERIMENTS = ("fig1_left", "fig2_left", "fig2_right")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results", help="the folder the experiments wrote into")
    args = parser.parse_args(argv)
    out = Path(args.out)
    overhead = ["| experiment | method | seeds | run (s) | method's actions (s) | overhead |", "|---|---|---|---|---|---|"]
    accuracy = ["| experiment | method | seeds | test accuracy | std |", "|---|---|---|---|---|"]
    found = []
    for name in EXPERIMENTS:
        path = out / f"{name}_summary.csv"
        if not path.is_file():
            continue
        found.append(name)
        with path.open() as handle:
            for row in csv.DictReader(handle):
                seconds, actions = float(row["seconds"]), float(row["method_seconds"])
                overhead.append(f"| {name} | {row['method']} | {row['seeds']} | {seconds:.2f} | {actions:.3f} | "
                                f"{100 * actions / seconds:.2f}% |")
                accuracy.append(f"| {name} | {row['method']} | {row['seeds']} | {float(row['test_acc']):.4f} | "
                                f"{float(row['test_acc_std']):.4f} |")
    if not found:
        raise SystemExit(f"no *_summary.csv of {', '.join(EXPERIMENTS)} in {out}: run the experiments first")
    text = "\n".join(["## Table 3: overhead of the methods", "", *overhead, "",
                      "## Table 4: final test accuracy", "", *accuracy, ""])
    (out / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

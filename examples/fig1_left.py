"""Figure 1 (left): escaping a flat area with tunnels on the paper's one-conv-layer CNN.

From a flat area reached by Newton's method, SGD (lr 1.0, batch 256) runs
for ``--steps`` steps with the same minibatches three ways: control (no
tunnel), proposed (open the 2 steepest tunnels with lambda_t at step 50,
close them at step 300) and a random tunnel of the same radius. Writes
fig1_left_curves.csv, fig1_left_summary.csv/.md, fig1_left_events.json and
fig1_left.png (mean and one standard deviation over seeds) into --out.

    python examples/fig1_left.py --mnist path/to/mnist --seeds 10 --steps 1000 --out results
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tunnelgraph.experiments.compare import add_common_arguments, compare, flat_start_from_arguments, task_from_arguments
from tunnelgraph.experiments.escape import RunConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, steps=1000, seeds=10)
    parser.add_argument("--t", type=float, default=100.0, help="radius of lambda (default 100, from grid.py)")
    parser.add_argument("--open-at", type=int, default=50)
    parser.add_argument("--close-at", type=int, default=300)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    task = task_from_arguments(args)
    start, flat = flat_start_from_arguments(args, task)
    config = RunConfig(steps=args.steps, t=args.t, open_at=args.open_at, close_at=args.close_at)
    compare(["control", "tunnel", "random_tunnel"], start=start, task=task, config=config,
            seeds=range(args.seeds), out=args.out, name="fig1_left",
            title=f"Figure 1 left: paper CNN on {task.name}, SGD lr 1.0 from a Newton flat area",
            progress=not args.no_progress)
    Path(args.out, "fig1_left_flat.json").write_text(json.dumps(flat, indent=1))
    print(Path(args.out, "fig1_left_summary.md").read_text())


if __name__ == "__main__":
    main()

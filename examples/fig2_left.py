"""Figure 2 (left): weight reorganisation against perturbed GD, NEON, noisy SGD and a random reorganisation.

From the same Newton flat area as Figure 1, SGD (lr 1.0, batch 256) runs
with the same minibatches: control; reorganisation of the 2 steepest
filters at step 50 (merge the most nearly redundant pair, clone into the
freed slot with lambda_t: every shape kept); a random reorganisation of the
same radius; perturbed gradient descent (Jin et al. 2017); NEON (Xu and
Yang 2017); and noisy SGD. Writes fig2_left_* files into --out.

    python examples/fig2_left.py --mnist path/to/mnist --seeds 10 --steps 1000 --out results
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tunnelgraph.experiments.compare import add_common_arguments, compare, flat_start_from_arguments, task_from_arguments
from tunnelgraph.experiments.escape import RunConfig

METHODS = ["control", "reorganize", "random_reorganize", "pgd", "neon", "noisy_sgd"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, steps=1000, seeds=10)
    parser.add_argument("--t", type=float, default=10.0, help="radius of lambda (default 10, from grid.py)")
    parser.add_argument("--open-at", type=int, default=50)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all)")
    parser.add_argument("--pgd-radius", type=float, default=1.0, help="perturbed GD's radius (default 1, grid.py)")
    parser.add_argument("--pgd-threshold", type=float, default=0.5, help="perturbed GD's and NEON's gradient gate")
    parser.add_argument("--neon-step", type=float, default=10.0, help="NEON's step (default 10, grid.py)")
    parser.add_argument("--noise-std", type=float, default=0.03, help="noisy SGD's std (default 0.03, grid.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    task = task_from_arguments(args)
    start, _ = flat_start_from_arguments(args, task)
    config = RunConfig(steps=args.steps, t=args.t, open_at=args.open_at, close_at=None, pgd_radius=args.pgd_radius,
                       pgd_threshold=args.pgd_threshold, neon_step=args.neon_step, noise_std=args.noise_std)
    compare(args.methods.split(","), start=start, task=task, config=config, seeds=range(args.seeds), out=args.out,
            name="fig2_left", title=f"Figure 2 left: reorganisation and escape baselines ({task.name})",
            progress=not args.no_progress)
    print(Path(args.out, "fig2_left_summary.md").read_text())


if __name__ == "__main__":
    main()

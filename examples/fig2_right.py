"""Figure 2 (right): tunnels in the paper's 5-layer CNN trained with Adam.

The paper trains five 3x3 convolutions of 64 filters (batch norm and 2x2
max pooling on the first three) on ImageNet 64x64 with Adam (lr 2e-5) and,
at step 5000, opens one filter in each of the last two conv layers; then
Adam's buffers are cleared and the learning rate is divided by 10 for 20
steps, in the control run too. ImageNet cannot be downloaded here, so by
default this runs at reduced length on the embedded teacher task (or on
MNIST with --mnist DIR); --images DIR takes any folder of class
sub-folders of images (needs pillow), resized to --image-size, so the
same script runs at full scale elsewhere. Writes fig2_right_* files into --out.

    python examples/fig2_right.py --mnist path/to/mnist --seeds 3 --steps 1500 --open-at 750 --out results
    python examples/fig2_right.py --images /data/imagenet64/train --image-size 64 --steps 20000 --open-at 5000
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tunnelgraph as tg
from tunnelgraph.datasets import image_folder
from tunnelgraph.experiments.escape import RunResult, Task, evaluate, load_task
from tunnelgraph.experiments.report import band_plot, curve_rows, markdown_table, summary_rows, write_csv
from tunnelgraph.models import paper_deep_cnn
from tunnelgraph.train import TunnelController, update_optimizer


def load(args: argparse.Namespace) -> Task:
    if args.images is not None:
        data = image_folder(args.images, size=args.image_size)
        order = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))
        test, train = order[: len(order) // 10], order[len(order) // 10:]
        return Task("images", data.images[train], data.labels[train], data.images[test], data.labels[test])
    return load_task(args.mnist, train_samples=args.train_samples)


def train(method: str, task: Task, args: argparse.Namespace, seed: int) -> RunResult:
    torch.manual_seed(seed)
    channels, size = task.train_images.shape[1], task.train_images.shape[-1]
    classes = int(max(task.train_labels.max(), task.test_labels.max())) + 1
    model = paper_deep_cnn(width=args.width, in_channels=channels, image_size=size, classes=classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    images, labels = task.train_images, task.train_labels
    statistics = [(images[i * args.batch:(i + 1) * args.batch], labels[i * args.batch:(i + 1) * args.batch])
                  for i in range(2)]
    controller = None
    if method == "tunnel":
        last_two = {"features.12", "features.14"}
        sites = [s for s in tg.find_sites(model, images[:2]) if s.group.name in last_two]
        controller = TunnelController(model, optimizer, F.cross_entropy, statistics, k=2, one_per_group=True,
                                      sites=sites, t=args.t, open_at=[args.open_at], surgery="adam_recipe")
    batches = torch.Generator().manual_seed(seed)
    eval_x, eval_y = task.subset(args.eval_samples)
    steps, losses, batch_losses, events = [], [], [], []
    method_seconds = 0.0
    started = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            steps.append(step)
            losses.append(evaluate(model, eval_x, eval_y)[0])
            model.train()
        if step == args.steps:
            break
        index = torch.randint(0, len(images), (args.batch,), generator=batches)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        batch_losses.append(float(loss.detach()))
        acted = time.perf_counter()
        if controller is not None:
            events += [e.to_dict() for e in controller.step(loss)]
        elif step + 1 == args.open_at:
            update_optimizer(optimizer, model, [], mode="adam_recipe")  # the control does the same recipe
            events.append({"step": step + 1, "action": "adam_recipe"})
        method_seconds += time.perf_counter() - acted
    seconds = time.perf_counter() - started
    model.eval()
    accuracy = evaluate(model, task.test_images, task.test_labels)[1]
    logging.info("%s seed %d: loss %.4f -> %.4f, test accuracy %.4f, %.0f s", method, seed, losses[0], losses[-1],
                 accuracy, seconds)
    return RunResult(method, seed, steps, losses, batch_losses, events, seconds, method_seconds, accuracy)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--open-at", type=int, default=750, help="the step at which tunnels open (paper: 5000)")
    parser.add_argument("--out", default="results")
    parser.add_argument("--mnist", metavar="DIR", help="MNIST IDX files in DIR")
    parser.add_argument("--images", metavar="DIR", help="a folder of class sub-folders of images (needs pillow)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-samples", type=int)
    parser.add_argument("--width", type=int, default=64, help="filters per conv layer (paper: 64)")
    parser.add_argument("--batch", type=int, default=64, help="minibatch (default 64)")
    parser.add_argument("--lr", type=float, default=2e-5, help="Adam learning rate (paper: 2e-5)")
    parser.add_argument("--t", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-samples", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    task = load(args)
    results = [train(method, task, args, seed) for seed in range(args.seeds) for method in ("control", "tunnel")]
    out = Path(args.out)
    write_csv(out / "fig2_right_curves.csv", curve_rows(results))
    at = [s for s in (args.open_at, args.open_at + 100, args.steps) if s <= args.steps]
    summary = summary_rows(results, at, level=1.0)
    write_csv(out / "fig2_right_summary.csv", summary)
    (out / "fig2_right_summary.md").write_text(markdown_table(summary) + "\n")
    curves = {m: (results[0].steps, [r.losses for r in results if r.method == m]) for m in ("control", "tunnel")}
    band_plot(out / "fig2_right.png", curves, title=f"Figure 2 right: 5-layer CNN, Adam ({task.name})",
              marks=[(float(args.open_at), "open + Adam recipe")])
    print(markdown_table(summary))


if __name__ == "__main__":
    main()

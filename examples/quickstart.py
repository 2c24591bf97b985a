"""tunnelgraph in one page: analyse the paper's MNIST network, open the steepest tunnel, close it.

Steps, on ``paper_cnn()`` (8 filters of 5x5, sigmoid, linear softmax layer):

1. print the analysis report (every channel group, legal or not, and why);
2. measure the A matrix of every filter over the data (``tg.a_statistics``)
   and rank the filters by its top singular value;
3. open the steepest tunnel: clone the best filter into a new ninth filter,
   splitting its outbound weights by ``lambda_t = 1/2 + t * lambda*``;
4. check that the network computes the same function (``tg.verify``);
5. check the identity of docs/MATH.md section 4: the squared gradient norm of the filter and its
   clone is ``||A 1||^2 / 2 + 2 t^2 sigma_max(A)^2``, against a random
   lambda of the same radius;
6. close the tunnel (merge the clone back into the filter) and compare the
   parameters with the original's.

By default the data is embedded and nothing is downloaded: 64 random images
of MNIST's shape labelled by a random teacher network
(``tunnelgraph.datasets.teacher_task``). ``--mnist DIR`` uses the first 512
MNIST training images and labels from the IDX files in DIR instead
(``tunnelgraph.datasets.mnist``: ``train-images-idx3-ubyte`` and
``train-labels-idx1-ubyte``, optionally gzipped; the training set's pixel
means subtracted, as in the paper). Usage::

    python examples/quickstart.py [--mnist DIR] [--t 1.0]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import tunnelgraph as tg
from tunnelgraph import datasets
from tunnelgraph.models import paper_cnn

def load_data(mnist: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Images, labels and a line saying where they came from (``tunnelgraph.datasets``)."""
    if mnist is None:
        task = datasets.teacher_task(64, seed=1)
        return task.images, task.labels, f"embedded {task.source}"
    train = datasets.mnist(mnist, limit=512)
    return train.images, train.labels, train.source


def pair_gradient_norm(
    model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, channel: int, clone: int
) -> float:
    """Squared norm of the loss gradient for the inbound weights (and biases) of two filters."""
    model.zero_grad()
    F.cross_entropy(model(x), labels).backward()
    weight, bias = model.conv.weight.grad, model.conv.bias.grad
    return float(sum(weight[c].pow(2).sum() + bias[c] ** 2 for c in (channel, clone)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mnist", metavar="DIR",
        help="read MNIST's training IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]) "
        "from DIR instead of the embedded teacher task",
    )
    parser.add_argument("--t", type=float, default=1.0, help="radius of lambda_t (default 1.0)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = paper_cnn().eval()
    x, labels, source = load_data(args.mnist)
    print(f"data: {source}\n")

    # 1. Which channels can be cloned, and why the others cannot.
    report = tg.analyze(model, x)
    print(report.to_markdown())

    # 2. A-statistics of every filter over the data, in four batches; rank by sigma_max(A).
    batches = [(x[i:i + len(x) // 4], labels[i:i + len(x) // 4]) for i in range(0, len(x), len(x) // 4)]
    stats = tg.a_statistics(model, report.sites, batches, F.cross_entropy, progress=False)
    ranked = tg.rank_sites(stats)
    print("sites by sigma_max(A): " + ", ".join(f"{s.name} {s.sigma:.3g}" for s in ranked))
    best = ranked[0]
    site = best.site

    # 3. Open the steepest tunnel with lambda_t (one entry per outbound weight).
    lam = tg.lambda_t(best, args.t)
    rewritten = tg.rewrite(model, site, lam)
    c, clone = site.channel, rewritten.conv.out_channels - 1
    print(f"opened a tunnel at {site.name} ({best.method} A, K = {site.inbound_size} inbound, "
          f"L = {site.outbound_size} outbound weights); conv now has {rewritten.conv.out_channels} "
          f"filters, fc reads {rewritten.fc.in_features} features")

    # 4. Same function.
    print(f"verify: {tg.verify(model, rewritten, x)}")

    # 5. The gradient identity, and a random tunnel of the same radius for comparison.
    measured = pair_gradient_norm(rewritten, x, labels, c, clone)
    predicted = float(best.gradient.norm() ** 2 / 2 + 2 * args.t**2 * best.sigma**2)
    control = tg.rewrite(model, site, tg.random_lambda(site, args.t, torch.Generator().manual_seed(3)))
    print(f"gradient norm^2 of the pair: {measured:.6g} measured, {predicted:.6g} predicted by "
          f"||A 1||^2/2 + 2 t^2 sigma^2 (relative difference {abs(measured - predicted) / predicted:.2g}); "
          f"a random lambda of the same radius gives {pair_gradient_norm(control, x, labels, c, clone):.6g}")

    # 6. Close the tunnel: merge the clone back into the filter it came from.
    clone_site = next(s for s in tg.find_sites(rewritten, x) if s.name == f"conv[{clone}]")
    merged = tg.merge(rewritten, clone_site, into=c)
    original, restored = model.state_dict(), merged.state_dict()
    difference = max((original[name] - restored[name]).abs().max().item() for name in original)
    print(f"merged {clone_site.name} into conv[{c}]: conv has {merged.conv.out_channels} filters again; "
          f"max parameter difference to the original {difference:.3g}")
    print(f"verify merged: {tg.verify(model, merged, x)}")


if __name__ == "__main__":
    main()

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

By default the batch is embedded (random tensors of MNIST's shape, nothing
is downloaded). ``--mnist DIR`` reads the first 512 training images from
the MNIST IDX file in DIR (``train-images-idx3-ubyte``, optionally gzipped)
instead. Usage::

    python examples/quickstart.py [--mnist DIR] [--t 1.0]
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tunnelgraph as tg
from tunnelgraph.models import paper_cnn

IDX_NAME = "train-images-idx3-ubyte"


def read_idx_images(directory: str | Path, count: int) -> np.ndarray:
    """The first ``count`` images of an IDX3 ubyte file as a ``(count, rows, cols)`` uint8 array.

    IDX: a big-endian header of two zero bytes, a type byte (0x08 for
    unsigned bytes), a dimension count (3), one int32 per dimension, then the
    data in row-major order.
    """
    directory = Path(directory)
    for path, opener in ((directory / IDX_NAME, open), (directory / f"{IDX_NAME}.gz", gzip.open)):
        if path.exists():
            break
    else:
        raise FileNotFoundError(f"no {IDX_NAME} or {IDX_NAME}.gz in {directory}")
    with opener(path, "rb") as handle:
        zero, dtype, ndim = struct.unpack(">HBB", handle.read(4))
        if zero != 0 or dtype != 0x08 or ndim != 3:
            raise ValueError(
                f"{path} is not an IDX file of unsigned-byte images (type {dtype:#x}, {ndim} dims)"
            )
        total, rows, cols = struct.unpack(">3I", handle.read(12))
        count = min(count, total)
        data = handle.read(count * rows * cols)
    if len(data) != count * rows * cols:
        raise ValueError(f"{path} is truncated")
    return np.frombuffer(data, dtype=np.uint8).reshape(count, rows, cols)


def load_batch(mnist: str | None) -> tuple[torch.Tensor, str]:
    if mnist is None:
        generator = torch.Generator().manual_seed(1)
        return torch.randn(64, 1, 28, 28, generator=generator), "embedded random batch (64, 1, 28, 28)"
    images = read_idx_images(mnist, 512).astype(np.float32) / 255.0
    images -= images.mean(axis=0, keepdims=True)  # the paper subtracts pixel means
    return torch.from_numpy(images).unsqueeze(1), f"first {len(images)} MNIST training images from {mnist}"


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
        "--mnist", metavar="DIR", help=f"read {IDX_NAME}[.gz] from DIR instead of the embedded batch"
    )
    parser.add_argument("--t", type=float, default=1.0, help="radius of lambda_t (default 1.0)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = paper_cnn().eval()
    x, source = load_batch(args.mnist)
    labels = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(2))
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

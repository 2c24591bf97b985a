"""tunnelgraph in one page: analyse the paper's MNIST network, open a tunnel, close it again.

Steps, on ``paper_cnn()`` (8 filters of 5x5, sigmoid, linear softmax layer):

1. print the analysis report (every channel group, legal or not, and why);
2. open a tunnel: clone filter ``--channel`` of ``conv`` into a new ninth
   filter, splitting its outbound weights by a random lambda vector;
3. check that the network computes the same function (``tg.verify``);
4. check the gradient invariant: the inbound-weight gradients of the filter
   and its clone add up to the filter's gradient in the original network;
5. close the tunnel (merge the clone back into the filter) and compare the
   parameters with the original's.

By default the batch is embedded (random tensors of MNIST's shape, nothing
is downloaded). ``--mnist DIR`` reads the first 512 training images from
the MNIST IDX file in DIR (``train-images-idx3-ubyte``, optionally gzipped)
instead. Usage::

    python examples/quickstart.py [--mnist DIR] [--channel 3]
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


def inbound_gradients(
    model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the cross-entropy loss with respect to ``conv``'s weight and bias."""
    model.zero_grad()
    F.cross_entropy(model(x), labels).backward()
    return model.conv.weight.grad.clone(), model.conv.bias.grad.clone()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mnist", metavar="DIR", help=f"read {IDX_NAME}[.gz] from DIR instead of the embedded batch"
    )
    parser.add_argument("--channel", type=int, default=3, help="the filter to clone (default 3)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = paper_cnn().eval()
    x, source = load_batch(args.mnist)
    labels = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(2))
    print(f"data: {source}\n")

    # 1. Which channels can be cloned, and why the others cannot.
    report = tg.analyze(model, x)
    print(report.to_markdown())

    # 2. Open a tunnel at one filter with a random lambda vector (one entry per outbound weight).
    site = report.site(f"conv[{args.channel}]")
    lam = np.random.default_rng(0).uniform(0.0, 1.0, size=site.outbound_size)
    rewritten = tg.rewrite(model, site, lam)
    print(f"opened a tunnel at {site.name}: K = {site.inbound_size} inbound, L = {site.outbound_size} "
          f"outbound weights; conv now has {rewritten.conv.out_channels} filters, fc reads "
          f"{rewritten.fc.in_features} features")

    # 3. Same function.
    print(f"verify: {tg.verify(model, rewritten, x)}")

    # 4. Gradient invariant: d/dK_u + d/dK_u' (after) == d/dK_u (before).
    clone = rewritten.conv.out_channels - 1
    weight, bias = inbound_gradients(model, x, labels)
    new_weight, new_bias = inbound_gradients(rewritten, x, labels)
    c = site.channel
    weight_diff = (new_weight[c] + new_weight[clone] - weight[c]).abs().max().item()
    bias_diff = (new_bias[c] + new_bias[clone] - bias[c]).abs().max().item()
    print(f"gradient invariant: max |g(conv[{c}]) + g(conv[{clone}]) - g_original(conv[{c}])| = "
          f"{weight_diff:.3g} (weights), {bias_diff:.3g} (bias); the gradient itself is up to "
          f"{weight[c].abs().max().item():.3g}")

    # 5. Close the tunnel: merge the clone back into the filter it came from.
    clone_site = next(s for s in tg.find_sites(rewritten, x) if s.name == f"conv[{clone}]")
    merged = tg.merge(rewritten, clone_site, into=c)
    original, restored = model.state_dict(), merged.state_dict()
    difference = max((original[name] - restored[name]).abs().max().item() for name in original)
    print(f"merged {clone_site.name} into conv[{c}]: conv has {merged.conv.out_channels} filters again; "
          f"max parameter difference to the original {difference:.3g}")
    print(f"verify merged: {tg.verify(model, merged, x)}")


if __name__ == "__main__":
    main()

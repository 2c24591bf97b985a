"""Where ``tg.a_statistics`` waits for a CUDA device: every synchronising call, counted by the line that made it.

Runs ``resnet18_like`` (every site, ``through=`` everything) on the GPU
once to warm up, then once more under ``torch.cuda.set_sync_debug_mode``
("warn"), which makes each operation that waits for the device warn; the
warnings are counted by their place in tunnelgraph's code and split into
the pass over the data and the Lanczos solves. The solve loops are meant
to wait once per Lanczos step (its alpha and beta, read to the host) and
once per set of running channels (their indices), not once per product.

Usage::

    python benchmarks/cuda_syncs.py [--batches 3] [--batch 8] [--size 64]
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import bench_network  # noqa: E402

import tunnelgraph as tg  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("torch sees no CUDA device here")
    bench_network.DEVICE = torch.device("cuda")
    torch.manual_seed(0)
    model = bench_network.ResNet18Like().cuda().eval()
    data = bench_network._data(args)
    sites = [site for site in tg.find_sites(model, data[0][0], through=tg.THROUGH_OPTIONS)
             if not site.group.self_consumers and not site.group.unmeasured]
    graph = tg.trace(model, data[0][0])
    stats = tg.a_statistics(model, sites, data, F.cross_entropy, progress=False, graph=graph)
    steps = max(entry.steps for entry in stats.values())
    places: collections.Counter[str] = collections.Counter()
    phases: collections.Counter[str] = collections.Counter()
    original = warnings.showwarning

    def record(message: Warning | str, category: type[Warning], filename: str, lineno: int, *rest: object) -> None:
        stack = [frame for frame in traceback.extract_stack() if "tunnelgraph" in frame.filename]
        where = f"{Path(stack[-1].filename).name}:{stack[-1].lineno} ({stack[-1].name})" if stack else "outside"
        places[where] += 1
        phases["solves" if any(frame.name == "lanczos_gram_top" for frame in stack) else "the rest"] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # type: ignore[assignment]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            tg.a_statistics(model, sites, data, F.cross_entropy, progress=False, graph=graph)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = original
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: resnet18_like, {len(sites)} sites, "
          f"Lanczos steps <= {steps}")
    print(f"synchronising calls: {sum(places.values())} in all; inside the Lanczos solves {phases['solves']}, "
          f"elsewhere {phases['the rest']}")
    for where, count in places.most_common(25):
        print(f"{count:6d}  {where}")


if __name__ == "__main__":
    main()

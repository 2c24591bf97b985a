"""ONNX path timings, measured in a process that never imports torch.

A generated ``residual_net(blocks, width)`` (default 100 blocks of width 16,
input (2, 3, 16, 16)) is exported once with ``tg.export_onnx``; then a fresh
Python process, which imports tunnelgraph and onnx but not torch, times:

- ``tg.analyze(path, through=("batchnorm", "pooling"))``: reading the file,
  the IR, channel groups, sites and the parametric reducibility pass
  (target <= 2 s); and, separately, ``tg.load_onnx`` and the analysis of
  the loaded graph;
- ``tg.rewrite(path, site, 0.5)`` of one block-internal site, reading the
  file and writing nothing (target <= 1 s);

and confirms that ``torch`` is not in ``sys.modules`` afterwards. Times are
the best of ``--repeats``. Usage::

    python benchmarks/bench_onnx.py [--blocks 100] [--width 16] [--model PATH.onnx]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import tunnelgraph as tg

path, repeats, blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
through = ("batchnorm", "pooling")

def best(function):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result

load_time, graph = best(lambda: tg.load_onnx(path))
analyze_time, report = best(lambda: tg.analyze(graph, through=through))
both_time, full = best(lambda: tg.analyze(path, through=through))  # reads the file, with reducibility
site = next(s for s in report.sites if s.group_name == f"blocks.{blocks // 2}.conv1")
rewrite_time, rewritten = best(lambda: tg.rewrite(path, site.name, 0.5, through=through))
print(json.dumps({
    "nodes": len(graph), "groups": len(report.groups), "sites": len(report.sites),
    "load_s": load_time, "analyze_graph_s": analyze_time, "load_plus_analyze_s": both_time,
    "reducible_units": len(full.reducibility),
    "rewrite_site": site.name, "rewrite_s": rewrite_time,
    "torch_imported": "torch" in sys.modules,
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=100)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="an existing residual_net ONNX file to time instead of exporting one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(args.model) if args.model else Path(folder) / "residual.onnx"
        if not args.model:
            import torch

            import tunnelgraph as tg
            from tunnelgraph.models import residual_net

            torch.manual_seed(0)
            tg.export_onnx(residual_net(args.blocks, args.width).eval(), torch.randn(2, 3, 16, 16), path)
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(args.repeats), str(args.blocks)],
            capture_output=True, text=True, check=True,
        )
    results = json.loads(out.stdout.strip().splitlines()[-1])
    results["model"] = f"residual_net(blocks={args.blocks}, width={args.width})"
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

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
the best of ``--repeats``.

``--memory GIB`` measures memory instead: a generated chain of MatMul + Add
layers (width ``--memory-width``, as many layers as make ``GIB`` GiB of
float32 weights) is written with external data, and a fresh process
records its peak resident memory (VmHWM, reset between stages) while it
reads the file, finds the sites, rewrites one site into a copy, rewrites
two sites in place, verifies the file against the in-place result in
onnxruntime and saves it: each stage's peak, and its excess over the
memory held before it, in GiB and in model sizes. ``--lower-limit`` lowers
the 2 GiB protobuf limit to 1 KiB in that process, so that a small model
takes the paths of a model over 2 GiB. Usage::

    python benchmarks/bench_onnx.py [--blocks 100] [--width 16] [--model PATH.onnx]
    python benchmarks/bench_onnx.py --memory 2.2 [--memory-width 8192] [--lower-limit]
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


MEMORY_CHILD = r"""
import gc, json, sys, time
import numpy as np
import tunnelgraph as tg
from tunnelgraph.backends import onnx as onnx_backend
from tunnelgraph.frontends import onnx as onnx_frontend
from tunnelgraph.frontends.onnx import read_onnx

path, lowered = sys.argv[1], sys.argv[2] == "1"
if lowered:
    onnx_backend.SERIALISABLE = onnx_frontend.PROTOBUF_LIMIT = 1024

def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) / 2**20 for line in lines if line.startswith(key + ":"))

stages = []
def stage(name, function):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    held, started = status("VmRSS"), time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    stages.append({"stage": name, "held_gib": held, "peak_gib": status("VmHWM"), "seconds": seconds})
    return result

import torch  # tg.verify's comparison; imported before the baseline
baseline = status("VmRSS")
model = stage("read the file", lambda: read_onnx(path)[0])
size = onnx_backend.tensor_bytes(model) / 2**30
sites = stage("find_sites", lambda: tg.find_sites(model))
middle = len(sites) // 2
copy = stage("rewrite into a copy", lambda: tg.rewrite(model, sites[middle], 0.3))
del copy
stage("rewrite in place", lambda: tg.rewrite(model, sites[middle], 0.3, inplace=True))
stage("rewrite in place again", lambda: tg.rewrite(model, tg.find_sites(model)[1], 0.3, inplace=True))
x = np.random.default_rng(0).standard_normal((1, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value))
report = stage("verify (file vs in-place result)", lambda: tg.verify(path, model, torch.from_numpy(x).float()))
stage("save", lambda: onnx_backend.save_onnx(model, path[:-5] + "_saved.onnx"))
print(json.dumps({"model_gib": size, "baseline_gib": baseline, "lowered": lowered, "max_rel": report.max_rel,
                  "stages": stages}))
"""


def memory(gib: float, width: int, lowered: bool) -> dict[str, object]:
    """The peak resident memory of each stage (see the module docstring) on a generated model of ``gib`` GiB."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from tunnelgraph.backends.onnx import save_onnx

    layers = max(2, round(gib * 2**30 / (4 * width * width)))
    generator = np.random.default_rng(0)
    nodes, tensors, previous = [], [], "x"
    for index in range(layers):
        weight = (generator.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
        tensors += [numpy_helper.from_array(weight, f"w{index}"),
                    numpy_helper.from_array(generator.standard_normal(width).astype(np.float32), f"b{index}")]
        del weight
        nodes += [helper.make_node("MatMul", [previous, f"w{index}"], [f"m{index}"]),
                  helper.make_node("Add", [f"m{index}", f"b{index}"], [f"a{index}"])]
        previous = f"a{index}"
        if index < layers - 1:
            nodes.append(helper.make_node("Tanh", [previous], [f"t{index}"]))
            previous = f"t{index}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(previous, onnx.TensorProto.FLOAT, [1, width])], tensors)
    del tensors
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    del graph
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "chain.onnx"
        if lowered:
            from tunnelgraph.backends import onnx as onnx_backend

            onnx_backend.SERIALISABLE = 1024  # written with external data, as a model over 2 GiB is
        save_onnx(proto, path)
        del proto
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path), "1" if lowered else "0"],
                             capture_output=True, text=True, check=True)
    results: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    results["model"] = f"{layers} MatMul + Add layers of {width}x{width}"
    size = float(results["model_gib"])  # type: ignore[arg-type]
    for entry in results["stages"]:  # type: ignore[attr-defined]
        entry["excess_gib"] = entry["peak_gib"] - entry["held_gib"]
        entry["excess_models"] = entry["excess_gib"] / size
        entry["peak_models"] = (entry["peak_gib"] - float(results["baseline_gib"])) / size  # type: ignore[arg-type]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=100)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="an existing residual_net ONNX file to time instead of exporting one")
    parser.add_argument("--memory", type=float, help="measure peak memory on a generated model of this many GiB")
    parser.add_argument("--memory-width", type=int, default=8192, help="its layers' width (default 8192)")
    parser.add_argument("--lower-limit", action="store_true", help="take the paths of a model over 2 GiB")
    args = parser.parse_args()
    if args.memory:
        found = memory(args.memory, args.memory_width, args.lower_limit)
        print(f"{found['model']}: {found['model_gib']:.2f} GiB of weights, process baseline "
              f"{found['baseline_gib']:.2f} GiB, max rel {found['max_rel']:.1e}")
        print(f"{'stage':34s} {'held':>6s} {'peak':>6s} {'excess':>6s}  excess/model  (peak-baseline)/model  s")
        for entry in found["stages"]:  # type: ignore[attr-defined]
            print(f"{entry['stage']:34s} {entry['held_gib']:6.2f} {entry['peak_gib']:6.2f} {entry['excess_gib']:6.2f}"
                  f"  {entry['excess_models']:12.2f}  {entry['peak_models']:20.2f}  {entry['seconds']:.1f}")
        return
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

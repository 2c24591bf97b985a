"""Core timings of tunnelgraph on a deep residual network.

Measures, in one run and on one model (``residual_net(blocks, width)`` on an
input of shape ``(2, 3, 16, 16)``, with ``through=("batchnorm", "pooling")``
so that the residual stream and every block's first convolution are sites):

- ``tg.trace(model, x)``, ``tg.find_sites(graph)`` on the traced graph, and
  their sum;
- ``tg.rewrite(model, site, 0.5)`` on one block-internal site
  (``blocks.<blocks // 2>.conv1[0]``) against ``copy.deepcopy(model)``, which
  every non-inplace rewrite pays for, and their ratio (target: at most 3x);
  the two are timed alternately;
- the same on the residual-stream site (``stem.0[0]``), whose group couples
  the stem and every block's second convolution;
- ``tg.verify`` of each rewrite against the original model.

Each time is taken ``--repeats`` times with ``time.perf_counter``; the table
shows the best and the median. Usage::

    python benchmarks/bench_core.py [--blocks 100] [--width 16] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import statistics
import sys
import time
from typing import Any, Callable

import torch

import tunnelgraph as tg
from tunnelgraph.models import residual_net

THROUGH = ("batchnorm", "pooling")
RATIO_TARGET = 3.0


def measure(function: Callable[[], Any], repeats: int) -> tuple[dict[str, float], Any]:
    """Run ``function`` ``repeats`` times; best and median seconds, and the last result."""
    times = []
    result = None
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return {"best_s": min(times), "median_s": statistics.median(times)}, result


def measure_pair(
    first: Callable[[], Any], second: Callable[[], Any], repeats: int
) -> tuple[dict[str, float], dict[str, float], Any]:
    """As :func:`measure` for two functions, alternating them so that machine noise hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    result = None
    for _ in range(repeats):
        for function, store in ((first, times[0]), (second, times[1])):
            gc.collect()
            start = time.perf_counter()
            result = function()
            store.append(time.perf_counter() - start)
    stats = tuple({"best_s": min(t), "median_s": statistics.median(t)} for t in times)
    return stats[0], stats[1], result


def pick_site(sites: list[tg.Site], name: str) -> tg.Site:
    for site in sites:
        if site.name == name:
            return site
    return sites[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=100, help="residual blocks (default 100)")
    parser.add_argument("--width", type=int, default=16, help="channels per block (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per figure (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument(
        "--log-level", default="off", help="tunnelgraph logging: off (default), DEBUG, INFO, ..."
    )
    args = parser.parse_args(argv)

    if args.log_level.lower() == "off":
        logging.disable(logging.CRITICAL)
    else:
        logging.basicConfig(level=args.log_level.upper())

    torch.manual_seed(args.seed)
    model = residual_net(blocks=args.blocks, width=args.width).eval()
    x = torch.randn(2, 3, 16, 16)
    parameters = sum(p.numel() for p in model.parameters())

    trace_t, graph = measure(lambda: tg.trace(model, x), args.repeats)
    find_t, sites = measure(lambda: tg.find_sites(graph, through=THROUGH), args.repeats)
    report = tg.analyze(graph, through=THROUGH)
    groups = len(report.groups)
    legal = sum(group.legal for group in report.groups)
    total = {key: trace_t[key] + find_t[key] for key in trace_t}

    figures: dict[str, Any] = {
        "model": f"residual_net(blocks={args.blocks}, width={args.width})",
        "input": list(x.shape),
        "parameters": parameters,
        "through": list(THROUGH),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "graph_nodes": len(graph),
        "groups": groups,
        "legal_groups": legal,
        "sites": len(sites),
        "trace": trace_t,
        "find_sites": find_t,
        "trace_plus_find_sites": total,
        "rewrites": [],
    }

    legal_sites = [site for site in sites if site.channel == 0]
    block_name = f"blocks.{args.blocks // 2}.conv1[0]"
    block_site = pick_site([s for s in legal_sites if s.group_name != "stem.0"] or legal_sites, block_name)
    stream_site = pick_site(legal_sites, "stem.0[0]")
    for label, site in (("block site", block_site), ("stream site", stream_site)):
        copy_t, rewrite_t, rewritten = measure_pair(
            lambda: copy.deepcopy(model), lambda: tg.rewrite(model, site, 0.5), args.repeats
        )
        check = tg.verify(model, rewritten, x)
        figures["rewrites"].append({
            "label": label,
            "site": site.name,
            "producers": len(site.producers),
            "consumers": len(site.consumers),
            "parameters_touched": len(site.group.slices),  # tensors, batch-norm buffers included
            "deepcopy": copy_t,
            "rewrite": rewrite_t,
            "ratio_best": rewrite_t["best_s"] / copy_t["best_s"],
            "ratio_median": rewrite_t["median_s"] / copy_t["median_s"],
            "ratio_target": RATIO_TARGET,
            "verify": str(check),
            "verify_passed": check.passed,
        })

    print_table(figures)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=2)
        print(f"\nfigures written to {args.json}")
    return 0 if all(r["verify_passed"] for r in figures["rewrites"]) else 1


def print_table(figures: dict[str, Any]) -> None:
    def ms(entry: dict[str, float]) -> str:
        return f"{entry['best_s'] * 1e3:10.2f} {entry['median_s'] * 1e3:10.2f}"

    print(f"model:  {figures['model']}, input {tuple(figures['input'])}, "
          f"{figures['parameters']:,} parameters, {figures['graph_nodes']} graph nodes")
    print(f"torch {figures['torch']}; through={tuple(figures['through'])}; "
          f"best and median of {figures['repeats']} runs")
    print(f"groups: {figures['groups']}, legal: {figures['legal_groups']}, sites: {figures['sites']}")
    print()
    print(f"{'step':<44} {'best ms':>10} {'median ms':>10}")
    print("-" * 66)
    print(f"{'tg.trace(model, x)':<44} {ms(figures['trace'])}")
    print(f"{'tg.find_sites(graph)':<44} {ms(figures['find_sites'])}")
    print(f"{'trace + find_sites':<44} {ms(figures['trace_plus_find_sites'])}")
    for entry in figures["rewrites"]:
        print(f"{'copy.deepcopy(model)':<44} {ms(entry['deepcopy'])}")
        print(f"{'tg.rewrite(model, ' + repr(entry['site']) + ', 0.5)':<44} {ms(entry['rewrite'])}")
    print()
    print(f"{'rewrite':<22} {'layers':>6} {'tensors':>7} {'ratio best':>11} "
          f"{'ratio median':>13} {'target':>7}")
    print("-" * 66)
    for entry in figures["rewrites"]:
        verdict = "ok" if entry["ratio_median"] <= entry["ratio_target"] else "OVER"
        layers = entry["producers"] + entry["consumers"]
        target = f"<= {entry['ratio_target']:g}x"
        print(f"{entry['site']:<22} {layers:>6} {entry['parameters_touched']:>7} "
              f"{entry['ratio_best']:>10.2f}x {entry['ratio_median']:>12.2f}x {target:>7} {verdict}")
    print()
    for entry in figures["rewrites"]:
        print(f"verify {entry['site']}: {entry['verify']}")


if __name__ == "__main__":
    sys.exit(main())

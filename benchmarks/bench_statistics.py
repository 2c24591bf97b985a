"""Costs of the A-statistics engine, each as a ratio measured in one run.

1. The paper's CNN (``paper_cnn``: 8 filters 5x5, sigmoid, linear; 28x28
   inputs, ``--samples`` samples in batches of 256): ``tg.a_statistics`` of
   all 8 sites (exact path) over one plain forward-backward pass over the
   same data (target <= 1.5), beside the ratio that counting multiply-adds
   predicts.
2. The exact path's arithmetic rate: its floating-point operations per
   second over those of ``torch.bmm`` on the same operand shapes (target
   >= 0.5), and the dense-matmul peak of the machine for context. Also the
   bound on item 1: the same pass with the contraction left out (the
   capture pass), the contraction's FLOPs at ``torch.bmm``'s rate, their
   sum over the plain pass (``ratio_bound``), the contraction's own rate
   against ``torch.bmm``, and, on the CPU, every figure in process CPU time
   (``cpu_time_*``: on a shared machine, less sensitive to other jobs).
3. A 64-to-64 3x3 conv, ReLU, 64-to-64 3x3 conv on 16x16 maps
   (``--conv-samples`` samples): top singular triplets of all 64 sites by the
   matrix-free path over one forward-backward pass (target <= 5), with the
   Lanczos steps used and the accuracy reached; the exact path's ratio is
   measured on a ``--exact-samples`` subset and scaled to the full set (its
   cost is linear in the samples), and the accuracy is taken against it on
   that subset.
4. The engine against the naive oracle (one rewrite and one autograd pass
   over the data per column of A) on the paper's CNN: the oracle's time per
   column is measured on ``--oracle-columns`` columns and multiplied by the
   8 x 5760 columns (target: engine >= 100x faster).
5. Peak resident memory of a fresh process running item 1's statistics at
   ``--samples`` and at twice as many samples, batches generated on the fly
   (target: ratio <= 1.2); also how much the peak grew during the pass.

With a CUDA device, items 1 and 3 also run there (absolute times, GPU named).
Times are the best of ``--repeats``; item 1's and 2's four timings are taken in rounds
that run each once in turn, so that their ratios do not measure the machine's drift. Usage::

    python benchmarks/bench_statistics.py [--samples 10000] [--conv-samples 2000] [--quick]
        [--paper-cnn-only] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

import tunnelgraph as tg
import tunnelgraph.statistics.engine as tg_engine
from tunnelgraph.models import paper_cnn
from tunnelgraph.testing import naive_a_matrix

BATCH = 256


CPU_TIMES: dict[str, float] = {}
"""Least process CPU time of the runs timed under a name: on a shared machine, less sensitive than
wall time to the other processes' load (with one thread, it is the time this process ran)."""


def best_time(
    function: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None, name: str | None = None
) -> tuple[float, Any]:
    times, cpu, result = [], [], None
    for _ in range(repeats):
        gc.collect()
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = function()
        sync()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    if name:
        CPU_TIMES[name] = min(cpu)
    CPU_LAST["cpu"] = min(cpu)
    return min(times), result


CPU_LAST: dict[str, float] = {}
"""The least process CPU time of the last :func:`best_time` call."""


def interleaved(
    functions: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None] = lambda: None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Least wall time of each function over ``repeats`` rounds that call each once, in turn.

    On a machine whose speed drifts, a ratio of two figures timed in
    separate blocks of repeats measures the drift as much as the code; in
    rounds, both see the same minutes. The least process CPU times go to
    :data:`CPU_TIMES` under the same names. Returns (times, last results).
    """
    times = {name: float("inf") for name in functions}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, function in functions.items():
            elapsed, results[name] = best_time(function, 1, sync)
            cpu = CPU_LAST["cpu"]
            times[name] = min(times[name], elapsed)
            CPU_TIMES[name] = min(CPU_TIMES.get(name, float("inf")), cpu)
    return times, results


def batches(samples: int, shape: tuple[int, ...], classes: int | None, device: str, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    data = []
    for start in range(0, samples, BATCH):
        size = min(BATCH, samples - start)
        x = torch.randn((size, *shape), generator=generator)
        y = torch.randint(0, classes, (size,), generator=generator) if classes else None
        data.append((x.to(device), y.to(device) if y is not None else None))
    return data


def plain_pass(model: nn.Module, data: list, loss_fn: Callable) -> None:
    for x, y in data:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()


# -- 1, 2, 4: the paper's CNN -----------------------------------------------------------
def paper_cnn_macs(filters: int = 8, side: int = 24, kernel: int = 25, classes: int = 10) -> dict[str, float]:
    """Multiply-adds per sample: a plain training pass, the statistics pass, and A's contraction."""
    conv = filters * kernel * side * side
    fc = filters * side * side * classes
    plain = 2 * conv + 3 * fc  # conv forward + weight grad; fc forward + input and weight grads
    rows = kernel + 1
    contraction = rows * filters * classes * side * side
    # forward, then back to the errors at the fc's output only (its weight gradient is what the pass differentiates
    # for: the conv's weight gradient and the fc's input gradient are not needed for the exact path's A)
    statistics_pass = conv + 2 * fc
    return {"plain": plain, "statistics_pass": statistics_pass, "contraction": contraction}


def bench_paper_cnn(samples: int, repeats: int, device: str, oracle_columns: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = paper_cnn().to(device)
    data = batches(samples, (1, 28, 28), 10, device)
    loss_fn = nn.CrossEntropyLoss()
    sites = tg.find_sites(model, data[0][0][:2])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    plain_pass(model, data[:2], loss_fn)
    real_add_exact_a = tg_engine.add_exact_a

    def capture_only() -> None:
        """The same pass with the contraction left out: the capture pass (forward, backward, hooks) and the rest."""
        tg_engine.add_exact_a = lambda sums, capture, budget, *, training, scale=1.0: None
        try:
            tg.a_statistics(model, sites, data, loss_fn, method="exact", progress=False)
        finally:
            tg_engine.add_exact_a = real_add_exact_a

    # item 2's reference: torch.bmm on the contraction's shapes, as many chunks as the data makes
    positions, rows, width = 24 * 24, 26, 8 * 10
    left = torch.randn(positions, rows, BATCH, device=device)
    right = torch.randn(positions, BATCH, width, device=device)
    chunks = -(-samples // BATCH)
    times, results = interleaved({
        "plain": lambda: plain_pass(model, data, loss_fn),
        "engine": lambda: tg.a_statistics(model, sites, data, loss_fn, method="exact", progress=False),
        "capture": capture_only,
        "bmm": lambda: [torch.bmm(left, right) for _ in range(chunks)],
    }, repeats, sync)
    plain, engine, capture_time, bmm_time = times["plain"], times["engine"], times["capture"], times["bmm"]
    stats = results["engine"]
    macs = paper_cnn_macs()
    predicted = (macs["statistics_pass"] + macs["contraction"]) / macs["plain"]
    result: dict[str, Any] = {
        "device": device,
        "samples": samples,
        "sites": len(sites),
        "plain_s": plain,
        "statistics_s": engine,
        "ratio": engine / plain,
        "ratio_predicted_by_macs": predicted,
        "capture_pass_s": capture_time,
        "contraction_s": max(engine - capture_time, 0.0),
        "methods": sorted({s.method for s in stats.values()}),
    }

    # 2. arithmetic rate of the whole statistics pass against torch.bmm on the contraction's shapes
    flops = 2 * samples * (macs["statistics_pass"] + macs["contraction"])
    bmm_rate = 2 * positions * rows * BATCH * width * chunks / bmm_time
    square = torch.randn(2048, 2048, device=device)
    peak_time, _ = best_time(lambda: square @ square, repeats, sync)
    contraction_flops = 2 * samples * macs["contraction"]
    result.update(
        engine_gflops=flops / engine / 1e9,
        bmm_same_shapes_gflops=bmm_rate / 1e9,
        efficiency=(flops / engine) / bmm_rate,
        dense_matmul_gflops=2 * 2048**3 / peak_time / 1e9,
        # the bound: the capture pass as measured, plus the contraction's FLOPs at torch.bmm's rate
        contraction_gflop=contraction_flops / 1e9,
        contraction_at_bmm_rate_s=contraction_flops / bmm_rate,
        contraction_efficiency=(contraction_flops / max(engine - capture_time, 1e-9)) / bmm_rate,
        ratio_bound=(capture_time + contraction_flops / bmm_rate) / plain,
        ratio_bound_without_capture=contraction_flops / bmm_rate / plain,
    )
    if device == "cpu":  # the same, in process CPU time
        cpu = CPU_TIMES
        bmm_cpu_rate = bmm_rate * bmm_time / cpu["bmm"]
        result.update(
            cpu_time_ratio=cpu["engine"] / cpu["plain"],
            cpu_time_efficiency=(flops / cpu["engine"]) / bmm_cpu_rate,
            cpu_time_contraction_efficiency=(
                contraction_flops / max(cpu["engine"] - cpu["capture"], 1e-9) / bmm_cpu_rate
            ),
            cpu_time_ratio_bound=(cpu["capture"] + contraction_flops / bmm_cpu_rate) / cpu["plain"],
            cpu_time_ratio_bound_without_capture=contraction_flops / bmm_cpu_rate / cpu["plain"],
        )

    # 4. the naive oracle, on the first columns of the first site (CPU only: it is slow anywhere)
    if device == "cpu" and oracle_columns:
        site = sites[0]
        column_time, column = best_time(
            lambda: naive_a_matrix(model, site, data, loss_fn, columns=range(oracle_columns)), 1
        )
        exact = stats[site.name].a[:, :oracle_columns]
        per_column = column_time / oracle_columns
        total_columns = len(sites) * site.outbound_size
        result.update(
            oracle_columns_measured=oracle_columns,
            oracle_s_per_column=per_column,
            oracle_s_extrapolated=per_column * total_columns,
            engine_speedup_over_oracle=per_column * total_columns / engine,
            oracle_agreement=float((column - exact).norm() / exact.norm()),
        )
    return result


# -- 3: 64-to-64 conv layers --------------------------------------------------------------
def conv_pair() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)
    )


def bench_matrix_free(samples: int, exact_samples: int, repeats: int, device: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = conv_pair().to(device)
    generator = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(size, 64, 16, 16, generator=generator).to(device),
         torch.randn(size, 64, 16, 16, generator=generator).to(device))
        for size in [min(BATCH, samples - s) for s in range(0, samples, BATCH)]
    ]
    loss_fn = nn.MSELoss()
    sites = tg.find_sites(model, data[0][0][:2])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    plain_pass(model, data[:1], loss_fn)
    plain, _ = best_time(lambda: plain_pass(model, data, loss_fn), repeats, sync)
    free_time, free = best_time(
        lambda: tg.a_statistics(model, sites, data, loss_fn, method="matrix_free", progress=False),
        min(repeats, 3), sync,
    )
    result: dict[str, Any] = {
        "device": device,
        "samples": samples,
        "sites": len(sites),
        "plain_s": plain,
        "matrix_free_s": free_time,
        "ratio": free_time / plain,
        "lanczos_steps": max(s.steps for s in free.values()),
        "max_relative_residual": max(s.residual for s in free.values()),
    }
    # accuracy and the exact path's cost, on a subset
    subset = []
    left = exact_samples
    for x, y in data:
        if left <= 0:
            break
        subset.append((x[:left], y[:left]))
        left -= x.shape[0]
    used = sum(x.shape[0] for x, _ in subset)
    exact_time, exact = best_time(
        lambda: tg.a_statistics(model, sites, subset, loss_fn, method="exact", progress=False), 1, sync
    )
    free_subset = tg.a_statistics(model, sites, subset, loss_fn, method="matrix_free", progress=False)
    sigma_error = max(
        abs(free_subset[s.name].sigma - exact[s.name].sigma) / exact[s.name].sigma
        for s in sites if exact[s.name].sigma > 0
    )
    cosine = min(
        abs(float(free_subset[s.name].direction @ exact[s.name].direction)) for s in sites if exact[s.name].sigma > 0
    )
    result.update(
        exact_samples=used,
        exact_s_on_subset=exact_time,
        exact_ratio_scaled=exact_time * samples / used / plain,
        subset_sigma_max_relative_error=sigma_error,
        subset_min_abs_cosine=cosine,
    )
    return result


# -- 5: peak memory ----------------------------------------------------------------------
def memory_child(samples: int) -> None:
    """Run in a subprocess: statistics of the paper's CNN over batches made on the fly; print peak RSS."""
    torch.manual_seed(0)
    model = paper_cnn()
    loss_fn = nn.CrossEntropyLoss()

    def stream() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        for start in range(0, samples, BATCH):
            size = min(BATCH, samples - start)
            yield torch.randn(size, 1, 28, 28, generator=generator), torch.randint(0, 10, (size,), generator=generator)

    sites = tg.find_sites(model, torch.randn(2, 1, 28, 28))
    before = _peak_kib(reset=True)
    tg.a_statistics(model, sites, stream(), loss_fn, method="exact", progress=False)
    after = _peak_kib()
    print(json.dumps({"samples": samples, "peak_kib": after, "before_kib": before}))


def _peak_kib(reset: bool = False) -> int:
    """The process's peak resident set (VmHWM; ru_maxrss would carry the parent's over exec)."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # restart the high-water mark from the current resident set
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_memory(samples: int) -> dict[str, Any]:
    peaks = []
    for count in (samples, 2 * samples):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(count)], capture_output=True, text=True, check=True
        )
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "samples": [p["samples"] for p in peaks],
        "peak_mib": [p["peak_kib"] / 1024 for p in peaks],
        "growth_during_pass_mib": [(p["peak_kib"] - p["before_kib"]) / 1024 for p in peaks],
        "ratio": peaks[1]["peak_kib"] / peaks[0]["peak_kib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--conv-samples", type=int, default=2000)
    parser.add_argument("--exact-samples", type=int, default=64)
    parser.add_argument("--oracle-columns", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--paper-cnn-only", action="store_true", help="items 1, 2 and 4 only")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if args.quick:
        args.samples, args.conv_samples, args.exact_samples, args.oracle_columns, args.repeats = 512, 256, 16, 1, 1
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
    for device in devices:
        results[f"paper_cnn_{device}"] = bench_paper_cnn(args.samples, args.repeats, device, args.oracle_columns)
        if not args.paper_cnn_only:
            results[f"matrix_free_{device}"] = bench_matrix_free(
                args.conv_samples, args.exact_samples, args.repeats, device
            )
    if not args.paper_cnn_only:
        results["memory"] = bench_memory(args.samples)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

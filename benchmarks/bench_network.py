"""Costs on networks of the size users train: statistics for every site, analysis, memory.

Two networks written here in plain PyTorch (no torchvision needed):

- ``resnet18_like``: torchvision's ResNet-18 layout (7x7 stem, max pool,
  four stages of two basic blocks, 64-128-256-512 channels, 1x1 projection
  shortcuts, global pool, linear head). With ``through=`` everything it has
  12 channel groups and 2,880 sites, as torchvision's ``resnet18``.
- ``convnext_like``: a ConvNeXt-atto layout (patchify stem, 2-2-6-2 blocks
  of 40-80-160-320 channels: depthwise 7x7, layer norm, linear 4x, GELU,
  linear, layer scale, residual add).

Printed in one run, each the best of ``--repeats`` (and item 1 also round by round, each call over a pass run
just before it, with the median of those ratios):

1. ``tg.a_statistics`` over every site of ``resnet18_like`` (``through=``
   everything, ``--batches`` batches of ``--batch`` images of ``--size``)
   over one plain forward-backward pass over the same batches (issue
   target: at most 8x), with the Lanczos steps used and the worst
   residual; ``--reference FILE`` stores the top sites and lambda* the
   first time and compares them (|cos|) on later runs.
2. ``tg.analyze`` (groups and reducibility) over ``tg.find_sites`` on both
   networks (target: at most 2x; convnext-like under 3 s).
3. Peak resident memory growth of the matrix-free pass, with and without
   ``store=``, against that of the forward-backward pass (targets 3x and
   1.5x), each the median of three fresh processes (the peak RSS over the
   RSS before the call, so allocator caches of earlier work do not hide
   it). With ``--large-batch N`` (default 64; 0 leaves it out) the same
   three figures again over ``--large-batches`` batches of N images: where
   a batch's activations, not the returned statistics, decide the pass's
   peak, and the stored captures grow with the data while ``store=False``
   holds one batch at a time.
4. torchvision's ``resnet18`` for items 1 and 2, where torchvision is
   installed.
5. With ``--floor``: the time in convolution and matrix-product kernels
   (:data:`ARITHMETIC`) of one ``a_statistics`` call against that of one
   forward-backward pass, under torch's profiler (the products'
   arithmetic), and the rest of the call; the same kernels against all of
   the pass's kernels (item 1's floor for this arithmetic: the ratio no
   restructuring of the rest can go below) and how far above it the call
   is.
6. With ``--device cuda``: the same on the GPU, timed by CUDA events, with
   the GPU named; memory is the CUDA caching allocator's peak over each
   call's start (in this process), against the forward-backward pass's.

Usage::

    python benchmarks/bench_network.py [--batches 3] [--batch 8] [--size 64] [--reference out.json] [--floor]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import tunnelgraph as tg

THROUGH = tg.THROUGH_OPTIONS
SMALL_BUDGET = 64 * 2**20
"""A ``memory_budget`` below the default (128 MiB): smaller Lanczos chunks, more products."""


class _Basic(nn.Module):
    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inputs, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            if stride != 1 or inputs != width else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18Like(nn.Module):
    """ResNet-18's layout: 12 channel groups and 2,880 sites with through= everything."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inputs = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_Basic(inputs, width, stride), _Basic(width, width, 1)))
            inputs = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """ConvNeXt-atto's layout (depths 2-2-6-2, dims 40-80-160-320)."""

    def __init__(self, classes: int = 10, depths: tuple[int, ...] = (2, 2, 6, 2),
                 dims: tuple[int, ...] = (40, 80, 160, 320)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4)]
        for index, (depth, dim) in enumerate(zip(depths, dims)):
            if index:
                layers.append(nn.Conv2d(dims[index - 1], dim, 2, 2))
            layers.extend(_ConvNeXtBlock(dim) for _ in range(depth))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


DEVICE = torch.device("cpu")
"""Where the networks and data live (``--device``)."""


def best(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(best seconds, last result) of ``repeats`` calls; on CUDA timed by CUDA events around each call."""
    times, result = [], None
    for _ in range(repeats):
        if DEVICE.type == "cuda":
            start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start_event.record()
            result = function()
            end_event.record()
            end_event.synchronize()
            times.append(start_event.elapsed_time(end_event) / 1e3)
            continue
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def cuda_peak(function: Callable[[], Any]) -> tuple[int, Any]:
    """(peak CUDA memory allocated during one call, over what was allocated before it, in bytes; its result)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = function()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, result


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe(kind: str, args: argparse.Namespace) -> None:
    """In a fresh process: build the network and data, then print how far one call raised the peak RSS.

    The peak is reset first: after ``exec`` a process keeps the peak RSS of
    the parent it was forked from, which would hide the call's own.
    """
    torch.manual_seed(0)
    model = ResNet18Like().eval()
    data = _data(args)
    sites = [site for site in tg.find_sites(model, data[0][0], through=THROUGH) if not site.group.self_consumers]
    calls: dict[str, Callable[[], Any]] = {
        "fb": lambda: forward_backward(model, data),
        "stored": lambda: tg.a_statistics(model, sites, data, F.cross_entropy, progress=False, method="matrix_free"),
        "streamed": lambda: tg.a_statistics(model, sites, data, F.cross_entropy, progress=False,
                                            method="matrix_free", store=False),
        "stored_small": lambda: tg.a_statistics(model, sites, data, F.cross_entropy, progress=False,
                                                method="matrix_free", memory_budget=SMALL_BUDGET),
    }
    _reset_peak()
    base = _rss()
    start = time.perf_counter()
    result = calls[kind]()
    seconds = time.perf_counter() - start
    peak = _peak_rss()
    print(json.dumps({"growth": peak - base, "result": result_bytes(result), "seconds": seconds}))


def _reset_peak() -> None:
    """Reset the kernel's peak RSS of this process (Linux): a process started by a large parent inherits its peak."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM, which ``_reset_peak`` resets)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def result_bytes(result: Any) -> int:
    """Bytes of the tensors a call returned (a_statistics: each site's lambda* and gradient, rows of shared tensors)."""
    if not isinstance(result, dict):
        return 0
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for entry in result.values()
                for t in (entry.direction, entry.gradient, entry.a) if t is not None}
    return sum(storages.values())


PROBES = 3
"""Fresh processes per peak-memory figure, of which the median is reported: the forward-backward pass's own
peak growth varied from 69 to 97 MiB between single processes (the C heap's layout), the statistics' much less."""


def peak_growth(kind: str, args: argparse.Namespace) -> tuple[int, int, float]:
    """(median peak resident memory growth, bytes of the returned result, median seconds) of one call, over
    :data:`PROBES` fresh processes."""
    command = [sys.executable, __file__, "--probe", kind, "--batches", str(args.batches), "--batch",
               str(args.batch), "--size", str(args.size)]
    growths, held, seconds = [], 0, []
    for _ in range(PROBES):
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        figures = json.loads(output.strip().splitlines()[-1])
        growths.append(int(figures["growth"]))
        seconds.append(float(figures["seconds"]))
        held = int(figures["result"])
    return sorted(growths)[len(growths) // 2], held, sorted(seconds)[len(seconds) // 2]


def _data(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(DEVICE),
             torch.randint(0, 10, (args.batch,), generator=generator).to(DEVICE)) for _ in range(args.batches)]


def forward_backward(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One plain training pass's gradient work over ``data`` (eval mode, as the statistics run)."""
    model.eval()
    for x, y in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def statistics_figures(name: str, model: nn.Module, data: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    sites = [site for site in tg.find_sites(model, data[0][0], through=THROUGH)
             if not site.group.self_consumers and not site.group.unmeasured]
    groups = len({site.group_name for site in sites})
    # interleaved, each the best of its calls: on a machine whose speed drifts, the two see the same minutes
    # and the ratio round by round (a pass just before each call), whose median a slow minute moves less
    pass_time, stats_time, stats, rounds = float("inf"), float("inf"), None, []
    for _ in range(args.repeats):
        one_pass = best(lambda: forward_backward(model, data), 1)[0]
        elapsed, stats = best(lambda: tg.a_statistics(model, sites, data, F.cross_entropy, progress=False), 1)
        pass_time, stats_time = min(pass_time, one_pass), min(stats_time, elapsed)
        rounds.append(elapsed / one_pass)
    steps = [s.steps for s in stats.values() if s.steps]
    residuals = [s.residual for s in stats.values() if s.a is None]
    figures = {
        "network": name, "groups": groups, "sites": len(sites), "forward_backward_s": pass_time,
        "a_statistics_s": stats_time, "ratio": stats_time / pass_time, "ratio_rounds": rounds,
        "ratio_median": statistics.median(rounds),
        "lanczos_steps_max": max(steps, default=0), "worst_relative_residual": max(residuals, default=0.0),
    }
    print(f"{name}: {groups} groups, {len(sites)} sites; a_statistics {stats_time:.2f} s = "
          f"{figures['ratio']:.1f}x one forward-backward ({pass_time:.3f} s) [target <= 8x], round by round "
          f"{' '.join(f'{ratio:.1f}' for ratio in rounds)}x (median {figures['ratio_median']:.1f}x); Lanczos steps "
          f"<= {figures['lanczos_steps_max']}, worst ||A^T u - sigma v|| / sigma "
          f"{figures['worst_relative_residual']:.2g}")
    if args.floor:
        floor = convolution_floor(model, sites, data)
        figures.update(floor)
        print(f"{name}: the convolutions and matrix products alone (profiled): a_statistics "
              f"{floor['statistics_convolutions_s']:.2f} s "
              f"= {floor['convolution_floor']:.1f}x the forward-backward pass's own "
              f"({floor['pass_convolutions_s']:.3f} s); the rest of a_statistics under the profiler "
              f"{floor['statistics_other_s']:.2f} s")
        # the floor of item 1: no restructuring of the rest removes the convolutions
        print(f"{name}: floor: a_statistics' convolutions and matrix products alone are "
              f"{floor['floor_over_pass']:.1f}x the whole "
              f"forward-backward pass (all its kernels, {floor['pass_kernels_s']:.3f} s, under the profiler); all "
              f"of a_statistics' kernels {floor['statistics_kernels_s'] / floor['pass_kernels_s']:.1f}x; the call "
              f"measured above is {figures['ratio'] / floor['floor_over_pass']:.2f}x that floor")
    top = [entry.name for entry in tg.rank_sites(stats)[:5]]
    figures["top"] = [(site, float(stats[site].sigma)) for site in top]
    if args.reference:
        compare_reference(Path(args.reference), name, stats, top)
    if name == "resnet18_like" and DEVICE.type == "cuda":
        figures.update(cuda_memory(model, sites, data))
    elif name == "resnet18_like":
        small_time, _ = best(lambda: tg.a_statistics(model, sites, data, F.cross_entropy, progress=False,
                                                     memory_budget=SMALL_BUDGET), args.repeats)
        figures["a_statistics_small_budget_s"] = small_time
        print(f"{name}: with memory_budget={SMALL_BUDGET >> 20} MiB a_statistics {small_time:.2f} s = "
              f"{small_time / pass_time:.1f}x one forward-backward")
        kinds = ("fb", "stored", "stored_small", "streamed")
        (plain, _, _), (stored, held, _), (small, _, _), (streamed, _, streamed_time) = (
            peak_growth(kind, args) for kind in kinds)
        figures.update(peak_fb=plain, peak_stored=stored, peak_stored_small_budget=small, peak_streamed=streamed,
                       result_bytes=held, a_statistics_streamed_s=streamed_time)
        print(f"{name}: peak resident memory growth (median of {PROBES} fresh processes each): forward-backward "
              f"{plain / 2**20:.0f} MiB; "
              f"matrix-free {stored / 2**20:.0f} MiB ({stored / plain:.1f}x) [target <= 3x], with memory_budget="
              f"{SMALL_BUDGET >> 20} MiB {small / 2**20:.0f} MiB ({small / plain:.1f}x); with store=False "
              f"{streamed / 2**20:.0f} MiB ({streamed / plain:.1f}x) [target <= 1.5x]; of each, the returned "
              f"statistics hold {held / 2**20:.0f} MiB ({held / plain:.1f}x: lambda* and gradient of every site, "
              f"float32), leaving {(stored - held) / plain:.1f}x and {(streamed - held) / plain:.1f}x of working "
              "memory")
        print(f"{name}: a store=False call took {streamed_time:.1f} s (median of the {PROBES} processes) = "
              f"{streamed_time / pass_time:.0f}x one forward-backward (each product with A or A^T re-runs the pass)")
        if args.large_batch:
            figures.update(large_batch_memory(name, args, held))
    return figures


def large_batch_memory(name: str, args: argparse.Namespace, held: int) -> dict[str, Any]:
    """Item 4's figures over ``--large-batches`` batches of ``--large-batch`` images, in fresh processes."""
    large = argparse.Namespace(**{**vars(args), "batch": args.large_batch, "batches": args.large_batches})
    (plain, _, _), (stored, _, _), (streamed, _, seconds) = (peak_growth(kind, large)
                                                             for kind in ("fb", "stored", "streamed"))
    print(f"{name}: with {large.batches} batches of {large.batch}, peak resident memory growth: forward-backward "
          f"{plain / 2**20:.0f} MiB; matrix-free {stored / 2**20:.0f} MiB ({stored / plain:.1f}x) [target <= 3x]; "
          f"with store=False {streamed / 2**20:.0f} MiB ({streamed / plain:.1f}x) [target <= 1.5x], of which the "
          f"returned statistics {held / 2**20:.0f} MiB; the store=False call took {seconds:.1f} s")
    return {"large_batch": large.batch, "large_batches": large.batches, "large_peak_fb": plain,
            "large_peak_stored": stored, "large_peak_streamed": streamed, "large_streamed_s": seconds}


def cuda_memory(model: nn.Module, sites: list[Any], data: list[Any]) -> dict[str, Any]:
    """Peak CUDA memory of the forward-backward pass and of the matrix-free statistics (stored and replayed),
    each over what was allocated before the call (the caching allocator's exact figures, in this process)."""
    plain, _ = cuda_peak(lambda: forward_backward(model, data))
    stored, _ = cuda_peak(lambda: tg.a_statistics(model, sites, data, F.cross_entropy, progress=False,
                                                  method="matrix_free"))
    streamed, _ = cuda_peak(lambda: tg.a_statistics(model, sites, data, F.cross_entropy, progress=False,
                                                    method="matrix_free", store=False))
    print(f"resnet18_like: peak CUDA memory over the call's start: forward-backward {plain / 2**20:.0f} MiB; "
          f"matrix-free {stored / 2**20:.0f} MiB ({stored / plain:.1f}x) [target <= 3x]; with store=False "
          f"{streamed / 2**20:.0f} MiB ({streamed / plain:.1f}x) [target <= 1.5x] (the statistics are returned on "
          "the CPU)")
    return {"cuda_peak_fb": plain, "cuda_peak_stored": stored, "cuda_peak_streamed": streamed}


ARITHMETIC = ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::_convolution",
              "aten::cudnn_convolution", "aten::mm", "aten::addmm")
"""The kernels that do the products' arithmetic: convolutions (the layers' products with A and A^T) and dense
matrix products (the products with A^T A of the groups with few positions, and linear layers)."""


def convolution_floor(model: nn.Module, sites: list[Any], data: list[Any]) -> dict[str, float]:
    """Time in convolution kernels (forward, input and weight gradients) of one a_statistics call and of one
    forward-backward pass, under torch's profiler: what no restructuring of the rest can remove."""
    from torch.profiler import ProfilerActivity, profile

    def convolutions(function: Callable[[], Any]) -> tuple[float, float]:
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            function()
        events = profiled.key_averages()
        total = sum(event.self_cpu_time_total for event in events) / 1e6
        kernels = sum(event.self_cpu_time_total for event in events
                      if event.key in ARITHMETIC) / 1e6
        return kernels, total

    pass_convolutions, pass_total = convolutions(lambda: forward_backward(model, data))
    statistics_convolutions, statistics_total = convolutions(
        lambda: tg.a_statistics(model, sites, data, F.cross_entropy, progress=False))
    return {"pass_convolutions_s": pass_convolutions, "statistics_convolutions_s": statistics_convolutions,
            "convolution_floor": statistics_convolutions / pass_convolutions,
            "pass_kernels_s": pass_total, "statistics_kernels_s": statistics_total,
            "floor_over_pass": statistics_convolutions / pass_total,
            "statistics_other_s": statistics_total - statistics_convolutions}


def compare_reference(path: Path, name: str, stats: dict[str, Any], top: list[str]) -> None:
    """Store the top sites' lambda* the first time; compare later runs against it."""
    entries = json.loads(path.read_text()) if path.exists() else {}
    current = {site: stats[site].direction.double().flatten().tolist() for site in top}
    if name not in entries:
        entries[name] = current
        path.write_text(json.dumps(entries))
        print(f"{name}: reference written to {path}")
        return
    reference = entries[name]
    same_top = list(reference) == top
    cosines = []
    for site, vector in reference.items():
        if site in stats:
            a = torch.tensor(vector, dtype=torch.float64)
            b = stats[site].direction.double().flatten()
            cosines.append(float((a @ b).abs() / (a.norm() * b.norm())))
    print(f"{name}: top sites {'unchanged' if same_top else 'CHANGED'} against {path}; lambda* |cos| >= "
          f"{min(cosines, default=float('nan')):.6f} [target >= 0.999]")


def analysis_figures(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    tg.find_sites(model, x, through=THROUGH)  # warm: the first trace imports and compiles
    find_time, sites = best(lambda: tg.find_sites(model, x, through=THROUGH), repeats)
    analyze_time, report = best(lambda: tg.analyze(model, x, through=THROUGH), repeats)
    print(f"{name}: analyze {analyze_time:.2f} s = {analyze_time / find_time:.2f}x find_sites ({find_time:.2f} s, "
          f"{len(sites)} sites) [target <= 2x]")
    return {"network": name, "find_sites_s": find_time, "analyze_s": analyze_time, "ratio": analyze_time / find_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference", help="JSON of top sites' lambda* to write (first run) or compare against")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--skip-statistics", action="store_true", help="only the analysis figures")
    parser.add_argument("--floor", action="store_true",
                        help="also profile the time in convolution kernels (the floor of the statistics' cost)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the networks and data live (on "
                        "CUDA, times are taken with CUDA events and memory is the caching allocator's peak)")
    parser.add_argument("--large-batch", type=int, default=64,
                        help="also measure item 4's peak memory over batches of this many images (0: leave it out)")
    parser.add_argument("--large-batches", type=int, default=2)
    parser.add_argument("--probe", choices=("fb", "stored", "streamed", "stored_small"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if DEVICE.type == "cuda" and args.floor:
        parser.error("--floor profiles CPU convolution kernels; leave it out with --device cuda")
    if args.probe:
        probe(args.probe, args)
        return
    torch.manual_seed(0)
    where = f"device {torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda" else "device cpu"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}")
    data = _data(args)
    networks: list[tuple[str, nn.Module]] = [("resnet18_like", ResNet18Like()), ("convnext_like", ConvNeXtLike())]
    try:
        import torchvision

        networks.append(("torchvision resnet18", torchvision.models.resnet18(weights=None, num_classes=10)))
    except ImportError:
        print("torchvision is not installed: its resnet18 is left out")
    results: dict[str, Any] = {"analysis": [], "statistics": []}
    networks = [(name, model.to(DEVICE)) for name, model in networks]
    for name, model in networks:
        results["analysis"].append(analysis_figures(name, model.eval(), data[0][0], args.repeats))
    if not args.skip_statistics:
        for name, model in networks:
            if "convnext" not in name:
                results["statistics"].append(statistics_figures(name, model.eval(), data, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

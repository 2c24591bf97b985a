"""Zoo coverage: trace, find sites, rewrite, verify, export and reload every model of a zoo.

For each constructor (torchvision's ``list_models()`` by default, ``--timm
NAME[,NAME]`` for timm models, ``--models`` to pick torchvision ones), in
eval mode on a random batch of two at the model's input size (``--size``):

1. trace the model (the time to trace and find sites is reported on its
   own), find sites under the default rules and with everything in
   ``through=``, and collect the reasons of the groups that have none;
2. on a :func:`tunnelgraph.perturbed` copy (so a broken rewrite cannot hide
   behind zero or tiny weights), rewrite one random channel of every legal
   group with a random lambda, up to ``--cap`` groups (``--all``: every site
   of those groups, one after the other);
3. verify in float32 and in float64 (the float64 copy rewritten the same
   way), and report the output's sensitivity to its input and the float64
   error relative to how much the output varies over the batch (the
   meaningful figure where the output barely depends on the input);
4. export the rewritten model to ONNX and verify it in onnxruntime;
5. save its ``state_dict`` and records, ``tg.replay`` them into a freshly
   built model, load, and compare outputs bit for bit.

Input size: ``--size auto`` (the default) runs each model at 64x64 when its
forward accepts that, else at the first size it accepts among those the
model declares (timm: ``pretrained_cfg['input_size']``; torchvision: the
default weights' ``min_size`` and crop size) and 224, 299; the size used is
in the table. ``--size N`` runs every model at NxN.

Prints one row per model: input size, groups, sites (default / through),
sites rewritten, sensitivity, max relative error (float32, float64), ONNX
ok, reload ok, trace+find seconds, total seconds; then the flagged rows with their
messages. A row is flagged when anything raised, when a check of
:func:`tunnelgraph.verify` failed, when the float32 error exceeds
``REL32`` or the float64 error over the output's variation exceeds
``REL64_OVER_VARIATION``, or when ONNX or the reload failed. Fixed
tolerances cannot tell a broken rewrite from rounding in a model that
amplifies rounding (a perturbed copy can), so for a flagged precision the
row also gets the model's rounding floor: how far its output moves when
every parameter moves by one unit in the last place (``floor32`` relative
to the output's size, ``floor64`` relative to its variation); and where
the ONNX export's own check (rtol 1e-5) failed, the export is checked again
to ``FLOOR_FACTOR`` times ``floor32``. Where the perturbed copy's float32
output is not finite (activations that grow block by block overflow in a
deep network), the float32 and ONNX comparisons are skipped (ONNX column
``inf``) and float64 alone judges the rewrite. A flagged row fails (and the exit
status is 1) when it raised, the reload failed, or an error exceeds
``FLOOR_FACTOR`` times its floor. Needs
torchvision and/or timm (not part of tunnelgraph's dependencies); run it
in an environment that has them::

    python benchmarks/zoo_coverage.py --models resnet18,mobilenet_v2
    python benchmarks/zoo_coverage.py --timm densenet121,cspresnet50 --size 64 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import gc
import json
import logging
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

import tunnelgraph as tg

THROUGH = ("batchnorm", "pooling", "dropout", "depthwise")
REL32 = 1e-4
"""Largest max relative error in float32 a passing row may have."""
REL64_OVER_VARIATION = 1e-9
"""Largest float64 error relative to the output's variation over the batch a passing row may have."""
LEAN_PARAMETERS = 300_000_000
"""Models with more parameters rewrite in place after the first rewrite (one copy of the model less)."""
FLOOR_FACTOR = 10.0
"""A flagged row is a failure when its error exceeds this many times the model's rounding floor."""
AUTO_SIZES = (64, 224, 299)
"""--size auto: tried in this order, after the sizes the model declares (from 64 up)."""


class Entry(NamedTuple):
    name: str
    build: Callable[[], torch.nn.Module]
    family: str
    sizes: tuple[int, ...]  # sizes the model declares (tried after 64 by --size auto)


def constructors(args: argparse.Namespace) -> list[Entry]:
    """The requested models: name, builder, family and declared input sizes."""
    found: list[Entry] = []
    if args.timm:
        import timm

        for name in args.timm.split(","):
            cfg = timm.get_pretrained_cfg(name)
            declared = tuple(cfg.input_size[1:]) if cfg is not None and cfg.input_size else ()
            square = (declared[0],) if len(declared) == 2 and declared[0] == declared[1] else ()
            module = timm.models._registry._model_to_module.get(name, "?").rsplit(".", 1)[-1]
            found.append(Entry(f"timm/{name}", functools.partial(timm.create_model, name, pretrained=False),
                               module, square))
    if args.models or not args.timm:
        import torchvision

        names = args.models.split(",") if args.models else torchvision.models.list_models(torchvision.models)
        for name in names:
            sizes: tuple[int, ...] = ()
            try:
                weights = torchvision.models.get_model_weights(name).DEFAULT
                crop = getattr(weights.transforms(), "crop_size", None)
                sizes = tuple(sorted({weights.meta["min_size"][0], *(crop or [])}))
            except Exception:  # a model without weights: --size auto falls back on AUTO_SIZES
                pass
            builder = torchvision.models.get_model_builder(name)
            build = functools.partial(torchvision.models.get_model, name, weights=None)
            found.append(Entry(f"torchvision/{name}", build, builder.__module__.rsplit(".", 1)[-1], sizes))
    return found


def candidate_sizes(declared: tuple[int, ...]) -> list[int]:
    """--size auto: 64 first, then the declared sizes above it, then AUTO_SIZES."""
    sizes = [AUTO_SIZES[0], *sorted(s for s in declared if s > AUTO_SIZES[0]), *AUTO_SIZES[1:]]
    return list(dict.fromkeys(sizes))


def pick_size(model: torch.nn.Module, args: argparse.Namespace, declared: tuple[int, ...]) -> int:
    """The input side to run ``model`` at: ``args.size``, or under ``auto`` the first its forward accepts."""
    if args.size != "auto":
        return int(args.size)
    errors = []
    for size in candidate_sizes(declared):
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
            return size
        except Exception as error:  # shape errors: try the next size
            errors.append(f"{size}: {type(error).__name__}: {str(error)[:100]}")
    raise ValueError("no input size fits: " + " | ".join(errors))


def check(name: str, build: Callable[[], torch.nn.Module], args: argparse.Namespace,
          sizes: tuple[int, ...] = (), family: str = "") -> dict[str, Any]:
    """One model's row; an exception is recorded in the row (``error``, and ``stage``: where it came from)."""
    started = time.perf_counter()
    row: dict[str, Any] = {"model": name, "family": family}
    try:
        _check(row, build, args, sizes)
    except Exception as error:  # a row reports it; the run goes on
        row["error"] = f"{type(error).__name__}: {str(error)[:600]}"
    row["seconds"] = time.perf_counter() - started
    _release()
    return row


def _release() -> None:
    """Give freed memory back to the system (glibc keeps it otherwise, and the run's footprint grows)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _check(row: dict[str, Any], build: Callable[[], torch.nn.Module], args: argparse.Namespace,
           sizes: tuple[int, ...]) -> None:
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    row["stage"] = "build"
    model = build().eval()
    row["params"] = sum(p.numel() for p in model.parameters())
    row["stage"] = "size"
    size = pick_size(model, args, sizes)
    row["size"] = size
    torch.manual_seed(args.seed)
    x = torch.randn(2, 3, size, size)
    row["stage"] = "trace"
    begun = time.perf_counter()
    graph = tg.trace(model, x)
    row["trace_seconds"] = time.perf_counter() - begun
    row["stage"] = "sites"
    sites = tg.find_sites(graph, through=THROUGH)
    row["find_seconds"] = time.perf_counter() - begun  # trace + find sites
    row["default_sites"] = len(tg.find_sites(graph))
    report = tg.analyze(graph, through=THROUGH)
    reasons: collections.Counter[str] = collections.Counter()
    for group in report.blocked:
        reasons.update(group.reasons)
    row["blocked_groups"] = len(report.blocked)
    row["reasons"] = dict(reasons.most_common())
    del graph, report
    groups: dict[str, list[tg.Site]] = {}
    for site in sites:
        groups.setdefault(site.group_name, []).append(site)
    row.update(groups=len(groups), sites=len(sites))
    row["stage"] = "perturb"
    generic = tg.perturbed(model, generator=torch.Generator().manual_seed(args.seed)).eval()
    del model
    chosen = sorted(groups)[: args.cap]
    plan = [target.name for group in chosen
            for target in (groups[group] if args.all else [rng.choice(groups[group])])]
    # float32 first, then float64, so that at most one precision's pair of models is held
    row["stage"] = "rewrite32"
    rewritten = _rewrite(generic, x, plan, row)
    row["rewritten"] = len(plan)
    row["stage"] = "verify32"
    with torch.no_grad():
        row["finite32"] = bool(torch.isfinite(generic(x)).all())
    if not row["finite32"]:
        # the perturbed copy overflows float32 (activations that grow block by block in a deep
        # network): float32 and ONNX comparisons of inf and nan say nothing; float64 still does
        row.update(rel32=float("nan"), pass32=None, onnx=None)
    else:
        report32 = tg.verify(generic, rewritten, x)
        row.update(rel32=report32.max_rel, pass32=report32.passed)
        if not report32.passed or report32.max_rel > REL32:
            row["floor32"] = _rounding_floor(generic, x) / _largest(generic, x)
        row["stage"] = "onnx"
        row["onnx"] = _onnx(rewritten, x, args) if args.onnx else None
    if row["onnx"] not in (None, True):
        # the export checks onnxruntime against PyTorch to rtol 1e-5: where the model amplifies
        # rounding beyond that, check again to FLOOR_FACTOR times the model's rounding floor
        row.setdefault("floor32", _rounding_floor(generic, x) / _largest(generic, x))
        row["onnx_rtol"] = max(1e-5, FLOOR_FACTOR * row["floor32"])
        row["onnx_at_floor"] = _onnx(rewritten, x, args, rtol=row["onnx_rtol"])
    row["stage"] = "reload"
    row["reload"] = _reload(build, rewritten, x)
    del rewritten
    _release()
    row["stage"] = "rewrite64"
    generic64 = generic.double()  # in place: the float32 copy is no longer needed
    x64 = x.double()
    row["sensitivity"] = tg.output_sensitivity(generic64, x64)
    rewritten64 = _rewrite(generic64, x64, plan, row)
    row["stage"] = "verify64"
    report64 = tg.verify(generic64, rewritten64, x64)
    row.update(rel64=report64.max_rel, pass64=report64.passed)
    # against how much the output varies over the batch, not its size: where the output barely
    # depends on the input, a change of the function must still stand out from that variation
    with torch.no_grad():
        y = generic64(x64)
    variation = float((y - y.mean(0, keepdim=True)).abs().max())
    row["err_over_variation64"] = report64.max_abs / variation if variation > 0 else float("inf")
    if not report64.passed or row["err_over_variation64"] > REL64_OVER_VARIATION:
        row["floor64"] = _rounding_floor(generic64, x64) / variation if variation > 0 else float("inf")
    del row["stage"]


def _largest(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(x).abs().max())


def _rounding_floor(model: torch.nn.Module, x: torch.Tensor, draws: int = 2) -> float:
    """How far the output moves when every parameter moves by one unit in the last place.

    The largest output change over ``draws`` copies of ``model`` whose parameters each moved one
    representable number up or down at random: the error that rounding alone can cause in a
    model that amplifies it, and so the least error a check of a rewrite (which changes the
    order of sums) can be expected to see."""
    noisy = copy.deepcopy(model)
    worst = 0.0
    with torch.no_grad():
        y = model(x)
        for draw in range(draws):
            generator = torch.Generator().manual_seed(draw)
            for original, moved in zip(model.parameters(), noisy.parameters()):
                up = torch.rand(original.shape, generator=generator) < 0.5
                infinity = torch.full_like(original, float("inf"))
                moved.copy_(torch.nextafter(original, torch.where(up, infinity, -infinity)))
            worst = max(worst, float((noisy(x) - y).abs().max()))
    return worst


def _rewrite(model: torch.nn.Module, x: torch.Tensor, plan: list[str], row: dict[str, Any]) -> torch.nn.Module:
    """``model`` with the sites of ``plan`` opened one after the other, each found again on the model so
    far (earlier rewrites can widen its consumers) and split by a random lambda seeded by its position.

    The first rewrite makes a copy; for models over ``LEAN_PARAMETERS`` the others edit it in place."""
    lean = row.get("params", 0) > LEAN_PARAMETERS
    for count, name in enumerate(plan):
        row["site"] = name
        current = {s.name: s for s in tg.find_sites(model, x, through=THROUGH)}[name]
        lam = torch.rand(current.outbound_size, dtype=torch.float64, generator=torch.Generator().manual_seed(count))
        model = tg.rewrite(model, current, lam, inplace=lean and count > 0)
    row.pop("site", None)
    return model


def _onnx(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace, rtol: float = 1e-5) -> bool | str:
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            tg.export_onnx(model, x, path, rtol=rtol)
            return bool(tg.verify(model, str(path), x, rtol=rtol).passed)
    except Exception as error:  # a row reports it; the run goes on
        return f"{type(error).__name__}: {str(error)[:300]}"


def _reload(build: Callable[[], torch.nn.Module], model: torch.nn.Module, x: torch.Tensor) -> bool | str:
    try:
        with tempfile.TemporaryDirectory() as folder:  # a file, read back mapped: no third copy in memory
            path = Path(folder) / "state.pt"
            torch.save(model.state_dict(), path)
            records = [r.to_dict() for r in tg.rewrite_records(model)]
            fresh = tg.replay(build(), json.loads(json.dumps(records)))
            fresh.load_state_dict(torch.load(path, mmap=True))
        fresh.eval()
        with torch.no_grad():
            a, b = fresh(x), model(x)
        # bit for bit, nan where nan (a perturbed copy can overflow float32)
        return bool(a.shape == b.shape and ((a == b) | (a.isnan() & b.isnan())).all())
    except Exception as error:
        return f"{type(error).__name__}: {str(error)[:300]}"


def flagged(row: dict[str, Any]) -> bool:
    """Whether the row exceeds a fixed tolerance or raised (see the module's docstring)."""
    return ("error" in row or row.get("pass32") is False or row.get("pass64") is False
            or row.get("rel32", 0) > REL32 or row.get("err_over_variation64", 0) > REL64_OVER_VARIATION
            or row.get("reload", True) is not True or row.get("onnx") not in (None, True))


def failed(row: dict[str, Any]) -> bool:
    """Whether a flagged row's errors are more than rounding: beyond ``FLOOR_FACTOR`` times its floor.

    A model that amplifies rounding (a perturbed copy can: outputs of 1e15, or one that barely
    depends on its input) fails fixed tolerances whatever a rewrite does; its rewrite still fails
    here when the error exceeds what one-ulp changes of its parameters cause, times FLOOR_FACTOR."""
    if not flagged(row):
        return False
    if "error" in row or row.get("reload", True) is not True:
        return True
    # each error and its floor share a denominator (the output's size, its variation)
    flagged32 = row.get("pass32") is False or row.get("rel32", 0) > REL32
    flagged64 = row.get("pass64") is False or row.get("err_over_variation64", 0) > REL64_OVER_VARIATION
    beyond32 = flagged32 and row["rel32"] > FLOOR_FACTOR * row.get("floor32", 0)
    beyond64 = flagged64 and row["err_over_variation64"] > FLOOR_FACTOR * row.get("floor64", 0)
    onnx = row.get("onnx") in (None, True) or row.get("onnx_at_floor") is True
    return beyond32 or beyond64 or not onnx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="torchvision model names, comma-separated (default: list_models())")
    parser.add_argument("--timm", help="timm model names, comma-separated")
    parser.add_argument("--size", default="auto",
                        help="input side, or 'auto' (default): 64 where the model accepts it, else its own size")
    parser.add_argument("--cap", type=int, default=8, help="groups rewritten per model (default 8)")
    parser.add_argument("--all", action="store_true", help="every site of the chosen groups, not one")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX export")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this file (rewritten after every model)")
    args = parser.parse_args(argv)
    if args.size != "auto":
        args.size = int(args.size)
    warnings.simplefilter("ignore")
    logging.getLogger("tunnelgraph").setLevel(logging.ERROR)
    rows = []
    header = (f"{'model':40} {'size':>4} {'groups':>6} {'sites':>13} {'rewr':>4} {'sens':>6} {'rel32':>8} "
              f"{'rel64':>8} {'err/var64':>9} {'onnx':>5} {'reload':>6} {'find s':>6} {'s':>6}")
    print(header, flush=True)
    for entry in constructors(args):
        row = check(entry.name, entry.build, args, entry.sizes, entry.family)
        rows.append(row)
        if "error" in row:
            print(f"{entry.name:40} ERROR at {row.get('stage')} (size {row.get('size', '-')}"
                  f"{', site ' + row['site'] if 'site' in row else ''}): {row['error'][:200]}", flush=True)
        else:
            onnx_ok = "-" if row["onnx"] is None else ("ok" if row["onnx"] is True else "FAIL")
            if not row.get("finite32", True):
                onnx_ok = "inf"  # the float32 output overflows: float32 checks skipped
            reload_ok = "ok" if row["reload"] is True else "FAIL"
            print(f"{entry.name:40} {row['size']:>4} {row['groups']:>6} {row['default_sites']:>5}/{row['sites']:>7} "
                  f"{row['rewritten']:>4} {row['sensitivity']:>6.3f} {row['rel32']:>8.1e} {row['rel64']:>8.1e} "
                  f"{row['err_over_variation64']:>9.1e} {onnx_ok:>5} {reload_ok:>6} "
                  f"{row['find_seconds']:>6.1f} {row['seconds']:>6.1f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    marked = [r for r in rows if flagged(r)]
    failures = [r for r in marked if failed(r)]
    print(f"\n{len(rows)} models, {len(marked)} flagged by a fixed tolerance or an error, "
          f"{len(failures)} of them beyond {FLOOR_FACTOR:g} times their rounding floor or raising")
    for row in marked:
        print(f"- {row['model']}{' FAILED' if failed(row) else ' (rounding)'}: " + "; ".join(
            f"{k}={row[k]}" for k in ("stage", "site", "error", "pass32", "pass64", "rel32", "floor32",
                                      "err_over_variation64", "floor64", "onnx", "onnx_rtol", "onnx_at_floor",
                                      "reload")
            if k in row and row[k] not in (True, None)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Zoo coverage: trace, find sites, rewrite, verify, export and reload every model of a zoo.

For each constructor (torchvision's ``list_models()`` by default, ``--timm
NAME[,NAME]`` for timm models, ``--models`` to pick torchvision ones), in
eval mode on a random input of ``--size``:

1. find sites under the default rules and with everything in ``through=``;
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

Prints one row per model: groups, sites (default / through), sites
rewritten, sensitivity, max relative error (float32, float64), ONNX ok,
reload ok, seconds; and the failures with their messages. Needs
torchvision and/or timm (not part of tunnelgraph's dependencies); run it
in an environment that has them::

    python benchmarks/zoo_coverage.py --models resnet18,mobilenet_v2 --size 64
    python benchmarks/zoo_coverage.py --timm densenet121,cspresnet50 --size 64 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

import tunnelgraph as tg

THROUGH = ("batchnorm", "pooling", "dropout", "depthwise")


def constructors(args: argparse.Namespace) -> list[tuple[str, Callable[[], torch.nn.Module]]]:
    """(name, builder) for the requested models."""
    found: list[tuple[str, Callable[[], torch.nn.Module]]] = []
    if args.timm:
        import timm

        for name in args.timm.split(","):
            found.append((f"timm/{name}", lambda name=name: timm.create_model(name, pretrained=False)))
    if args.models or not args.timm:
        import torchvision

        names = args.models.split(",") if args.models else torchvision.models.list_models(torchvision.models)
        for name in names:
            found.append((f"torchvision/{name}", lambda name=name: torchvision.models.get_model(name, weights=None)))
    return found


def check(name: str, build: Callable[[], torch.nn.Module], args: argparse.Namespace) -> dict[str, Any]:
    """One model's row."""
    started = time.perf_counter()
    row: dict[str, Any] = {"model": name}
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    model = build().eval()
    x = torch.randn(2, 3, args.size, args.size)
    row["default_sites"] = len(tg.find_sites(model, x))
    sites = tg.find_sites(model, x, through=THROUGH)
    groups: dict[str, list[tg.Site]] = {}
    for site in sites:
        groups.setdefault(site.group_name, []).append(site)
    row.update(groups=len(groups), sites=len(sites))
    generic = tg.perturbed(model, generator=torch.Generator().manual_seed(args.seed)).eval()
    generic64 = copy.deepcopy(generic).double()
    x64 = x.double()
    row["sensitivity"] = tg.output_sensitivity(generic64, x64)
    chosen = sorted(groups)[: args.cap]
    rewritten, rewritten64 = generic, generic64
    count = 0
    for group in chosen:
        targets = groups[group] if args.all else [rng.choice(groups[group])]
        for target in targets:
            current = {s.name: s for s in tg.find_sites(rewritten, x, through=THROUGH)}[target.name]
            lam = torch.rand(current.outbound_size, dtype=torch.float64, generator=torch.Generator().manual_seed(count))
            rewritten = tg.rewrite(rewritten, current, lam)
            current64 = {s.name: s for s in tg.find_sites(rewritten64, x64, through=THROUGH)}[target.name]
            rewritten64 = tg.rewrite(rewritten64, current64, lam)
            count += 1
    row["rewritten"] = count
    report32 = tg.verify(generic, rewritten, x)
    report64 = tg.verify(generic64, rewritten64, x64)
    row.update(rel32=report32.max_rel, rel64=report64.max_rel, pass32=report32.passed, pass64=report64.passed)
    # against how much the output varies over the batch, not its size: where the output barely
    # depends on the input, a change of the function must still stand out from that variation
    with torch.no_grad():
        y = generic64(x64)
    variation = float((y - y.mean(0, keepdim=True)).abs().max())
    row["err_over_variation64"] = report64.max_abs / variation if variation > 0 else float("inf")
    row["onnx"] = _onnx(rewritten, x, args) if args.onnx else None
    row["reload"] = _reload(build, rewritten, x)
    row["seconds"] = time.perf_counter() - started
    return row


def _onnx(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace) -> bool | str:
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            tg.export_onnx(model, x, path)
            return tg.verify(model, str(path), x).passed
    except Exception as error:  # a row reports it; the run goes on
        return f"{type(error).__name__}: {str(error)[:120]}"


def _reload(build: Callable[[], torch.nn.Module], model: torch.nn.Module, x: torch.Tensor) -> bool | str:
    try:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        records = [r.to_dict() for r in tg.rewrite_records(model)]
        fresh = tg.replay(build(), json.loads(json.dumps(records)))
        buffer.seek(0)
        fresh.load_state_dict(torch.load(buffer))
        fresh.eval()
        with torch.no_grad():
            return bool(torch.equal(fresh(x), model(x)))
    except Exception as error:
        return f"{type(error).__name__}: {str(error)[:120]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="torchvision model names, comma-separated (default: list_models())")
    parser.add_argument("--timm", help="timm model names, comma-separated")
    parser.add_argument("--size", type=int, default=64, help="input side (default 64)")
    parser.add_argument("--cap", type=int, default=8, help="groups rewritten per model (default 8)")
    parser.add_argument("--all", action="store_true", help="every site of the chosen groups, not one")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX export")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("tunnelgraph").setLevel(logging.ERROR)
    rows = []
    header = (f"{'model':40} {'groups':>6} {'sites':>13} {'rewr':>4} {'sens':>6} {'rel32':>8} {'rel64':>8} "
              f"{'err/var64':>9} {'onnx':>5} {'reload':>6} {'s':>6}")
    print(header)
    for name, build in constructors(args):
        try:
            row = check(name, build, args)
        except Exception as error:
            row = {"model": name, "error": f"{type(error).__name__}: {str(error)[:300]}"}
            print(f"{name:40} ERROR {row['error']}", flush=True)
            rows.append(row)
            continue
        rows.append(row)
        onnx_ok = "-" if row["onnx"] is None else ("ok" if row["onnx"] is True else "FAIL")
        reload_ok = "ok" if row["reload"] is True else "FAIL"
        print(f"{name:40} {row['groups']:>6} {row['default_sites']:>5}/{row['sites']:>7} {row['rewritten']:>4} "
              f"{row['sensitivity']:>6.3f} {row['rel32']:>8.1e} {row['rel64']:>8.1e} "
              f"{row['err_over_variation64']:>9.1e} {onnx_ok:>5} {reload_ok:>6} "
              f"{row['seconds']:>6.1f}", flush=True)
    failures = [r for r in rows if "error" in r or not r.get("pass64", True) or r.get("reload") is not True
                or r.get("onnx") not in (None, True) or r.get("err_over_variation64", 0) > 1e-8]
    print(f"\n{len(rows)} models, {len(failures)} with a failure")
    for row in failures:
        print(f"- {row['model']}: " + "; ".join(f"{k}={row[k]}" for k in ("error", "pass32", "pass64", "onnx", "reload")
                                               if k in row and row[k] not in (True, None)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

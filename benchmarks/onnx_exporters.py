"""ONNX from both exporters: the same channel groups as in PyTorch, and exact rewrites of the ONNX files.

For each torchvision classification model (``list_models(module=torchvision.models)``
by default, ``--models a,b`` to choose), built with ``weights=None`` in eval
mode and, unless ``--fresh``, made generic with :func:`tunnelgraph.perturbed`
(so a broken rewrite cannot hide behind zero biases or identity batch norms;
with ``--calibrate`` its batch norms then re-estimate their statistics on
random batches, so that activations stay of order one where the perturbed
copy amplifies float32 rounding beyond what a float32 check can judge), at
input ``1x3xSxS`` (``S`` = 64 where the model accepts it, else the crop
size of its default weights, else 224, else 299):

1. export it twice: with the TorchScript exporter (``dynamo=False``,
   opset 17, ``do_constant_folding=True``: batch norm is fused into the
   convolution before it, equal initializers are stored once and read
   through ``Identity`` nodes) and with the dynamo exporter (``dynamo=True``,
   its default opset); a failing exporter is recorded as such;
2. analyse each file alone (:func:`tunnelgraph.load_onnx`, channel groups
   under the default rules and with every ``through=`` option) and compare
   its groups with the PyTorch model's own (``tg.trace`` and
   :func:`~tunnelgraph.analysis.groups.channel_groups`): groups are matched
   by their producers' PyTorch names (:func:`pytorch_names`: parameter
   names, the TorchScript exporter's node names, the dynamo exporter's
   name-scope metadata); every pair whose legality, size or site sizes
   differ under either rule set, and every group without a counterpart, is
   a difference, explained when a known cause accounts for it
   (:func:`explain`, ``CAUSES``);
3. rewrite one random channel of each of ``--cap`` random legal groups
   (every ``through=`` option) of each file, one after the other with a
   random vector lambda, and verify the rewritten file against the original
   in onnxruntime: a legal site whose rewrite changes the output by more
   than ``REL32`` (max relative error, float32) and than ``FLOOR_FACTOR``
   times the file's rounding floor (:func:`rounding_floor`: a perturbed deep
   network amplifies float32 rounding far beyond ``REL32``) is a BUG, and
   the sites involved are then rewritten one by one to name the culprit;
4. print one row per model and exporter (PyTorch groups/legal/sites, ONNX
   groups/legal/sites, legal and sites as ``default/all``, the PyTorch
   groups as ``same/explained/gap/unexplained`` (a gap: a frontend fails
   closed where the other passes) with the differences counted by cause,
   sites rewritten, max relative error, ok, seconds), then the gaps and
   unexplained differences in full, and each row's peak resident memory
   (the stage where it peaked; ``memory_gib`` in the rows: the peak of every
   stage, :class:`PeakMemory`); ``--json`` writes every row, with each
   group difference, after every model, ``--markdown`` the table.

Each model runs in a child process (``--timeout`` seconds), so a crash or
a model too large for memory is a row, not the end of the run. Needs
torchvision, onnx, onnxscript and onnxruntime::

    python benchmarks/onnx_exporters.py --models resnet18,mobilenet_v3_small --json out.json
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

REL32 = 1e-4
"""Largest max relative error (float32, onnxruntime) a rewrite of a legal site may cause..."""
FLOOR_FACTOR = 10.0
"""... or this many times the file's rounding floor (see :func:`rounding_floor`), where that is larger."""
EXPORTERS = ("torchscript", "dynamo")
RULES = {"default": (), "all": ("batchnorm", "dropout", "depthwise", "pooling")}
"""The rule sets groups are compared under: the paper's default, and every ``through=`` option."""
SIZES = (64, 224, 299)


# -- the child: one model --------------------------------------------------------------------------


def pick_size(model: Any, name: str, requested: str) -> int:
    """``requested``, or the first side the model's forward accepts: 64, its weights' crop size, 224, 299."""
    import torch
    import torchvision

    if requested != "auto":
        return int(requested)
    sizes = [SIZES[0]]
    try:
        crop = getattr(torchvision.models.get_model_weights(name).DEFAULT.transforms(), "crop_size", None)
        sizes += list(crop or [])
    except Exception:  # no weights: the fixed sizes
        pass
    errors = []
    for size in dict.fromkeys(sizes + list(SIZES[1:])):
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
            return size
        except Exception as error:  # a shape error: the next size
            errors.append(f"{size}: {type(error).__name__}")
    raise ValueError("no input size fits: " + ", ".join(errors))


def describe_group(group: Any, ops: dict[str, str]) -> dict[str, Any]:
    """What the comparison reads of a :class:`~tunnelgraph.ChannelGroup` (``ops``: node or module -> op)."""
    inbound = sum(s.channel_numel for s in group.slices if s.role == "inbound")
    outbound = sum(s.channel_numel for s in group.slices if s.role == "outbound")
    biased = {s.module for s in group.slices if s.role == "inbound" and s.part == "bias"}
    return {"name": group.name, "size": group.size, "producers": list(group.producers),
            "consumers": list(group.consumers), "through": list(group.through),
            "through_ops": dict(Counter(ops.get(t, "?") for t in group.through)), "legal": group.legal,
            "reasons": list(group.reasons), "inbound": inbound, "outbound": outbound,
            "unbiased": [p for p in group.producers if p not in biased]}


def analyse(graph: Any) -> dict[str, Any]:
    """The graph's groups under each rule set of ``RULES``, described, and the layers no group has.

    A parametric layer outside every group's producers is listed in ``ungrouped``. There
    should be none: ``channel_groups`` reports a channel class made by a concat or flatten
    that no group's walk reaches as a blocked group of its own; :func:`compare` counts any
    such layer as an unexplained difference."""
    from tunnelgraph.analysis.groups import channel_groups
    from tunnelgraph.ir import OpKind

    ops = {node.name: node.op for node in graph}
    ops.update({node.module: node.op for node in graph if node.module})
    groups = {rule: [describe_group(g, ops) for g in channel_groups(graph, through)] for rule, through in RULES.items()}
    layers = [node for node in graph if node.kind == OpKind.PARAMETRIC]
    grouped = {p for g in groups["all"] for p in g["producers"]}
    ungrouped = [node.module or node.name for node in layers if (node.module or node.name) not in grouped]
    params = sorted({ref.name for node in graph for ref in node.params.values()})
    return {"groups": groups, "layers": [node.module or node.name for node in layers], "ungrouped": ungrouped,
            "params": params}


def counts(groups: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """groups, legal and sites (legal and sites per rule set)."""
    return {
        "groups": len(groups["all"]),
        "legal": {rule: sum(g["legal"] for g in found) for rule, found in groups.items()},
        "sites": {rule: sum(g["size"] for g in found if g["legal"]) for rule, found in groups.items()},
    }


def scope_module(node_name: str) -> str:
    """The module path in a TorchScript exporter's node name: ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``.

    Each scope repeats its parent's (``layer1`` -> ``layer1.0``) when the parent is a container."""
    path: list[str] = []
    last: str | None = None
    for segment in node_name.strip("/").split("/")[:-1]:
        path.append(segment[len(last) + 1:] if last is not None and segment.startswith(last + ".") else segment)
        last = segment
    return ".".join(path)


def pytorch_names(model: Any, layers: list[str], modules: set[str]) -> dict[str, str]:
    """The PyTorch module each ONNX layer stands for, where the file tells.

    A layer named after its parameters (``layer1.0.conv1.weight`` -> ``layer1.0.conv1``) is
    its module; a TorchScript exporter's node name gives the module path (:func:`scope_module`,
    where a fused convolution's weight is ``onnx::Conv_194``); and the dynamo exporter records
    each node's module path in its ``pkg.torch.onnx.name_scopes`` metadata (a bias-free linear
    is a ``MatMul`` of a transposed weight constant ``val_N`` there)."""
    scopes = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                path = ast.literal_eval(prop.value)
                if len(path) >= 2:
                    scopes[node.name] = path[-2]
    names = {}
    for layer in layers:
        candidates = (layer, scope_module(layer) if layer.startswith("/") else None, scopes.get(layer))
        found = next((c for c in candidates if c in modules), None)
        if found is not None:
            names[layer] = found
    return names


def match(pt: list[dict[str, Any]], ox: list[dict[str, Any]], names: dict[str, str]) -> dict[str, Any]:
    """Pair ONNX groups with PyTorch groups by their producers' PyTorch names (``names``).

    Returns ``pairs`` (pt name, onnx name), ``spans`` (an ONNX group whose producers are in
    several PyTorch groups, with them), ``splits`` (an ONNX group whose producers are in a
    PyTorch group already paired, with it), ``pt_only`` and ``onnx_only`` (names without
    counterpart)."""
    owner = {producer: g["name"] for g in pt for producer in g["producers"]}
    order = {g["name"]: i for i, g in enumerate(pt)}
    pairs: list[tuple[str, str]] = []
    spans: list[tuple[str, list[str]]] = []
    splits: list[tuple[str, str]] = []
    taken: set[str] = set()
    for group in ox:
        owners = sorted({owner[names[p]] for p in group["producers"] if names.get(p) in owner},
                        key=order.__getitem__)
        if len(owners) == 1 and owners[0] not in taken:
            pairs.append((owners[0], group["name"]))
            taken.add(owners[0])
        elif len(owners) == 1:
            splits.append((group["name"], owners[0]))
        elif owners:
            spans.append((group["name"], owners))
            taken.update(owners)
    paired = {o for _, o in pairs} | {o for o, _ in spans} | {o for o, _ in splits}
    return {
        "pairs": pairs, "spans": spans, "splits": splits,
        "pt_only": [g["name"] for g in pt if g["name"] not in taken],
        "onnx_only": [g["name"] for g in ox if g["name"] not in paired],
    }


CAUSES = {
    "bn-fused": ("exporter", "the exporter folded a batch norm into the convolution before it (TorchScript: "
                 "constant folding; dynamo: its optimizer): by default a group feeding a batch norm is blocked in "
                 "PyTorch but is a plain convolution's group in the file, legal there; a producer without bias "
                 "gains one (inbound + 1)"),
    "dropout-removed": ("exporter", "eval-mode dropout is not exported: by default a group feeding it is blocked "
                        "in PyTorch, legal in the file"),
    "stochastic-depth-removed": ("exporter", "torchvision's stochastic_depth (the identity in eval mode) is a "
                                 "function the PyTorch trace does not pass, so its groups are blocked and the "
                                 "residual add around it couples nothing; the exporter drops it, so in the file "
                                 "the residual joins the groups into one"),
    "opaque-in-pytorch": ("exporter", "layers that PyTorch calls inside one module or function the trace keeps "
                          "whole (nn.MultiheadAttention, torchvision's shifted_window_attention) are separate "
                          "layers in the file, their groups blocked there too"),
    "onnx-blocks": ("gap", "the ONNX frontend fails closed on the operators an exporter wrote for an op the "
                    "PyTorch frontend passes (the operator is named)"),
    "pytorch-blocks": ("gap", "the PyTorch frontend fails closed at a permute or transpose whose dims it cannot "
                       "read (computed at run time), where the ONNX frontend follows the Transpose the exporter "
                       "writes for it: groups PyTorch keeps apart are one group in the file, blocked in both "
                       "(until 2026-12-02 every torch.permute: ConvNeXt's last linear layer of each block)"),
    "folded-away": ("exporter", "the exporter computed the layer away: it reads constants only (swin_v2's "
                    "cpb_mlp on its relative coordinates table), so the dynamo exporter's optimizer stored its "
                    "result, and neither the layer nor its parameters are in the file"),
}
"""The known causes of differences: the exporter changed the graph (``exporter``), or one
frontend fails closed where the other passes (``gap``, a limitation of tunnelgraph)."""

# a transpose the PyTorch frontend blocks: dims computed at run time, or an in-place form
_PERMUTE_BLOCKS = re.compile(r"(function |method \.)(permute|transpose|movedim|moveaxis|swapaxes|swapdims)")

_REMOVED = {"feeds batch norm": "bn-fused", "feeds dropout": "dropout-removed",
            "stochastic_depth": "stochastic-depth-removed"}


def removed_causes(reasons: list[str], a_all: dict[str, Any], b_all: dict[str, Any]) -> str | None:
    """The causes when every reason names a layer the exporter removed (batch norm only where it was fused)."""
    fused = {"bn-fused": a_all["through_ops"].get("batchnorm", 0) > b_all["through_ops"].get("batchnorm", 0),
             "dropout-removed": a_all["through_ops"].get("dropout", 0) > b_all["through_ops"].get("dropout", 0),
             "stochastic-depth-removed": True}
    causes = set()
    for reason in reasons:
        cause = next((c for needle, c in _REMOVED.items() if needle in reason), None)
        if cause is None or not fused[cause]:
            return None
        causes.add(cause)
    return "+".join(sorted(causes)) if causes else None


def short_reason(reason: str) -> str:
    """A reason without its node names, to name an operator in a cause."""
    text = re.sub(r" at node '[^']*'", "", reason)
    text = re.sub(r"\([0-9, ]+\) -> \([0-9, ]+\)", "", text)
    return re.sub(r"'[^']*'", "", text).replace(", which tunnelgraph does not pass", "").strip()[:60]


def explain(a: dict[str, Any], b: dict[str, Any], a_all: dict[str, Any], b_all: dict[str, Any],
            what: str) -> str | None:
    """The cause (see ``CAUSES``) of a difference ``what`` between PyTorch group ``a`` and ONNX group ``b``.

    ``a_all`` and ``b_all`` are the same groups under every ``through=`` option (where their
    per-channel layers show). None when no known cause accounts for it."""
    if what == "legality" and not a["legal"] and b["legal"]:
        return removed_causes(a["reasons"], a_all, b_all)
    if what == "legality" and a["legal"] and not b["legal"]:
        return "onnx-blocks: " + short_reason(b["reasons"][0])
    if what == "inbound" and a_all["through_ops"].get("batchnorm", 0) > b_all["through_ops"].get("batchnorm", 0):
        gained = [p for p in a["unbiased"] if p not in b_all["unbiased"]]
        names_differ = len(b_all["unbiased"]) != len(a["unbiased"]) - len(gained)
        if len(gained) == b["inbound"] - a["inbound"] or (names_differ and b["inbound"] - a["inbound"]
                                                           == len(a["unbiased"]) - len(b_all["unbiased"])):
            return "bn-fused"
    return None


def compare(pt: dict[str, Any], ox: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Every difference between the PyTorch and ONNX groups, with its cause where a known one accounts for it.

    Each PyTorch group, and each ONNX group without counterpart, gets a status: ``same``,
    ``explained`` (by the exporter), ``gap`` (a frontend fails closed) or ``unexplained``; a
    layer that no group holds, on either side (:func:`analyse`), is an unexplained difference
    of its own (``ungrouped``)."""
    matched = match(pt["groups"]["all"], ox["groups"]["all"], names)
    pt_all = {g["name"]: g for g in pt["groups"]["all"]}
    ox_all = {g["name"]: g for g in ox["groups"]["all"]}
    differences: list[dict[str, Any]] = []
    status: dict[str, list[str | None]] = {g["name"]: [] for g in pt["groups"]["all"]}

    def note(groups: list[str], difference: dict[str, Any]) -> None:
        differences.append(difference)
        for name in groups:
            status.setdefault(name, []).append(difference["cause"])

    for rule in RULES:
        pt_by = {g["name"]: g for g in pt["groups"][rule]}
        ox_by = {g["name"]: g for g in ox["groups"][rule]}
        for a_name, b_name in matched["pairs"]:
            a, b = pt_by[a_name], ox_by[b_name]
            found = []
            if a["legal"] != b["legal"]:
                found.append("legality")
            if a["size"] != b["size"]:
                found.append("size")
            if a["legal"] and b["legal"]:
                found += [what for what in ("inbound", "outbound") if a[what] != b[what]]
            for what in found:
                valued = what in ("size", "inbound", "outbound")
                note([a_name], {
                    "rule": rule, "kind": what, "pytorch": a_name, "onnx": b_name,
                    "pytorch_legal": a["legal"], "onnx_legal": b["legal"],
                    "pytorch_value": a[what] if valued else a["reasons"][:3],
                    "onnx_value": b[what] if valued else b["reasons"][:3],
                    "cause": explain(a, b, pt_all[a_name], ox_all[b_name], what),
                })
    for b_name, owners in matched["spans"]:
        blocked = [name for name in owners if any("stochastic_depth" in r for r in pt_all[name]["reasons"])]
        cause = "stochastic-depth-removed" if len(blocked) >= len(owners) - 1 else None
        if cause is None and not ox_all[b_name]["legal"] and all(
            not pt_all[name]["legal"] and any(_PERMUTE_BLOCKS.search(r) for r in pt_all[name]["reasons"])
            for name in owners
        ):
            cause = "pytorch-blocks"
        note(owners, {"rule": "all", "kind": "spans", "pytorch": owners, "onnx": b_name,
                      "onnx_legal": ox_all[b_name]["legal"], "cause": cause})
    for b_name, owner in matched["splits"]:
        note([owner], {"rule": "all", "kind": "split", "pytorch": owner, "onnx": b_name, "cause": None})
    named = {names.get(layer) for layer in ox["layers"]}
    for name in matched["pt_only"]:
        g = pt_all[name]
        cause = None
        if not any(p in named or any(q.startswith(p + ".") for q in ox["params"]) for p in g["producers"]):
            cause = "folded-away"
        note([name], {"rule": "all", "kind": "pytorch only", "pytorch": name, "onnx": None,
                      "pytorch_legal": g["legal"], "cause": cause})
    pt_layers = set(pt["layers"])
    for name in matched["onnx_only"]:
        g = ox_all[name]
        mapped = [names.get(p) for p in g["producers"]]
        cause = None
        if not g["legal"] and not any(m in pt_layers for m in mapped):
            cause = "opaque-in-pytorch"
        note([f"onnx:{name}"], {"rule": "all", "kind": "onnx only", "pytorch": None, "onnx": name,
                                "onnx_legal": g["legal"], "onnx_value": g["reasons"][:3], "cause": cause})
    for side, found in (("pytorch", pt["ungrouped"]), ("onnx", ox["ungrouped"])):
        for layer in found:  # channel_groups reports every layer: one in no group is not explained
            where = {"pytorch": None, "onnx": None, side: layer}
            note([f"{side} layer:{layer}"], {"rule": "all", "kind": "ungrouped", **where, "cause": None})
    tally = {"same": 0, "explained": 0, "gap": 0, "unexplained": 0}
    for causes in status.values():
        if not causes:
            tally["same"] += 1
        elif None in causes:
            tally["unexplained"] += 1
        elif any(CAUSES[c.split(":")[0].split("+")[0]][0] == "gap" for c in causes if c):
            tally["gap"] += 1
        else:
            tally["explained"] += 1
    return {"pairs": len(matched["pairs"]),
            "status": tally, "differences": differences,
            "ungrouped_onnx": ox["ungrouped"], "ungrouped_pytorch": pt["ungrouped"]}


def export(model: Any, x: Any, exporter: str, path: Path) -> None:
    """Write ``model`` at input ``x`` to ``path`` with ``exporter`` (``torchscript`` or ``dynamo``)."""
    import torch

    if exporter == "torchscript":
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, do_constant_folding=True)
    else:
        program = torch.onnx.export(model, (x,), dynamo=True)
        assert program is not None  # dynamo=True returns the program
        program.save(str(path))


def rounding_floor(path: Path, x: Any, draws: int = 2) -> float:
    """How far the file's output moves (max relative error) when every float initializer moves one ulp.

    Each of ``draws`` copies moves every value one representable number up or down at random
    and runs in onnxruntime like the rewrite's check: the error that rounding alone causes in
    a model that amplifies it, the least a rewrite (which changes the order of sums) can show.
    Each copy is read without its external data and takes its tensors one at a time, moved:
    it holds the model once."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    import tunnelgraph as tg

    worst = 0.0
    for draw in range(draws):
        generator = np.random.default_rng(draw)
        moved = onnx.load(str(path), load_external_data=False)
        for tensor in moved.graph.initializer:
            array = numpy_helper.to_array(tensor, base_dir=str(path.parent))
            if array.dtype in (np.float32, np.float64) and array.size:
                direction = np.where(generator.random(array.shape) < 0.5, np.inf, -np.inf).astype(array.dtype)
                array = np.nextafter(array, direction)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
            del array
        worst = max(worst, tg.verify(str(path), moved, x).max_rel)
        del moved
    return worst


def rewrite_and_verify(path: Path, x: Any, legal: list[str], args: argparse.Namespace,
                       rng: random.Random, row: dict[str, Any], memory: "PeakMemory") -> None:
    """Rewrite one random channel of up to ``args.cap`` legal groups of ``path``, one after the other; verify.

    The model is read once and rewritten in place (``inplace=True``: only the edited
    initializers are replaced), and the file is the reference onnxruntime reads, so a
    model is in memory once however many groups are rewritten."""
    import numpy as np

    import tunnelgraph as tg
    from tunnelgraph.frontends.onnx import read_onnx

    through = RULES["all"]
    chosen = sorted(rng.sample(range(len(legal)), min(args.cap, len(legal))))
    memory.stage(row, "read")
    current = read_onnx(path)[0]  # the form tg.rewrite edits in place (constants as initializers)
    generator = np.random.default_rng(rng.randrange(2**32))
    steps: list[dict[str, Any]] = []
    for index in chosen:
        memory.stage(row, f"rewrite {legal[index]}")
        sites = {s.name: s for s in tg.find_sites(current, through=through)}
        group = [s for s in sites.values() if s.group_name == legal[index]]
        site = group[rng.randrange(len(group))]
        lam = generator.uniform(-0.5, 1.5, site.outbound_size)
        current = tg.rewrite(current, site, lam, through=through, inplace=True)
        steps.append({"site": site.name, "outbound": site.outbound_size, "seed_lam": lam[:3].tolist()})
    row["rewritten"] = len(steps)
    row["sites_rewritten"] = [s["site"] for s in steps]
    if not steps:
        row.update(max_rel=0.0, ok=True)
        return
    memory.stage(row, "verify")
    report = tg.verify(str(path), current, x)
    del current
    row.update(max_rel=report.max_rel, max_abs=report.max_abs, passed=report.passed, ok=report.max_rel <= REL32)
    if row["ok"]:
        return
    memory.stage(row, "rounding floor")
    row["floor32"] = rounding_floor(path, x)
    limit = max(REL32, FLOOR_FACTOR * row["floor32"])
    row["ok"] = report.max_rel <= limit
    if row["ok"]:
        return
    # one by one from the original, to name the site(s) that break
    memory.stage(row, "bisect")
    broken = []
    in_original = {s.name: s for s in tg.find_sites(str(path), through=through)}
    for step in steps:
        name = step["site"]
        if name not in in_original:  # a clone made by an earlier step: not in the original
            continue
        alone = in_original[name]
        lam = generator.uniform(-0.5, 1.5, alone.outbound_size)
        single = tg.rewrite(read_onnx(path)[0], alone, lam, through=through, inplace=True)
        report = tg.verify(str(path), single, x)
        del single
        if report.max_rel > limit:
            broken.append({"site": name, "max_rel": report.max_rel})
    row["broken"] = broken


class PeakMemory:
    """The child's peak resident memory per stage (VmHWM, reset at each stage through
    ``/proc/self/clear_refs``), in GiB: ``row["memory_gib"]`` by stage, the resident memory
    when each stage began (``row["memory_held_gib"]``: freed memory that the allocator keeps
    counts as held) and ``row["peak_rss_gib"]``.

    Linux only; elsewhere nothing is recorded."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.peaks: dict[str, float] = {}
        self.held: dict[str, float] = {}

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) / 2**20
        except OSError:
            pass
        return None

    def stage(self, row: dict[str, Any], name: str | None) -> None:
        """End the stage running (its peak goes into ``row``) and start ``name`` (None: the end)."""
        if name is not None:
            row["stage"] = name
        peak = self._status("VmHWM")
        if peak is None:
            return
        if self.current is not None:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), peak)
            row["memory_gib"] = {stage: round(value, 2) for stage, value in self.peaks.items()}
            row["memory_held_gib"] = {stage: round(value, 2) for stage, value in self.held.items()}
            row["peak_rss_gib"] = round(max(self.peaks.values()), 2)
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # VmHWM := VmRSS
        except OSError:
            pass
        held = self._status("VmRSS")
        if name is not None and held is not None:
            self.held.setdefault(name, held)
        self.current = name


def calibrate(model: Any, size: int, seed: int, batches: int = 4) -> None:
    """Re-estimate every batch norm's statistics of ``model`` (in place) on random ``size`` batches of 8.

    Only the batch norms run in training mode (dropout and stochastic depth stay off), with
    a cumulative average, so each layer's output is normalised again on the data."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    generator = torch.Generator().manual_seed(seed)
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, 3, size, size, generator=generator))
    model.eval()


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of one model: one per exporter.

    Where an exporter fails at the model's size (the TorchScript exporter refuses adaptive
    pooling to a size that does not divide the input's), it is tried at the larger sizes of
    ``SIZES``; the failure stays in the row (``export_error_at``)."""
    import torch
    import torchvision

    import tunnelgraph as tg

    warnings.simplefilter("ignore")
    torch.manual_seed(args.seed)
    model = torchvision.models.get_model(name, weights=None).eval()
    first = pick_size(model, name, args.size)
    weights = "fresh"
    if not args.fresh:
        generic = tg.perturbed(model, generator=torch.Generator().manual_seed(args.seed)).eval()
        with torch.no_grad():
            finite = bool(torch.isfinite(generic(torch.randn(1, 3, first, first))).all())
        # a deep perturbed network can overflow float32 (activations that grow block by block):
        # its outputs compare as nan, so such a model keeps its fresh weights
        model, weights = (generic, "perturbed") if finite else (model, "fresh (perturbed output not finite)")
        del generic
    if args.calibrate:
        calibrate(model, first, args.seed)
        weights += ", calibrated"
    params = sum(p.numel() for p in model.parameters())
    pytorch: dict[int, tuple[Any, dict[str, Any], set[str], float]] = {}

    def reference(size: int) -> tuple[Any, dict[str, Any], set[str], float]:
        """The input and the PyTorch model's groups at ``size`` (traced once per size)."""
        if size not in pytorch:
            x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
            started = time.perf_counter()
            graph = tg.trace(model, x)
            modules = {node.module for node in graph if node.module}
            pytorch[size] = (x, analyse(graph), modules, time.perf_counter() - started)
        return pytorch[size]

    rows = []
    folder = Path(tempfile.mkdtemp(prefix="onnx_exporters_"))
    for exporter in args.exporters.split(","):
        row: dict[str, Any] = {"model": name, "exporter": exporter, "params": params, "weights": weights}
        memory = PeakMemory()
        begun = time.perf_counter()
        rng = random.Random(f"{args.seed}/{name}/{exporter}")
        (folder / exporter).mkdir(exist_ok=True)
        path = folder / exporter / f"{name}.onnx"  # large models: external data files beside it
        sizes = [first] + ([s for s in SIZES if s > first] if args.size == "auto" else [])
        try:
            for size in sizes:
                memory.stage(row, "pytorch")
                x, pt, modules, seconds = reference(size)
                row.update(size=size, pytorch=counts(pt["groups"]), pytorch_seconds=seconds)
                try:
                    memory.stage(row, "export")
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        export(model, x, exporter, path)
                    row.pop("export_error", None)
                    break
                except Exception as error:
                    row["export_error"] = f"{type(error).__name__}: {str(error)[:500]}"
                    row.setdefault("export_error_at", {})[size] = row["export_error"][:200]
            if "export_error" not in row:
                memory.stage(row, "export check")
                row["export_rel"] = tg.verify(model, str(path), x).max_rel
                memory.stage(row, "load_onnx")
                onnx_graph = tg.load_onnx(str(path))
                names = pytorch_names(onnx_graph.source, [n.module or n.name for n in onnx_graph], modules)
                memory.stage(row, "analyse")
                ox = analyse(onnx_graph)
                del onnx_graph
                row["onnx"] = counts(ox["groups"])
                memory.stage(row, "compare")
                row.update(compare(pt, ox, names))
                legal = [g["name"] for g in ox["groups"]["all"] if g["legal"]]
                rewrite_and_verify(path, x, legal, args, rng, row, memory)
            memory.stage(row, None)
            row.pop("stage", None)
        except Exception as error:
            memory.stage(row, row.get("stage"))
            row["error"] = f"{type(error).__name__}: {str(error)[:500]}"
            row["traceback"] = traceback.format_exc()[-3000:]
        row["seconds"] = time.perf_counter() - begun
        shutil.rmtree(folder / exporter, ignore_errors=True)
        rows.append(row)
        gc.collect()
    shutil.rmtree(folder, ignore_errors=True)
    return rows


# -- the parent: every model, one child each ------------------------------------------------------------


def child(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run ``name`` in a child process; a crash or timeout becomes an error row per exporter."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--out", out, "--cap", str(args.cap),
               "--seed", str(args.seed), "--size", args.size, "--exporters", args.exporters]
    command += ["--fresh"] if args.fresh else []
    command += ["--calibrate"] if args.calibrate else []
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        failure = None
        if done.returncode < 0:  # killed: SIGKILL is what the kernel sends when memory runs out
            failure = (f"child killed by {signal.Signals(-done.returncode).name} (out of memory?): "
                       f"{done.stderr[-600:]}")
        elif done.returncode != 0:
            failure = f"child exited with {done.returncode}: {done.stderr[-600:]}"
    except subprocess.TimeoutExpired:
        failure = f"child timed out after {args.timeout} s"
    try:
        rows: list[dict[str, Any]] = json.loads(Path(out).read_text()) if failure is None else []
    finally:
        Path(out).unlink(missing_ok=True)
    if failure is not None:
        seconds = time.perf_counter() - started
        rows = [{"model": name, "exporter": e, "error": failure, "seconds": seconds} for e in args.exporters.split(",")]
    return rows


def summary_cell(row: dict[str, Any]) -> str:
    """Group statuses as ``same/explained/gap/unexplained`` and the causes of the differences, for the table."""
    tally = row["status"]
    causes: Counter[str] = Counter()
    for difference in row.get("differences", []):
        cause = difference["cause"] or f"?{difference['kind']}"
        causes[cause.split(":")[0]] += 1
    text = ", ".join(f"{cause} {count}" for cause, count in sorted(causes.items()))
    return (f"{tally['same']}/{tally['explained']}/{tally['gap']}/{tally['unexplained']}"
            + (f" ({text})" if text else ""))


HEADER = ["model", "exporter", "size", "pt groups", "pt legal", "pt sites", "onnx groups", "onnx legal",
          "onnx sites", "groups same/expl/gap/unexpl (differences by cause)", "rewritten", "max rel", "ok", "s"]
WIDTHS = (20, 11, 4, 6, 8, 11, 6, 8, 11, 44, 4, 8, 4, 5)


def table_row(row: dict[str, Any], markdown: bool = False) -> str:
    """One row of the table (legal and sites as ``default/all``)."""
    def pair(c: dict[str, Any], key: str) -> str:
        return f"{c[key]['default']}/{c[key]['all']}"

    def failure(text: str) -> str:
        return text.replace("\n", " ")[:110 if markdown else 60]

    size = str(row.get("size", "-")) + ("*" if row.get("export_error_at") else "")
    weights = row.get("weights", "")
    model = row["model"] + (" (fresh)" if weights.startswith("fresh (") else "")
    model += " (calibrated)" if weights.endswith("calibrated") else ""
    if "pytorch" not in row:
        cells = [model, row["exporter"], size] + ["-"] * 6 + ["ERROR " + failure(row["error"]), "-", "-",
                                                                      "no"]
    else:
        pt = row["pytorch"]
        cells = [model, row["exporter"], size, str(pt["groups"]), pair(pt, "legal"), pair(pt, "sites")]
        if "export_error" in row:
            cells += ["-", "-", "-", "EXPORT FAILED: " + failure(row["export_error"]), "-", "-", "-"]
        elif "onnx" not in row:
            cells += ["-", "-", "-", f"ERROR at {row.get('stage')}: " + failure(row["error"]), "-", "-", "no"]
        else:
            ox = row["onnx"]
            cells += [str(ox["groups"]), pair(ox, "legal"), pair(ox, "sites")]
            cells.append(summary_cell(row) if "status" in row else "-")
            if "max_rel" not in row:
                cells += ["-", "-", f"ERROR at {row.get('stage')}: " + failure(row.get("error", "?"))]
            else:
                floor = f" (floor {row['floor32']:.0e})" if "floor32" in row else ""
                cells += [str(row["rewritten"]), f"{row['max_rel']:.1e}{floor}", "yes" if row["ok"] else "BUG"]
    cells.append(f"{row['seconds']:.0f}")
    if markdown:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return " ".join(c.ljust(w) for c, w in zip(cells, WIDTHS))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER) + "\n"
    return header + "\n".join(table_row(row, markdown=True) for row in rows) + "\n"


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per exporter: models, export failures, errors, group statuses, sites rewritten, broken files."""
    result: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = result.setdefault(row["exporter"], {
            "models": 0, "analysed": 0, "export_failed": 0, "exported_at_larger_size": 0, "errors": 0,
            "same": 0, "explained": 0, "gap": 0, "unexplained": 0, "rewritten": 0, "broken": 0, "at_floor": 0,
            "worst_rel": 0.0,
        })
        entry["models"] += 1
        entry["export_failed"] += "export_error" in row
        entry["exported_at_larger_size"] += bool(row.get("export_error_at")) and "export_error" not in row
        entry["errors"] += "error" in row
        if "status" in row:
            entry["analysed"] += 1
            for key, value in row["status"].items():
                entry[key] += value
        entry["rewritten"] += row.get("rewritten", 0)
        entry["broken"] += row.get("ok") is False
        entry["at_floor"] += row.get("ok") is True and "floor32" in row
        entry["worst_rel"] = max(entry["worst_rel"], row.get("max_rel", 0.0))
    return result


def details(rows: list[dict[str, Any]]) -> list[str]:
    """The unexplained differences and gaps, bugs and errors, one line each."""
    lines = []
    for row in rows:
        for difference in row.get("differences", []):
            cause = difference["cause"]
            if cause is None or cause.startswith("onnx-blocks"):
                values = ""
                if "pytorch_value" in difference or "onnx_value" in difference:
                    values = f" ({difference.get('pytorch_value', '-')} / {difference.get('onnx_value', '-')})"
                lines.append(f"- {row['model']} {row['exporter']} [{difference['rule']}] {difference['kind']}"
                             f"{'' if cause is None else ' ' + cause}: pytorch {difference['pytorch']}, "
                             f"onnx {difference['onnx']}{values}")
        if row.get("ok") is False:
            lines.append(f"- BUG {row['model']} {row['exporter']}: max rel {row.get('max_rel')}, "
                         f"broken sites {row.get('broken')}")
        if "error" in row:
            lines.append(f"- ERROR {row['model']} {row['exporter']} at {row.get('stage')}: {row['error'][:300]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="torchvision model names, comma-separated (default: list_models())")
    parser.add_argument("--exporters", default=",".join(EXPORTERS), help="torchscript,dynamo (default: both)")
    parser.add_argument("--size", default="auto", help="input side, or 'auto' (default)")
    parser.add_argument("--cap", type=int, default=8, help="legal groups rewritten per file (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="freshly built weights (not tg.perturbed)")
    parser.add_argument("--calibrate", action="store_true", help="re-estimate batch-norm statistics on random data")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per model (default 3600)")
    parser.add_argument("--json", help="write the rows to this file (after every model)")
    parser.add_argument("--markdown", help="write the table, summary and details as Markdown to this file")
    parser.add_argument("--from-json", help="print the table of earlier runs' --json files (comma-separated; "
                        "a later file's rows replace an earlier one's) instead of running")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.out).write_text(json.dumps(run_model(args.worker, args), default=str))
        return 0
    rows: list[dict[str, Any]] = []
    print(" ".join(h.ljust(w) for h, w in zip(HEADER, WIDTHS)), flush=True)
    if args.from_json:
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for file in args.from_json.split(","):  # a later file's rows replace an earlier one's
            merged.update({(row["model"], row["exporter"]): row for row in json.loads(Path(file).read_text())})
        rows = sorted(merged.values(), key=lambda row: (row["model"], EXPORTERS.index(row["exporter"])))
        for row in rows:
            print(table_row(row))
    else:
        import torchvision

        names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
        for name in names:
            for row in child(name, args):
                rows.append(row)
                print(table_row(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    totals = summary(rows)
    print()
    for exporter, entry in totals.items():
        print(f"{exporter}: " + ", ".join(f"{key} {value:.1e}" if isinstance(value, float) else f"{key} {value}"
                                        for key, value in entry.items()))
    lines = details(rows)
    print("\n".join([""] + lines))
    for row in rows:
        if "memory_gib" in row:
            stage = max(row["memory_gib"], key=row["memory_gib"].get)
            print(f"- memory {row['model']} {row['exporter']}: peak {row['peak_rss_gib']:.2f} GiB resident "
                  f"({stage}; {row['params'] * 4 / 2**30:.2f} GiB of float32 parameters)")
    if args.markdown:
        text = markdown_table(rows) + "\n" + "\n".join(
            f"- {exporter}: " + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in e.items())
            for exporter, e in totals.items()) + "\n\n" + "\n".join(lines) + "\n"
        Path(args.markdown).write_text(text)
    bugs = [r for r in rows if r.get("ok") is False or ("error" in r and "export_error" not in r)]
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())

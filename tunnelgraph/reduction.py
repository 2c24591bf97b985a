"""Sussmann reduction: remove every reducible unit, keeping the function (docs/MATH.md section 2).

Each finding of :mod:`tunnelgraph.analysis.reducibility` becomes a channel
edit of the same algebra the tunnels use: inconsequential units are
removed; redundant, negated and ReLU-scaled units are folded into their
partner (their outbound weights added with the relation's factor); constant
units, and the offset of a sigmoid complement, are additionally folded into
the consumers' biases.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence, Union

import torch
import torch.nn as nn

from tunnelgraph.analysis.groups import ChannelGroup, channel_groups, check_through
from tunnelgraph.analysis.reducibility import Finding, parametric_findings
from tunnelgraph.backends.pytorch import apply_plan, bias_shift, consumer_inputs, weights_of
from tunnelgraph.errors import RewriteError
from tunnelgraph.frontends.fx import trace
from tunnelgraph.rewrite import edits
from tunnelgraph.rewrite.plan import plan_edit
from tunnelgraph.statistics.activity import empirical_findings, unit_measures
from tunnelgraph.equivalence import EquivalenceReport, verify

logger = logging.getLogger(__name__)

ExampleInputs = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass(frozen=True)
class ReductionReport:
    """What :func:`reduce` did.

    Attributes:
        applied: the findings whose units were removed, in the order applied.
        skipped: findings that were not applied, each with the reason.
        parameters_before, parameters_after: parameter counts of the two models.
        equivalence: the reduced model against the original on the example inputs.
    """

    applied: tuple[Finding, ...]
    skipped: tuple[tuple[Finding, str], ...]
    parameters_before: int
    parameters_after: int
    equivalence: EquivalenceReport | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "applied": [f.to_dict() for f in self.applied],
            "skipped": [{**f.to_dict(), "reason": reason} for f, reason in self.skipped],
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "max_abs_diff": None if self.equivalence is None else self.equivalence.max_abs,
            "max_rel_diff": None if self.equivalence is None else self.equivalence.max_rel,
        }

    def to_markdown(self) -> str:
        lines = [
            f"# tunnelgraph reduction: {self.parameters_before} -> {self.parameters_after} parameters",
            "",
            "| unit | condition | evidence | action |",
            "|---|---|---|---|",
        ]
        lines += [f"| {f.unit} | {f.condition} | {f.evidence} | {f.action} |" for f in self.applied]
        for finding, reason in self.skipped:
            lines.append(f"| {finding.unit} | {finding.condition} | {finding.evidence} | not applied: {reason} |")
        if self.equivalence is not None:
            lines += ["", f"function change on the example inputs: {self.equivalence}"]
        return "\n".join(lines) + "\n"


def reduce(
    model: Any,
    example_inputs: ExampleInputs | None = None,
    *,
    data: Iterable[Any] | None = None,
    batches: int | None = None,
    tol: float = 1e-12,
    through: Iterable[str] = (),
    progress: bool = False,
) -> tuple[nn.Module, ReductionReport]:
    """Remove every reducible unit; return the smaller model and a report.

    Args:
        model: the network, a PyTorch module or an ONNX model (``ModelProto``
            or ``.onnx`` path, reduced into a new ``ModelProto``); not modified.
        example_inputs: inputs of its forward (to trace it, to read the
            constant activations of constant units, and to verify); for an
            ONNX model, random inputs of its declared shapes by default.
        data: optional batches (``(inputs, targets)`` or inputs; ``batches``
            limits them). Units the data show reducible within ``tol`` are
            then removed too, using the measured relation (the mean of a
            constant unit, the affine fit of a redundant one): an
            approximation whose function change the report gives.
        tol: relative tolerance of the parametric tests (see
            :func:`~tunnelgraph.analysis.reducibility.parametric_findings`)
            and of the empirical ones (see
            :func:`~tunnelgraph.statistics.activity.empirical_findings`).
        through: per-channel operations groups may pass (see ``find_sites``).

    Units are removed group by group, re-analysing after each group, until
    nothing reducible is left. A finding that cannot be applied exactly (a
    constant unit read by a conv that pads, a consumer without bias) is
    reported as skipped with the reason.
    """
    from tunnelgraph.api import _is_onnx

    if _is_onnx(model):
        if data is not None:
            raise TypeError("reduce(data=...) measures PyTorch models; convert with tg.to_torch first")
        return _reduce_onnx(model, example_inputs, tol, through)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    chosen = check_through(through)
    before = sum(p.numel() for p in model.parameters())
    current = model
    applied: list[Finding] = []
    skipped: dict[str, tuple[Finding, str]] = {}
    while True:
        graph = trace(current, inputs)
        groups = channel_groups(graph, chosen)
        findings = parametric_findings(graph, groups, weights_of(current), tol=tol)
        if data is not None:
            known = {f.unit for f in findings}
            measures = unit_measures(current, groups, data, batches=batches, progress=progress)
            findings += [f for f in empirical_findings(groups, measures, tol=tol) if f.unit not in known]
        findings = [f for f in findings if f.unit not in skipped]
        if not findings:
            break
        group = next(g for g in groups if g.name == findings[0].group)
        mine = [f for f in findings if f.group == group.name]
        current, done, refused = _reduce_group(current, group, mine, inputs)
        applied.extend(done)
        skipped.update({f.unit: (f, reason) for f, reason in refused})
    after = sum(p.numel() for p in current.parameters())
    equivalence = verify(model, current, inputs) if applied else None
    report = ReductionReport(tuple(applied), tuple(skipped.values()), before, after, equivalence)
    logger.info("reduced %d units: %d -> %d parameters", len(applied), before, after)
    return (current if applied else copy.deepcopy(model)), report


def _reduce_group(
    model: nn.Module, group: ChannelGroup, findings: list[Finding], inputs: tuple[torch.Tensor, ...]
) -> tuple[nn.Module, list[Finding], list[tuple[Finding, str]]]:
    """Apply the findings of one group as one composed channel edit plus consumer-bias shifts."""
    outbound = [s for s in group.slices if s.role == "outbound"]
    needs_values = any(_needs_shift(f) for f in findings)
    seen = consumer_inputs(model, [s.module for s in outbound], inputs) if needs_values else {}
    edit = edits.identity(group.size)
    shifts: dict[str, torch.Tensor] = {}
    done: list[Finding] = []
    refused: list[tuple[Finding, str]] = []
    size = group.size
    for finding in sorted(findings, key=lambda f: -f.channel):
        try:
            extra = _bias_shifts(model, group, finding, seen)
        except RewriteError as error:
            refused.append((finding, str(error)))
            continue
        if finding.condition in ("inconsequential", "constant"):
            step = edits.remove(size, finding.channel)
        else:
            assert finding.partner is not None
            step = edits.fold(size, finding.channel, finding.partner, finding.factor)
        edit = edit.then(step)
        size -= 1
        for name, delta in extra.items():
            shifts[name] = shifts[name] + delta if name in shifts else delta
        done.append(finding)
    if not done:
        return model, done, refused
    result = apply_plan(model, plan_edit(group, edit))
    with torch.no_grad():
        for name, delta in shifts.items():
            bias = result.get_submodule(name).bias
            bias.add_(delta.to(bias.dtype))
    return result, done, refused


def _bias_shifts(
    model: nn.Module,
    group: ChannelGroup,
    finding: Finding,
    seen: dict[str, torch.Tensor],
    module_name: Any = lambda name: name,
) -> dict[str, torch.Tensor]:
    """Consumer bias changes that removing ``finding``'s unit needs (constant part of its activation).

    Keyed by consumer layer name; ``module_name`` maps a layer name to the
    module of ``model`` that computes it.
    """
    if not _needs_shift(finding):
        return {}
    shifts = {}
    for weight_slice in (s for s in group.slices if s.role == "outbound"):
        module = model.get_submodule(module_name(weight_slice.module))
        if getattr(module, "bias", None) is None:
            raise RewriteError(f"consumer '{weight_slice.module}' has no bias to take the constant")
        channel = finding.channel
        values = _channel_values(seen[module_name(weight_slice.module)], weight_slice, channel, module)
        if finding.condition == "constant" and finding.exact:
            _check_constant(values)
            values = values[0]
        else:  # x = offset (+ factor * x_partner): the offset times the unit's outbound weights
            values = torch.full_like(values[0], finding.offset)
        shifts[weight_slice.module] = bias_shift(module, weight_slice, channel, values)
    return shifts


def _needs_shift(finding: Finding) -> bool:
    return finding.condition == "constant" or finding.offset != 0.0


def _channel_values(seen: torch.Tensor, weight_slice: Any, channel: int, module: nn.Module) -> torch.Tensor:
    """The channel's entries of the consumer's recorded input, every sample."""
    axis = seen.dim() - 1 if isinstance(module, nn.Linear) else 1
    start = weight_slice.offset + channel * weight_slice.block
    return seen.narrow(axis, start, weight_slice.block)


def _check_constant(values: torch.Tensor) -> None:
    scale = float(values.abs().max())
    if scale and float((values - values[:1]).abs().max()) > 1e-9 * scale:
        raise RewriteError("its activation differs between samples, so it is not constant")


def _reduce_onnx(
    model: Any, example_inputs: ExampleInputs | None, tol: float, through: Iterable[str]
) -> tuple[Any, ReductionReport]:
    """:func:`reduce` for ONNX: edits on initializers; constants read through :func:`to_torch`."""
    import numpy as np

    # tunnelgraph's ONNX modules first: without the onnx extra they raise the error that names it
    from tunnelgraph.backends.onnx import apply_plan_onnx, initializer_arrays
    from tunnelgraph.backends.onnx_torch import to_torch, torch_name
    from tunnelgraph.backends.onnx import random_inputs
    from tunnelgraph.frontends.onnx import load_onnx, read_onnx
    from onnx import numpy_helper

    proto = read_onnx(model)[0]
    if example_inputs is None:
        example_inputs = tuple(torch.from_numpy(array) for array in random_inputs(proto))
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    chosen = check_through(through)
    count = lambda m: sum(int(np.prod(t.dims)) for t in m.graph.initializer)  # noqa: E731
    current = proto
    applied: list[Finding] = []
    skipped: dict[str, tuple[Finding, str]] = {}
    while True:
        graph = load_onnx(current)
        groups = channel_groups(graph, chosen)
        findings = [
            f for f in parametric_findings(graph, groups, initializer_arrays(current), tol=tol)
            if f.unit not in skipped
        ]
        if not findings:
            break
        group = next(g for g in groups if g.name == findings[0].group)
        mine = [f for f in findings if f.group == group.name]
        view = to_torch(current) if any(_needs_shift(f) for f in mine) else None
        outbound = [s for s in group.slices if s.role == "outbound"]
        seen = consumer_inputs(view, [torch_name(s.module) for s in outbound], inputs) if view is not None else {}
        edit, size, shifts = edits.identity(group.size), group.size, {}
        for finding in sorted(mine, key=lambda f: -f.channel):
            try:
                extra = _bias_shifts(view, group, finding, seen, torch_name) if view is not None else {}
                names = {name: _onnx_bias(graph, current, name) for name in extra}
            except RewriteError as error:
                skipped[finding.unit] = (finding, str(error))
                continue
            step = (
                edits.remove(size, finding.channel)
                if finding.condition in ("inconsequential", "constant")
                else edits.fold(size, finding.channel, finding.partner, finding.factor)
            )
            edit, size = edit.then(step), size - 1
            for layer, delta in extra.items():
                bias, scale = names[layer]
                shifts[bias] = shifts.get(bias, 0) + delta.double().numpy() / scale
            applied.append(finding)
        if size == group.size:
            continue
        current = apply_plan_onnx(current, plan_edit(group, edit))
        for tensor in current.graph.initializer:
            if tensor.name in shifts:
                array = numpy_helper.to_array(tensor)
                tensor.CopyFrom(numpy_helper.from_array((array + shifts[tensor.name]).astype(array.dtype), tensor.name))
    equivalence = verify(proto, current, inputs) if applied else None
    return current, ReductionReport(tuple(applied), tuple(skipped.values()), count(proto), count(current), equivalence)


def _onnx_bias(graph: Any, model: Any, layer: str) -> tuple[str, float]:
    """The initializer holding ``layer``'s bias, and the factor the layer multiplies it by (Gemm's beta)."""
    node = next((n for n in graph if n.module == layer and "bias" in n.params), None)
    if node is None:
        raise RewriteError(f"consumer '{layer}' has no bias initializer to take the constant")
    scale = 1.0
    if node.attrs.get("op_type") == "Gemm":
        onnx_node = next(n for n in model.graph.node if n.output[0] == node.name)
        for attribute in onnx_node.attribute:
            if attribute.name == "beta":
                scale = float(attribute.f)
    return node.params["bias"].name, scale

"""Sussmann reducibility read off the weights (docs/MATH.md section 2).

A hidden unit (channel ``c`` of a group) is reducible when

- **inconsequential** (1a): every outbound weight of ``c``, across every
  consumer, is zero;
- **constant** (1b): every inbound weight of ``c`` (biases excepted), across
  every producer, is zero, so its activation is the same for every input;
  or, in a group with one producer, a batch norm on the way scales ``c``
  by zero;
- **redundant** (1c): another channel ``p`` of the group has the same
  inbound weights, biases and per-channel parameters, so ``x_c = x_p``.

and, as named extras for specific activations (the channels' chain must
consist of operations that keep the relation):

- **negated**: inbound weights and bias of ``c`` are those of ``p``
  negated, and every operation on the way is odd (tanh, softsign, linear
  pooling, adds): ``x_c = -x_p``;
- **sigmoid_complement**: negated inbound weights into a sigmoid:
  ``x_c = 1 - x_p``;
- **relu_scaled**: inbound weights and bias of ``c`` are ``alpha > 0`` times
  those of ``p``, and every operation on the way is positively homogeneous
  (ReLU, leaky ReLU, pooling, adds): ``x_c = alpha * x_p``.

Each finding says what makes the unit removable. Weights come as a mapping
from parameter name to array, so any frontend (PyTorch, ONNX) can supply
them; nothing here runs the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from tunnelgraph.analysis.groups import ChannelGroup, ParamSlice
from tunnelgraph.ir import Graph, OpKind

Weights = Mapping[str, np.ndarray]

CONDITIONS = ("inconsequential", "constant", "redundant", "negated", "sigmoid_complement", "relu_scaled")

# Names are the IR's framework-neutral ones (tunnelgraph.ir.ACTIVATION_FUNCTIONS and
# POOLING_FUNCTIONS): the frontends translate each framework's spelling, so a model gets the
# same findings whether it comes as PyTorch or as ONNX.
_ODD_ACTIVATIONS = {"tanh", "softsign", "tanhshrink", "neg"}
_HOMOGENEOUS_ACTIVATIONS = {"relu", "leaky_relu", "prelu", "abs", "neg"}
_LINEAR_POOLING = {"avg", "mean", "gather"}
_HOMOGENEOUS_POOLING = {"max", "lp"}
_PLAIN = {"dropout", "identity", "flatten", "concat", "transpose"}  # each moves entries, no more


@dataclass(frozen=True)
class Finding:
    """One reducible unit and what makes it so.

    Attributes:
        unit: ``"group[channel]"``.
        group: the group's name.
        channel: the unit's channel in the group.
        condition: one of :data:`CONDITIONS`.
        evidence: what was measured or read, in words and numbers.
        partner: for relations between two units, the channel ``p`` with
            ``x_unit = factor * x_p + offset``.
        factor, offset: the relation's coefficients.
        exact: read off the weights (True) or measured on data within a
            tolerance (False).
    """

    unit: str
    group: str
    channel: int
    condition: str
    evidence: str
    partner: int | None = None
    factor: float = 1.0
    offset: float = 0.0
    exact: bool = True

    @property
    def action(self) -> str:
        """The function-preserving transformation that removes the unit (docs/MATH.md section 2)."""
        if self.condition == "inconsequential":
            return "delete the unit"
        if self.condition == "constant":
            return "fold its constant activation into the consumers' biases, then delete it"
        target = f"{self.group}[{self.partner}]"
        if self.condition == "sigmoid_complement":
            return f"subtract its outbound weights from {target}'s, add them to the consumers' biases, delete it"
        factor = "" if self.factor == 1.0 else f"{self.factor:g} times "
        return f"add {factor}its outbound weights to {target}'s, then delete it"

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "condition": self.condition,
            "evidence": self.evidence,
            "action": self.action,
            "partner": None if self.partner is None else f"{self.group}[{self.partner}]",
            "factor": self.factor,
            "offset": self.offset,
            "exact": self.exact,
        }


@dataclass(frozen=True)
class UnitMeasures:
    """Empirical reducibility measures of one unit.

    Attributes:
        unit: ``"group[channel]"``.
        outbound_norm: Euclidean norm of the unit's outbound weights.
        mean, std: of its activation where the consumers read it, over all
            samples and positions (std: the largest over consumers).
        partner: the channel of the same group that fits it best.
        correlation: ``|corr(x_unit, x_partner)|`` (the smallest over consumers).
        slope, intercept: the least-squares fit ``x_unit ~ slope * x_partner + intercept``.
        samples: how many samples were measured.
    """

    unit: str
    outbound_norm: float
    mean: float
    std: float
    partner: int | None
    correlation: float
    slope: float
    intercept: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def channel_rows(weights: Weights, slices: Sequence[ParamSlice], size: int) -> np.ndarray:
    """(channels, entries): each channel's entries of ``slices``, concatenated in slice order."""
    return ChannelRows(weights, slices, size).whole()


class ChannelRows:
    """Each channel's entries of some parameter slices, as one (channels, entries) array per slice.

    The arrays are views of the weights where the slice lies along the
    parameter's first axis (a producer's rows), so nothing of the size of the
    weights is copied or converted: a channel's concatenated float64 row is
    made when asked for (:meth:`row`), and the measures over all channels
    (:meth:`largest`, :meth:`project`) are computed slice by slice.
    """

    BLOCK = 2**16
    """Entries converted to float64 at once by :meth:`project` (a cache-sized buffer)."""

    def __init__(self, weights: Weights, slices: Sequence[ParamSlice], size: int) -> None:
        self.size = size
        self.parts: list[np.ndarray] = []
        for param_slice in slices:
            array = np.asarray(weights[param_slice.param])
            moved = np.moveaxis(array, param_slice.axis, 0)
            cut = moved[param_slice.offset:param_slice.offset + size * param_slice.block]
            self.parts.append(cut.reshape(size, -1))
        self.width = sum(part.shape[1] for part in self.parts)
        self._largest: list[np.ndarray] | None = None

    def whole(self) -> np.ndarray:
        """(channels, entries) in float64, one copy."""
        if not self.parts:
            return np.zeros((self.size, 0))
        return np.concatenate([part.astype(np.float64, copy=False) for part in self.parts], axis=1)

    def row(self, channel: int) -> np.ndarray:
        """Channel ``channel``'s entries, float64."""
        if not self.parts:
            return np.zeros(0)
        return np.concatenate([part[channel].astype(np.float64) for part in self.parts])

    def largest_by_part(self) -> list[np.ndarray]:
        """Per slice, each channel's largest ``|entry|`` (float64), computed once."""
        if self._largest is None:
            self._largest = [
                np.maximum(part.max(axis=1, initial=0.0), -part.min(axis=1, initial=0.0)).astype(np.float64)
                for part in self.parts
            ]
        return self._largest

    def largest(self) -> np.ndarray:
        """Each channel's largest ``|entry|`` over all slices (float64)."""
        return np.max(self.largest_by_part(), axis=0, initial=0.0) if self.parts else np.zeros(self.size)

    def project(self, direction: np.ndarray) -> np.ndarray:
        """Each channel's row times ``direction`` (entries long), in float64, a few channels at a time."""
        keys = np.zeros(self.size)
        column = 0
        for part in self.parts:
            width = part.shape[1]
            piece = direction[column:column + width]
            step = max(1, self.BLOCK // max(1, width))
            for start in range(0, self.size, step):
                keys[start:start + step] += part[start:start + step].astype(np.float64) @ piece
            column += width
        return keys


def parametric_findings(
    graph: Graph, groups: Sequence[ChannelGroup], weights: Weights, *, tol: float = 1e-12
) -> list[Finding]:
    """Every unit of every legal group that the weights alone prove reducible.

    Zero means ``|w| <= tol * max|W|`` over the parameter; equal means the
    largest difference is at most ``tol`` times the larger entry. A unit is
    reported once, under the first condition that holds (inconsequential,
    constant, then the relations to an earlier channel that is not itself
    reported).
    """
    findings = []
    for group in groups:
        if group.legal:
            findings.extend(_group_findings(graph, group, weights, tol))
    return findings


def _group_findings(graph: Graph, group: ChannelGroup, weights: Weights, tol: float) -> list[Finding]:
    size = group.size
    inbound = [s for s in group.slices if s.role == "inbound"]
    outbound = [s for s in group.slices if s.role == "outbound"]
    channelwise = [s for s in group.slices if s.role == "channelwise"]
    rows = ChannelRows(weights, inbound, size)
    zero_out = _zero_channels(weights, outbound, size, tol)
    zero_in = _zero_inbound(weights, inbound, rows, tol)
    zero_bn = _zero_batchnorm(graph, group, weights, channelwise, tol)
    extras = channel_rows(weights, channelwise, size)
    chain = _chain_kinds(graph, group)
    if any(graph[name].attrs.get("computed_weight") for name in group.nodes):
        # a computed weight (standardised filters) maps negated or scaled stored filters to
        # results that are not negated or scaled: only equal stored filters compute equal ones
        chain.add("computed weight")

    findings: list[Finding] = []
    reduced: set[int] = set()

    def unit(channel: int) -> str:
        return f"{group.name}[{channel}]"

    for c in range(size):
        if zero_out[c]:
            findings.append(Finding(
                unit(c), group.name, c, "inconsequential",
                f"all {group.outbound_size} outbound weights are 0 (consumers {', '.join(group.consumers)})",
            ))
        elif zero_in[c]:
            findings.append(Finding(
                unit(c), group.name, c, "constant",
                f"all inbound weights are 0 (producers {', '.join(group.producers)}); the activation "
                "depends on the bias only",
            ))
        elif zero_bn[c] is not None:
            findings.append(Finding(unit(c), group.name, c, "constant", f"batch norm '{zero_bn[c]}' scales it by 0"))
        else:
            continue
        reduced.add(c)

    partners = _candidate_partners(rows, tol)
    for c in range(size):
        if c in reduced:
            continue
        for p in partners.get(c, ()):
            if p in reduced:
                continue
            relation = _relation(rows.row(p), rows.row(c), extras[p], extras[c], chain, tol)
            if relation is not None:
                condition, factor, offset, evidence = relation
                findings.append(Finding(unit(c), group.name, c, condition, evidence, p, factor, offset))
                reduced.add(c)
                break
    return sorted(findings, key=lambda f: f.channel)


def _candidate_partners(rows: np.ndarray | ChannelRows, tol: float) -> dict[int, list[int]]:
    """Channel c -> the earlier channels p (ascending) whose rows may be related to c's; a superset.

    Every relation :func:`_relation` accepts (equal, negated or positively
    scaled rows, within ``tol`` times the larger row's largest entry) makes
    two rows equal up to a nonzero factor, so they point the same way: each
    row is divided by its largest absolute entry ``s`` and projected on one
    fixed random vector ``r``. For related rows ``i`` and ``j`` the absolute
    projections differ by at most ``4 tol |r|_1 max(s_i, s_j) / min(s_i,
    s_j)``, which is at most ``max(w_i, w_j)`` with ``w_i = 4 tol |r|_1
    S / s_i`` (``S`` the group's largest ``s``), widened by the rounding
    bound of the projection. Sorting the projections finds every pair
    within that window in ``O(C log C)`` array work instead of ``C^2 / 2``
    comparisons; each candidate is then checked by :func:`_relation` as
    before, so the findings are the same.
    """
    if isinstance(rows, np.ndarray):
        rows = ChannelRows({"rows": rows}, [ParamSlice("rows", "", "inbound", rows.shape, 0)], rows.shape[0])
    size, width = rows.size, rows.width
    if size < 2:
        return {}
    scales = rows.largest()
    live = np.flatnonzero(scales > 0)  # a zero row relates to nothing (_relation returns None)
    if live.size < 2:
        return {}
    direction = np.random.default_rng(0).uniform(-1.0, 1.0, width)
    reach = float(np.abs(direction).sum())
    # each row's projection divided by its scale: the projection of the scaled row, to rounding
    keys = np.abs(rows.project(direction)[live]) / scales[live]
    rounding = 4 * (width + 2) * np.finfo(np.float64).eps * reach
    windows = 4 * tol * reach * float(scales.max()) / scales[live] + rounding
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_windows = keys[order], windows[order]
    starts = np.searchsorted(sorted_keys, sorted_keys - sorted_windows, side="left")
    ends = np.searchsorted(sorted_keys, sorted_keys + sorted_windows, side="right")
    partners: dict[int, set[int]] = {}
    for i in np.flatnonzero(ends - starts > 1):
        first = int(live[order[i]])
        for j in range(int(starts[i]), int(ends[i])):
            second = int(live[order[j]])
            if second != first:
                partners.setdefault(max(first, second), set()).add(min(first, second))
    return {c: sorted(found) for c, found in partners.items()}


def _zero_channels(weights: Weights, slices: Sequence[ParamSlice], size: int, tol: float) -> list[bool]:
    if not slices:
        return [False] * size
    flags = np.ones(size, dtype=bool)
    for param_slice in slices:
        channel, scale = _largest_entries(np.asarray(weights[param_slice.param]), param_slice, size)
        flags &= channel <= tol * scale
    return [bool(flag) for flag in flags]


def _zero_inbound(weights: Weights, inbound: Sequence[ParamSlice], rows: ChannelRows, tol: float) -> list[bool]:
    """Channels whose inbound weights (biases excepted) are all zero: ``|w| <= tol * max|W|`` per parameter.

    Each channel's largest entry comes from ``rows`` (computed once for the
    partner search too); a parameter's largest entry is its channels' where
    the group holds the whole parameter.
    """
    parts = [(s, largest) for s, largest in zip(inbound, rows.largest_by_part()) if s.part != "bias"]
    if not parts:
        return [False] * rows.size
    flags = np.ones(rows.size, dtype=bool)
    for param_slice, channel in parts:
        whole = param_slice.offset == 0 and rows.size * param_slice.block == param_slice.shape[param_slice.axis]
        if whole:
            scale = float(channel.max(initial=0.0))
        else:
            _, scale = _largest_entries(np.asarray(weights[param_slice.param]), param_slice, rows.size)
        flags &= channel <= tol * scale
    return [bool(flag) for flag in flags]


def _largest_entries(array: np.ndarray, param_slice: ParamSlice, size: int) -> tuple[np.ndarray, float]:
    """(each channel's largest ``|entry|`` in ``param_slice``, the whole parameter's largest ``|entry|``).

    Reduced over the other axes where the array lies (no moved or absolute
    copy of a consumer's weight): the largest magnitude along an index is
    the larger of its maximum and minus its minimum.
    """
    if array.size == 0:
        return np.zeros(size), 0.0
    axis = param_slice.axis
    if array.ndim == 0:
        array = array.reshape(1)
    # (before, index, after), reduced one axis at a time: numpy reduces over one leading axis at
    # memory speed, and over several scattered ones an order of magnitude slower
    view = array.reshape(math.prod(array.shape[:axis]), array.shape[axis], -1)
    per_index = np.maximum(view.max(axis=0).max(axis=-1), -view.min(axis=0).min(axis=-1))
    cut = per_index[param_slice.offset:param_slice.offset + size * param_slice.block]
    return cut.reshape(size, -1).max(axis=1, initial=0.0), float(per_index.max())


def _zero_batchnorm(
    graph: Graph, group: ChannelGroup, weights: Weights, channelwise: Sequence[ParamSlice], tol: float
) -> list[str | None]:
    result: list[str | None] = [None] * group.size
    if len(group.producers) != 1:
        return result
    batchnorms = {node.module for node in graph if node.op == "batchnorm" and node.name in group.nodes}
    for param_slice in channelwise:
        if param_slice.module in batchnorms and param_slice.part == "weight":
            channel, scale = _largest_entries(np.asarray(weights[param_slice.param]), param_slice, group.size)
            for c in np.flatnonzero(channel <= tol * scale).tolist():
                result[c] = param_slice.module
    return result


def _chain_kinds(graph: Graph, group: ChannelGroup) -> set[str]:
    """What the operations between producers and consumers are, as labels for relation checks."""
    kinds = set()
    producers = set(group.producers)
    for name in group.nodes:
        node = graph[name]
        if node.kind == OpKind.METADATA or (node.kind == OpKind.PARAMETRIC and node.module in producers):
            continue
        function = str(node.attrs.get("function", ""))
        if node.op == "activation":
            kinds.add(f"activation:{function}")
        elif node.op == "pooling":
            kinds.add("linear" if function in _LINEAR_POOLING else f"pooling:{function}")
        elif node.op == "scale":
            kinds.add("linear" if function in ("mul", "div") else "shift")
        elif node.op in _PLAIN:
            kinds.add("plain")
        elif node.op in ("add", "sub"):
            kinds.add("coupling")
        elif node.op in ("mul", "div"):
            kinds.add("product")
        else:
            kinds.add(node.op)
    return kinds


def _relation(
    first: np.ndarray, second: np.ndarray, first_extra: np.ndarray, second_extra: np.ndarray,
    chain: set[str], tol: float,
) -> tuple[str, float, float, str] | None:
    scale = max(float(np.abs(first).max(initial=0.0)), float(np.abs(second).max(initial=0.0)))
    if scale == 0.0:
        return None

    def close(a: np.ndarray, b: np.ndarray, reference: float) -> bool:
        return bool(np.abs(a - b).max(initial=0.0) <= tol * reference)

    extra_scale = max(float(np.abs(first_extra).max(initial=0.0)), float(np.abs(second_extra).max(initial=0.0)))
    if close(first, second, scale) and close(first_extra, second_extra, extra_scale):
        return "redundant", 1.0, 0.0, "equal inbound weights, biases and per-channel parameters"
    if first_extra.size or "computed weight" in chain:
        return None  # batch norm, depthwise parameters or a computed weight: only equality carries through
    activations = {kind.split(":", 1)[1] for kind in chain if kind.startswith("activation:")}
    others = {kind for kind in chain if not kind.startswith("activation:")}
    if close(first, -second, scale):
        if activations <= _ODD_ACTIVATIONS and others <= {"plain", "linear", "coupling"}:
            return "negated", -1.0, 0.0, f"negated inbound weights and bias; odd chain ({_describe(chain)})"
        if activations == {"sigmoid"} and others <= {"plain"}:
            return (
                "sigmoid_complement", -1.0, 1.0,
                "negated inbound weights and bias into a sigmoid: x = 1 - x_partner",
            )
    index = int(np.abs(first).argmax())
    if first[index] != 0:
        alpha = float(second[index] / first[index])
        if alpha > 0 and not math.isclose(alpha, 1.0) and close(alpha * first, second, scale):
            homogeneous = {"plain", "linear", "coupling"} | {f"pooling:{kind}" for kind in _HOMOGENEOUS_POOLING}
            if activations <= _HOMOGENEOUS_ACTIVATIONS and others <= homogeneous:
                return (
                    "relu_scaled", alpha, 0.0,
                    f"inbound weights and bias {alpha:.6g} times the partner's; positively homogeneous "
                    f"chain ({_describe(chain)})",
                )
    return None


def _describe(chain: set[str]) -> str:
    return ", ".join(sorted(chain)) or "no operations"


def empirical_findings(
    groups: Sequence[ChannelGroup], measures: dict[str, UnitMeasures], *, tol: float
) -> list[Finding]:
    """Units that the measures show reducible within ``tol`` (relative to the group's largest value).

    Inconsequential: outbound norm <= tol * the group's largest; constant:
    std <= tol * the group's largest; redundant: ``1 - |corr| <= tol`` with
    an earlier partner (the relation is then the measured affine fit).
    """
    findings = []
    for group in groups:
        if not group.legal or f"{group.name}[0]" not in measures:
            continue  # illegal, or not measured (layers called as functions)
        units = [measures[f"{group.name}[{c}]"] for c in range(group.size)]
        top_norm = max(u.outbound_norm for u in units)
        top_std = max(u.std for u in units)
        reduced: set[int] = set()
        for c, u in enumerate(units):
            if u.outbound_norm <= tol * top_norm:
                findings.append(Finding(
                    u.unit, group.name, c, "inconsequential",
                    f"outbound weight norm {u.outbound_norm:.3g} (group's largest {top_norm:.3g})", exact=False,
                ))
            elif u.std <= tol * top_std:
                findings.append(Finding(
                    u.unit, group.name, c, "constant",
                    f"activation std {u.std:.3g} over {u.samples} samples (group's largest {top_std:.3g}); "
                    f"mean {u.mean:.6g}",
                    offset=u.mean, exact=False,
                ))
            else:
                continue
            reduced.add(c)
        for c, u in enumerate(units):
            if c in reduced or u.partner is None or u.partner in reduced or u.partner > c:
                continue
            if 1.0 - u.correlation <= tol and not math.isclose(u.slope, 0.0):
                findings.append(Finding(
                    u.unit, group.name, c, "redundant",
                    f"|corr| with {group.name}[{u.partner}] is {u.correlation:.9f} over {u.samples} samples; "
                    f"x = {u.slope:.6g} * x_partner + {u.intercept:.6g}",
                    partner=u.partner, factor=u.slope, offset=u.intercept, exact=False,
                ))
                reduced.add(c)
    return findings

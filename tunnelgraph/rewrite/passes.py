"""Rewrites as passes over a model, whatever its framework.

A pass states what it **requires** (the group is legal, the model's
parameters have the shapes the group was found with), what it **does**
(channel edits applied through the model's :class:`ModelAdapter`) and what
it **ensures** (a :class:`RewriteRecord` of every parameter it resized). It
returns a typed :class:`PassResult`. The passes never ask which framework a
model belongs to: a :class:`ModelAdapter` (``tunnelgraph.adapters``) does
everything framework-specific, one implementation per framework.

- :class:`EditPass`: one channel edit on one group (opening, closing and
  reorganising a tunnel, or any edit of :mod:`tunnelgraph.rewrite.edits`);
- :class:`ReducePass`: Sussmann reduction (docs/MATH.md section 2), every
  reducible unit removed or folded, group by group.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from tunnelgraph.analysis.groups import ChannelGroup, ParamSlice, channel_groups, check_through
from tunnelgraph.analysis.reducibility import Finding, UnitMeasures, empirical_findings, parametric_findings
from tunnelgraph.errors import RewriteError, SiteError
from tunnelgraph.ir import Graph
from tunnelgraph.rewrite import edits
from tunnelgraph.rewrite.edits import ChannelEdit
from tunnelgraph.rewrite.plan import RewritePlan, check_shapes, plan_edit

if TYPE_CHECKING:
    from tunnelgraph.equivalence import EquivalenceReport

logger = logging.getLogger(__name__)

M = TypeVar("M")


class ModelAdapter(abc.ABC, Generic[M]):
    """One framework's way to read, rewrite and run a model; the only place that knows the framework.

    Attributes:
        model: the model, in its framework's own type (an ``nn.Module``, an
            ``onnx.ModelProto``, a :class:`~tunnelgraph.Graph`).
    """

    def __init__(self, model: M) -> None:
        self.model = model

    @property
    def name(self) -> str:
        """The model's name in messages (its class, or its graph's name)."""
        return type(self.model).__name__

    @abc.abstractmethod
    def of(self, model: M) -> "ModelAdapter[M]":
        """The adapter of another model of the same framework (a pass's result)."""

    @abc.abstractmethod
    def graph(self, example_inputs: Any | None = None) -> Graph:
        """The model as the IR: traced on ``example_inputs``, or read from the file."""

    @abc.abstractmethod
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        """Every parameter's (and buffer's or initializer's) shape, by the names groups use."""

    @abc.abstractmethod
    def weights(self) -> Mapping[str, np.ndarray] | None:
        """Every parameter as a float64 array, by name (what the reducibility analysis reads).

        None when the weights are not known (a bare traced graph).
        """

    @abc.abstractmethod
    def copy(self) -> M:
        """An independent copy of the model."""

    @abc.abstractmethod
    def apply(self, plan: RewritePlan, *, inplace: bool = False) -> M:
        """The model with ``plan`` applied; a new model unless ``inplace`` (where the framework allows)."""

    @abc.abstractmethod
    def parameter_count(self) -> int:
        """How many parameter entries the model has."""

    @abc.abstractmethod
    def example_inputs(self, given: Any | None) -> Any:
        """``given``, or inputs the model declares (ONNX); raises ValueError when neither exists."""

    @abc.abstractmethod
    def unit_measures(
        self, groups: Sequence[ChannelGroup], data: Iterable[Any], *, batches: int | None, progress: bool | None
    ) -> dict[str, UnitMeasures]:
        """Every unit's empirical measures over ``data`` (see :mod:`tunnelgraph.statistics.activity`)."""

    @abc.abstractmethod
    def consumer_values(self, layers: Sequence[str], example_inputs: Any) -> Mapping[str, Any]:
        """The input each of ``layers`` receives on ``example_inputs`` (eval mode), opaque to the caller."""

    @abc.abstractmethod
    def bias_shift(
        self, weight_slice: ParamSlice, channel: int, values: Any, offset: float | None
    ) -> np.ndarray:
        """What the consumer ``weight_slice.module`` gains, as a bias, from ``channel`` being constant.

        The channel carries its recorded ``values`` (checked to be the same
        for every sample) when ``offset`` is None, else the number
        ``offset`` everywhere. Raises :class:`RewriteError` when the consumer
        has no bias or the contribution is not the same at every output
        position (a conv that pads).
        """

    @abc.abstractmethod
    def records(self) -> list[RewriteRecord]:
        """The records of every rewrite the model went through, oldest first (see :meth:`with_records`)."""

    @abc.abstractmethod
    def with_records(self, model: M, records: Sequence[RewriteRecord]) -> M:
        """``model`` (a rewrite's result) carrying this model's records followed by ``records``.

        A PyTorch module keeps them, JSON-ready, in its ``tunnelgraph_records``
        attribute (saved with the module by ``torch.save``); an ONNX model in
        its ``metadata_props`` under ``tunnelgraph.records`` (JSON).
        """

    @abc.abstractmethod
    def add_to_biases(self, model: M, shifts: Mapping[str, np.ndarray]) -> M:
        """``model`` (a pass's own result, edited in place) with ``shifts`` added to its layers' biases."""


@dataclass(frozen=True)
class TensorChange:
    """One parameter (or buffer) a rewrite edited, and how each new slice derives from the old ones.

    The group's channels occupy ``offset`` to ``offset + old_size * block``
    along ``axis`` before the edit and ``new_size`` blocks of ``block``
    entries after it; entries outside that range are unchanged. ``copies[j]``
    is the old channel whose block new channel ``j`` copies unchanged, or
    None when it is a combination (see :attr:`RewriteRecord.edit`: inbound
    terms for ``role`` ``"inbound"`` and ``"channelwise"``, outbound terms
    for ``"outbound"``).
    """

    name: str
    role: str
    axis: int
    offset: int
    block: int
    old_size: int
    new_size: int
    copies: tuple[int | None, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "role": self.role, "axis": self.axis, "offset": self.offset, "block": self.block,
            "old_size": self.old_size, "new_size": self.new_size, "copies": list(self.copies),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorChange":
        return cls(
            data["name"], data["role"], int(data["axis"]), int(data["offset"]), int(data["block"]),
            int(data["old_size"]), int(data["new_size"]), tuple(data["copies"]),
        )


def _terms_to_json(terms: tuple[Mapping[int, Any], ...]) -> list[dict[str, Any]]:
    return [
        {str(old): (np.asarray(factor).tolist() if np.ndim(factor) else float(factor)) for old, factor in channel.items()}
        for channel in terms
    ]


@dataclass(frozen=True)
class RewriteRecord:
    """What one channel edit did to one group: enough to redo its shapes and to carry optimizer state.

    Attributes:
        group: the group's name.
        old_size, new_size: its channels before and after.
        edit: the channel edit (``inbound`` and ``outbound`` say how every
            new channel derives from the old ones).
        tensors: every parameter entry that changed, in the order applied
            (outbound edits first).
    """

    group: str
    old_size: int
    new_size: int
    edit: ChannelEdit = field(repr=False)
    tensors: tuple[TensorChange, ...] = field(repr=False)

    @classmethod
    def of(cls, plan: RewritePlan) -> "RewriteRecord":
        changes = tuple(
            TensorChange(
                t.slice.param, t.slice.role, t.slice.axis, t.slice.offset, t.slice.block, t.size,
                len(t.sources), t.copies,
            )
            for t in plan.tensors
        )
        return cls(plan.group.name, plan.group.size, plan.result.size, plan.edit, changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (lambda vectors as lists)."""
        return {
            "group": self.group,
            "old_size": self.old_size,
            "new_size": self.new_size,
            "inbound": _terms_to_json(self.edit.inbound),
            "outbound": _terms_to_json(self.edit.outbound),
            "tensors": [change.to_dict() for change in self.tensors],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RewriteRecord":
        def terms(channels: list[dict[str, Any]]) -> tuple[dict[int, Any], ...]:
            return tuple(
                {int(old): (np.asarray(f, dtype=np.float64) if isinstance(f, list) else float(f))
                 for old, f in channel.items()}
                for channel in channels
            )

        edit = ChannelEdit(int(data["old_size"]), terms(data["inbound"]), terms(data["outbound"]))
        changes = tuple(TensorChange.from_dict(change) for change in data["tensors"])
        return cls(data["group"], int(data["old_size"]), int(data["new_size"]), edit, changes)


@dataclass(frozen=True)
class PassResult(Generic[M]):
    """A pass's output: the model, the record of every edit it applied (empty: nothing changed), and
    the equivalence check of the result against the input when the pass was asked for one."""

    model: M
    records: tuple[RewriteRecord, ...] = ()
    equivalence: EquivalenceReport | None = None

    @property
    def modified(self) -> bool:
        return bool(self.records)


class EditPass:
    """Apply one channel edit to one group.

    Requires the group to be legal and to fit the model (its parameters
    have the shapes the group was found with: a site found on another
    model raises the stale-site :class:`SiteError` before anything else);
    ensures a :class:`RewriteRecord` of every resized parameter.
    """

    def __init__(
        self,
        group: ChannelGroup,
        edit: ChannelEdit,
        *,
        inplace: bool = False,
        check: Callable[[Any, Any], EquivalenceReport] | None = None,
    ) -> None:
        """``check(before, after)`` (e.g. ``lambda a, b: tg.verify(a, b, x)``), when given, compares
        the result with the input; it cannot run with ``inplace`` (the input is gone)."""
        if check is not None and inplace:
            raise ValueError("an in-place edit leaves nothing to check the result against; pass inplace=False")
        self.group, self.edit, self.inplace, self.check = group, edit, inplace, check

    @staticmethod
    def requires(adapter: ModelAdapter[Any], group: ChannelGroup) -> None:
        """Raise :class:`SiteError` unless ``group`` can be edited in ``adapter``'s model."""
        check_shapes(group, adapter.shapes())
        if not group.legal:
            raise SiteError(f"group '{group.name}' cannot be rewritten: {'; '.join(group.reasons)}")

    def __call__(self, adapter: ModelAdapter[M]) -> PassResult[M]:
        self.requires(adapter, self.group)
        plan = plan_edit(self.group, self.edit)
        record = RewriteRecord.of(plan)
        model = adapter.with_records(adapter.apply(plan, inplace=self.inplace), [record])
        logger.debug("group '%s': %d -> %d channels", self.group.name, self.group.size, plan.result.size)
        equivalence = self.check(adapter.model, model) if self.check is not None else None
        return PassResult(model, (record,), equivalence)


@dataclass(frozen=True)
class ReductionReport:
    """What :func:`tunnelgraph.reduce` did.

    Attributes:
        applied: the findings whose units were removed, in the order applied.
        skipped: findings that were not applied, each with the reason.
        parameters_before, parameters_after: parameter counts of the two models.
        equivalence: the reduced model against the original on the example inputs.
        records: the channel edits, one per group reduced.
    """

    applied: tuple[Finding, ...]
    skipped: tuple[tuple[Finding, str], ...]
    parameters_before: int
    parameters_after: int
    equivalence: EquivalenceReport | None = field(default=None)
    records: tuple[RewriteRecord, ...] = field(default=(), repr=False)

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


class ReducePass:
    """Remove every reducible unit (docs/MATH.md section 2), group by group, until none is left.

    Each group's findings become one composed channel edit of the same
    algebra the tunnels use: inconsequential units are removed; redundant,
    negated and ReLU-scaled units are folded into their partner (their
    outbound weights added with the relation's factor); constant units, and
    the offset of a sigmoid complement or of an empirical affine fit, are
    also folded into the consumers' biases. A finding that cannot be
    applied exactly is skipped with the reason. With ``data``, units that
    the data show reducible within ``tol`` go too.
    """

    def __init__(
        self,
        example_inputs: Any,
        *,
        data: Iterable[Any] | None = None,
        batches: int | None = None,
        tol: float = 1e-12,
        through: Iterable[str] = (),
        progress: bool = False,
    ) -> None:
        self.inputs = example_inputs
        self.data = data
        self.batches = batches
        self.tol = tol
        self.through = check_through(through)
        self.progress = progress

    def __call__(self, adapter: ModelAdapter[M]) -> tuple[PassResult[M], list[Finding], list[tuple[Finding, str]]]:
        current = adapter
        applied: list[Finding] = []
        skipped: dict[str, tuple[Finding, str]] = {}
        records: list[RewriteRecord] = []
        while True:
            graph = current.graph(self.inputs)
            groups = channel_groups(graph, self.through)
            weights = current.weights()
            if weights is None:
                raise TypeError("reduction reads the weights: pass the model itself, not a traced Graph")
            findings = parametric_findings(graph, groups, weights, tol=self.tol)
            if self.data is not None:
                known = {f.unit for f in findings}
                measures = current.unit_measures(groups, self.data, batches=self.batches, progress=self.progress)
                findings += [f for f in empirical_findings(groups, measures, tol=self.tol) if f.unit not in known]
            findings = [f for f in findings if f.unit not in skipped]
            if not findings:
                break
            group = next(g for g in groups if g.name == findings[0].group)
            mine = [f for f in findings if f.group == group.name]
            reduced, done, refused, record = self._reduce_group(current, group, mine)
            applied.extend(done)
            skipped.update({f.unit: (f, reason) for f, reason in refused})
            if record is not None:
                current = current.of(reduced)
                records.append(record)
        return PassResult(current.model, tuple(records)), applied, list(skipped.values())

    def _reduce_group(
        self, adapter: ModelAdapter[M], group: ChannelGroup, findings: list[Finding]
    ) -> tuple[M, list[Finding], list[tuple[Finding, str]], RewriteRecord | None]:
        outbound = [s for s in group.slices if s.role == "outbound"]
        needs_values = any(_needs_shift(f) for f in findings) and not group.unmeasured
        seen = adapter.consumer_values([s.module for s in outbound], self.inputs) if needs_values else {}
        edit = edits.identity(group.size)
        shifts: dict[str, np.ndarray] = {}
        done: list[Finding] = []
        refused: list[tuple[Finding, str]] = []
        size = group.size
        for finding in sorted(findings, key=lambda f: -f.channel):
            if _needs_shift(finding) and group.unmeasured:
                refused.append((finding, (
                    "removing it moves its constant part into the consumers' biases, which tunnelgraph does "
                    f"for layers called as modules only: {'; '.join(group.unmeasured)}"
                )))
                continue
            try:
                extra = _bias_shifts(adapter, outbound, finding, seen)
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
            for layer, delta in extra.items():
                shifts[layer] = shifts[layer] + delta if layer in shifts else delta
            done.append(finding)
        if not done:
            return adapter.model, done, refused, None
        plan = plan_edit(group, edit)
        record = RewriteRecord.of(plan)
        result = adapter.with_records(adapter.add_to_biases(adapter.apply(plan), shifts), [record])
        return result, done, refused, record


def _needs_shift(finding: Finding) -> bool:
    return finding.condition == "constant" or finding.offset != 0.0


def _bias_shifts(
    adapter: ModelAdapter[Any], outbound: Sequence[ParamSlice], finding: Finding, seen: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Consumer bias changes that removing ``finding``'s unit needs (the constant part of its activation)."""
    if not _needs_shift(finding):
        return {}
    exact_constant = finding.condition == "constant" and finding.exact
    return {
        weight_slice.module: adapter.bias_shift(
            weight_slice, finding.channel, seen[weight_slice.module], None if exact_constant else finding.offset
        )
        for weight_slice in outbound
    }

"""The public entry points: find sites, analyse, measure, and rewrite PyTorch and ONNX models.

Every function asks :func:`tunnelgraph.adapters.adapter_for` once for the
model's adapter and never tests the framework itself. Every rewrite returns
a new model and leaves its input untouched unless ``inplace=True``; a
rewrite that fails raises before anything is changed. A PyTorch module in
gives a module out; an ONNX model in (``onnx.ModelProto``, or the path or
bytes of an ``.onnx`` file) gives a ``ModelProto`` out, and for ONNX models
this module never imports torch (the PyTorch machinery is imported when a
PyTorch model is given).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, Union, overload

from dataclasses import dataclass

import numpy as np

from tunnelgraph.adapters import Adapter, adapter_for
from tunnelgraph.analysis.groups import (
    THROUGH_OPTIONS,
    ChannelGroup,
    channel_groups,
    check_through,
    through_hint,
    through_rules,
)
from tunnelgraph.analysis.sites import AnalysisReport, Site, analyze_graph, find_site, sites_of
from tunnelgraph.errors import SiteError
from tunnelgraph.ir import Graph
from tunnelgraph.rewrite import edits
from tunnelgraph.rewrite.edits import ChannelEdit, Coefficient
from tunnelgraph.rewrite.passes import EditPass, ReducePass, ReductionReport, RewriteRecord
from tunnelgraph.rewrite.plan import check_shapes

if TYPE_CHECKING:
    import onnx
    import torch
    import torch.nn as nn

    from tunnelgraph.statistics.engine import LossFn, Method, SiteStatistics

logger = logging.getLogger(__name__)

ExampleInputs = Union["torch.Tensor", Sequence["torch.Tensor"]]
"""Inputs of a model's forward: one tensor, or a sequence passed positionally."""
Lambda = Union[float, Sequence[float], np.ndarray, "torch.Tensor"]
"""An outbound split: one number, or a vector of the site's outbound size."""
OnnxModel = Union["onnx.ModelProto", str, "os.PathLike[str]", bytes]
"""An ONNX model: a ``ModelProto``, or the path or bytes of an ``.onnx`` file. (Overloads list
the ONNX form first: without protobuf's stubs a ``ModelProto`` would match ``nn.Module`` too.)"""
AnyModel = Union["nn.Module", OnnxModel]


def find_sites(
    model: AnyModel | Graph, example_inputs: ExampleInputs | None = None, *, through: Iterable[str] = ()
) -> list[Site]:
    """Every channel of ``model`` that can be cloned function-preservingly.

    Args:
        model: a PyTorch module (traced with ``torch.fx`` on
            ``example_inputs``), an ONNX model, or an already traced
            :class:`Graph`.
        example_inputs: inputs of a PyTorch model's forward (shapes matter);
            not needed for ONNX models and graphs.
        through: per-channel operations that sites may pass, cloning them
            with the channel: any of ``"batchnorm"``, ``"pooling"``,
            ``"dropout"``, ``"depthwise"``. By default, as in the paper,
            units feeding them are not sites.

    Returns:
        The sites, group by group in graph order, channels in order.
    """
    return sites_of(channel_groups(adapter_for(model).graph(example_inputs), through))


def analyze(
    model: AnyModel | Graph,
    example_inputs: ExampleInputs | None = None,
    *,
    through: Iterable[str] = (),
    data: Iterable[Any] | None = None,
    batches: int | None = None,
    progress: bool | None = None,
) -> AnalysisReport:
    """Every hidden channel group of ``model``, legal or not, and why (see :func:`find_sites`).

    For a model (not a bare :class:`Graph`) the report also lists the units
    its weights prove reducible (Sussmann's conditions, docs/MATH.md section
    2; see :func:`reduce`). With ``data`` (batches as
    :func:`tunnelgraph.runtime.batch_parts` reads them; ``batches`` limits
    them) every unit of a PyTorch model also gets its empirical measures:
    outbound norm, activation mean and std, and the best affine fit by
    another unit of its group, so near-reducible units show too;
    ``progress`` shows a bar over that pass (True), never (False), or in
    interactive use only (None, the default: when stderr is a terminal).
    """
    adapter = adapter_for(model)
    report = analyze_graph(adapter.graph(example_inputs), through, adapter.weights())
    if data is not None:
        measures = adapter.unit_measures(report.groups, data, batches=batches, progress=progress)
        # units of groups with layers called as functions are not measured (ChannelGroup.unmeasured)
        ordered = tuple(measures[site.name] for site in report.sites if site.name in measures)
        report = AnalysisReport(report.model, report.through, report.groups, report.reducibility, ordered)
    return report


@overload
def rewrite(
    model: OnnxModel, site: Site | str, lam: Lambda = ..., *, example_inputs: ExampleInputs | None = ...,
    through: Iterable[str] = ..., inplace: bool = ...,
) -> onnx.ModelProto: ...
@overload
def rewrite(
    model: nn.Module, site: Site | str, lam: Lambda = ..., *, example_inputs: ExampleInputs | None = ...,
    through: Iterable[str] = ..., inplace: bool = ...,
) -> nn.Module: ...
def rewrite(
    model: AnyModel,
    site: Site | str,
    lam: Lambda = 0.5,
    *,
    example_inputs: ExampleInputs | None = None,
    through: Iterable[str] = (),
    inplace: bool = False,
) -> Any:
    """Open a tunnel: clone ``site``'s channel into a new last channel of its group.

    The clone copies the channel's inbound weights, bias and per-channel
    parameters (batch-norm statistics included). Outbound weight ``w`` of the
    channel becomes ``lam * w`` and the clone's ``(1 - lam) * w``, so the
    network computes the same function.

    Args:
        model: the network (PyTorch or ONNX); not modified unless ``inplace``.
        site: a :class:`Site` from :func:`find_sites` on this model, or its
            name (then a PyTorch model needs ``example_inputs``, and
            ``through`` if the site passes per-channel layers).
        lam: a number, or a vector of ``site.outbound_size`` numbers in the
            order documented on :class:`Site` (consumer by consumer,
            row-major over each consumer's weight columns of the channel).
        inplace: edit ``model`` itself instead of a copy (an ``onnx.ModelProto``:
            only the edited initializers are replaced, no copy of the model).

    Returns:
        The rewritten model (a module for a module, a ``ModelProto`` for an
        ONNX model), with one more channel in the site's group.
    """
    adapter = adapter_for(model)
    resolved = _resolve(adapter, site, example_inputs, through)
    edit = edits.clone(resolved.group.size, resolved.channel, _lambda(lam, resolved))
    return EditPass(resolved.group, edit, inplace=inplace)(adapter).model


@overload
def merge(
    model: OnnxModel, site: Site | str, into: int, *, example_inputs: ExampleInputs | None = ...,
    through: Iterable[str] = ..., inplace: bool = ...,
) -> onnx.ModelProto: ...
@overload
def merge(
    model: nn.Module, site: Site | str, into: int, *, example_inputs: ExampleInputs | None = ...,
    through: Iterable[str] = ..., inplace: bool = ...,
) -> nn.Module: ...
def merge(
    model: AnyModel,
    site: Site | str,
    into: int,
    *,
    example_inputs: ExampleInputs | None = None,
    through: Iterable[str] = (),
    inplace: bool = False,
) -> Any:
    """Close a tunnel: merge ``site``'s channel into channel ``into`` of the same group.

    Inbound weights, biases and per-channel parameters of ``into`` become the
    mean of the two channels; outbound weights are summed; ``site``'s
    channel is removed. Exact when the two channels have equal inbound
    weights (right after :func:`rewrite`); otherwise it changes the function,
    which :func:`tunnelgraph.verify` measures. Returns the new model.
    """
    adapter = adapter_for(model)
    resolved = _resolve(adapter, site, example_inputs, through)
    edit = _edit(lambda: edits.merge(resolved.group.size, resolved.channel, into))
    return EditPass(resolved.group, edit, inplace=inplace)(adapter).model


@overload
def reorganize(
    model: OnnxModel, merge: tuple[Site | str, int] | None = ..., clone: Site | str | int | None = ...,
    lam: Lambda = ..., *, example_inputs: ExampleInputs | None = ..., through: Iterable[str] = ...,
    inplace: bool = ...,
) -> onnx.ModelProto: ...
@overload
def reorganize(
    model: nn.Module, merge: tuple[Site | str, int] | None = ..., clone: Site | str | int | None = ...,
    lam: Lambda = ..., *, example_inputs: ExampleInputs | None = ..., through: Iterable[str] = ...,
    inplace: bool = ...,
) -> nn.Module: ...
def reorganize(
    model: AnyModel,
    merge: tuple[Site | str, int] | None = None,
    clone: Site | str | int | None = None,
    lam: Lambda = 0.5,
    *,
    example_inputs: ExampleInputs | None = None,
    through: Iterable[str] = (),
    inplace: bool = False,
    **removed: Any,
) -> Any:
    """The paper's shape-preserving tunnel (docs/MATH.md section 6), on a pair you name.

    ``merge = (site, into)`` merges ``site``'s channel into channel ``into``
    (as :func:`merge`); then ``clone`` (a site or a channel index of the same
    group) is cloned into the slot that the merge freed, splitting its
    outbound weights by ``lam`` (as :func:`rewrite`). Every shape is kept.
    The merge is exact only when the two merged channels are redundant;
    measure the change with :func:`tunnelgraph.verify`. Returns the new
    model. To let data choose the pair, use :func:`reorganize_from_data`.
    """
    if merge is None or removed:
        raise TypeError(
            "reorganize takes merge=(site, into) and clone=; to merge the most nearly redundant pair that "
            "data show, call tg.reorganize_from_data(model, clone=site, lam=..., data=..., loss_fn=...) "
            "(it returns the model and a tg.Reorganization)"
        )
    if clone is None:
        raise TypeError("reorganize needs clone= (the site, or channel of the merged site's group, to clone)")
    adapter = adapter_for(model)
    merged_site, into = merge
    resolved = _resolve(adapter, merged_site, example_inputs, through)
    group = resolved.group
    if isinstance(clone, int):
        cloned = clone
    else:
        cloned_site = _resolve(adapter, clone, example_inputs, through)
        if cloned_site.group.name != group.name:
            raise SiteError(
                f"the cloned site {cloned_site.name} is not in the merged site's group '{group.name}'"
            )
        cloned = cloned_site.channel
    vector = _lambda(lam, resolved)
    edit = _edit(lambda: edits.reorganize(group.size, resolved.channel, into, cloned, vector))
    return EditPass(group, edit, inplace=inplace)(adapter).model


@dataclass(frozen=True)
class Reorganization:
    """What a reorganisation with an automatically chosen merge pair did, and what it cost.

    Attributes:
        merged, into: the units merged (``merged`` folded into ``into``).
        correlation: ``|corr|`` of their activations on the data (1 means redundant).
        max_abs_change, max_rel_change: the largest output difference on
            the data, absolute and relative to the largest output.
        loss_before, loss_after: mean loss on the data before and after
            (None without ``loss_fn``).
        samples: how many samples were compared.
    """

    merged: str
    into: str
    correlation: float
    max_abs_change: float
    max_rel_change: float
    loss_before: float | None
    loss_after: float | None
    samples: int


def reorganize_from_data(
    model: nn.Module,
    clone: Site | str,
    lam: Lambda = 0.5,
    *,
    data: Iterable[Any],
    loss_fn: LossFn | None = None,
    example_inputs: ExampleInputs | None = None,
    through: Iterable[str] = (),
    inplace: bool = False,
    batches: int | None = None,
    progress: bool = False,
) -> tuple[nn.Module, Reorganization]:
    """Reorganise with the pair the data choose: merge the most nearly redundant pair, then clone.

    The pair of ``clone``'s group whose activations on ``data`` are most
    nearly affinely related (the largest ``|corr|``; the cloned channel is
    never merged away) is merged, then ``clone`` is cloned into the freed
    slot with ``lam`` (see :func:`reorganize`). Returns the new model and a
    :class:`Reorganization` reporting the function change on the data (and
    the mean loss before and after, given ``loss_fn``).
    """
    from tunnelgraph.runtime import batch_parts
    from tunnelgraph.statistics.activity import unit_measures

    if isinstance(clone, int):
        raise TypeError("clone must be a Site (or a site name), not a channel index")
    batches_list = list(itertools.islice(iter(data), batches)) if batches is not None else list(data)
    if not batches_list:
        raise ValueError("data yielded no batches")
    if example_inputs is None:
        example_inputs = batch_parts(batches_list[0], index=0)[0]
    adapter = adapter_for(model)
    site = _resolve(adapter, clone, example_inputs, through)
    group = site.group
    if group.size < 3:
        raise SiteError(f"group '{group.name}' has {group.size} channels: nothing to merge besides the clone")
    if group.unmeasured:
        raise SiteError(
            f"the units of group '{group.name}' are not measured on data ({'; '.join(group.unmeasured)}); "
            "choose the pair yourself with tg.reorganize(model, merge=(site, partner), clone=..., lam=...)"
        )
    measures = unit_measures(model, [group], batches_list, progress=progress)
    candidates = [measures[f"{group.name}[{c}]"] for c in range(group.size) if c != site.channel]
    best = max(candidates, key=lambda m: (m.correlation, -int(m.unit.rpartition("[")[2][:-1])))
    merged = int(best.unit.rpartition("[")[2][:-1])
    into = best.partner if best.partner is not None else (0 if merged else 1)
    before = copy.deepcopy(model) if inplace else model
    result = reorganize(model, merge=(Site.of(group, merged), into), clone=site.channel, lam=lam, inplace=inplace)
    change = function_change(before, result, batches_list, loss_fn)
    report = Reorganization(merged=best.unit, into=f"{group.name}[{into}]", correlation=best.correlation, **change)
    logger.info("reorganized %s: merged %s into %s (|corr| %.6f)", group.name, report.merged, report.into,
                best.correlation)
    return result, report


def function_change(
    before: nn.Module, after: nn.Module, data: Iterable[Any], loss_fn: LossFn | None = None
) -> dict[str, Any]:
    """Largest output change of ``after`` against ``before`` over ``data``, and mean losses (eval mode)."""
    import torch

    from tunnelgraph.runtime import batch_parts, preserved

    worst = reference = 0.0
    losses = [0.0, 0.0]
    samples = 0
    with preserved(before, train=False), preserved(after, train=False), torch.no_grad():
        for index, batch in enumerate(data):
            inputs, targets = batch_parts(batch, index=index)
            first, second = before(*inputs), after(*inputs)
            worst = max(worst, float((first - second).abs().max()))
            reference = max(reference, float(first.abs().max()))
            count = int(inputs[0].shape[0])
            samples += count
            if loss_fn is not None:
                losses[0] += float(loss_fn(first, targets)) * count
                losses[1] += float(loss_fn(second, targets)) * count
    return {
        "max_abs_change": worst,
        "max_rel_change": worst / reference if reference else worst,
        "loss_before": losses[0] / samples if loss_fn is not None and samples else None,
        "loss_after": losses[1] / samples if loss_fn is not None and samples else None,
        "samples": samples,
    }


@dataclass(frozen=True)
class OpenedTunnel:
    """One tunnel that :func:`open_tunnels` opened.

    Attributes:
        site: the cloned site (of the model given to ``open_tunnels``).
        clone: the channel index of the clone in the returned model's group.
        lam: the outbound split used, ``lambda_t(statistics, t)``.
        statistics: what was measured for the site.
    """

    site: Site
    clone: int
    lam: torch.Tensor
    statistics: SiteStatistics

    def __repr__(self) -> str:
        lam = self.lam.detach()
        span = f" in [{float(lam.min()):.4g}, {float(lam.max()):.4g}]" if lam.numel() else ""
        return (
            f"OpenedTunnel(site={self.site.name!r}, clone={self.clone}, lam={tuple(lam.shape)}{span}, "
            f"sigma={self.statistics.sigma:.6g})"
        )


def open_tunnels(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: LossFn,
    *,
    k: int = 1,
    t: float = 1.0,
    sites: Sequence[Site] | None = None,
    through: Iterable[str] = (),
    batches: int | None = None,
    device: torch.device | str | None = None,
    method: Method = "auto",
    progress: bool | None = None,
) -> tuple[nn.Module, list[OpenedTunnel]]:
    """Measure every site, rank them, and open the ``k`` steepest tunnels with ``lambda_t``.

    Args:
        model: the network; not modified.
        data, loss_fn, batches, device, method, progress: as for
            :func:`tunnelgraph.a_statistics`.
        k: how many tunnels to open (distinct sites, best first).
        t: the radius of ``lambda_t``.
        sites: candidate sites; default: every site of ``model`` (found on
            the first batch's inputs with ``through``) for which A is
            defined (see :attr:`ChannelGroup.self_consumers`). With
            ``k > 1`` they must be sites :func:`find_sites` gives with the
            same ``through``: each tunnel after the first finds its site
            again, by name, on the widened model.
        through: per-channel operations sites may pass (see :func:`find_sites`).

    Returns:
        The new model (with ``k`` more channels in total) and the tunnels
        opened, steepest first. A site whose consumers an earlier tunnel of
        this call widened (a layer that both reads one opened group and
        produces another) is passed over for the next one: its A was
        measured for the old shapes (:class:`tunnelgraph.train.TunnelController`
        measures it again instead). After opening, the loss is unchanged and the
        inbound gradients of each pair are ``A lambda_t`` and
        ``A (1 - lambda_t)``.

    Raises:
        StatisticsError: a loss, activation or gradient over ``data`` is
            NaN or infinite; nothing is opened.
        SiteError: with ``k > 1``, one of ``sites`` is not a site of
            ``model`` under ``through``; checked before anything is measured.
    """
    import torch

    from tunnelgraph.runtime import batch_parts, model_device, to_device, unwrap_model
    from tunnelgraph.statistics.engine import a_statistics, measurable
    from tunnelgraph.statistics.lambdas import lambda_t, rank_sites

    if k < 1:
        raise ValueError(f"k must be a positive number of tunnels, got {k}")
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise ValueError("data yielded no batches; pass an iterable of (inputs, targets) batches")
    data = itertools.chain([first], iterator)
    model = unwrap_model(model)
    adapter = adapter_for(model)
    example = to_device(batch_parts(first, index=0)[0], torch.device(device) if device is not None else model_device(model))
    chosen = check_through(through)
    if sites is not None:
        candidates = list(sites)
    else:
        found = sites_of(channel_groups(adapter.graph(example), chosen))
        candidates = [site for site in found if measurable(site)]
        if len(candidates) < len(found):
            logger.info(
                "left out %d site(s) where A is not measured (a layer both produces and reads the group, "
                "or is called as a function)",
                len(found) - len(candidates),
            )
    if not candidates:
        if sites is not None:
            raise ValueError("sites= is empty: pass sites from tg.find_sites, or sites=None to measure every site")
        raise _no_sites_error(adapter, example, chosen)
    if sites is not None and k > 1:
        _check_found_with(adapter, example, candidates, chosen)
    stats = a_statistics(
        model, candidates, data, loss_fn, batches=batches, device=device, progress=progress, method=method
    )
    result = model
    opened: list[OpenedTunnel] = []
    for entry in rank_sites(stats):
        if len(opened) == k:
            break
        # after the first tunnel the group may have grown: find the site again on the new model
        site = entry.site if result is model else _resolve(adapter.of(result), entry.name, example, chosen)
        lam = lambda_t(entry, t)
        if site.outbound_size != lam.numel():
            logger.info("passed over %s: an earlier tunnel widened its consumers, so A no longer fits", entry.name)
            continue
        if entry.sigma == 0:
            logger.warning("site %s has sigma_max(A) = 0: its tunnel is flat", entry.name)
        result = rewrite(result, site, lam)
        opened.append(OpenedTunnel(entry.site, site.group.size, lam, entry))
        logger.info("opened %s (sigma %.3g) as channel %d", entry.name, entry.sigma, site.group.size)
    return result, opened


def _check_found_with(adapter: Adapter[Any], example: Any, sites: Sequence[Site], through: tuple[str, ...]) -> None:
    """Raise :class:`SiteError` unless every one of ``sites`` is a site ``find_sites`` gives under ``through``.

    :func:`open_tunnels` finds each tunnel's site after the first again, by
    name, on the widened model and under its own ``through=``: a site found
    with other options would fail there, or in another group layout be
    passed over, after every site was measured. Checked before measuring.
    """
    groups = {group.name: group for group in channel_groups(adapter.graph(example), through)}
    for site in sites:
        if groups.get(site.group_name) != site.group:
            raise SiteError(
                f"site {site.name} is not a site of this model {through_rules(through)}: with k > 1, open_tunnels "
                "finds each tunnel's site after the first again on the widened model, under its own through=; pass "
                "it the through= you gave tg.find_sites"
            )


def _no_sites_error(adapter: Adapter[Any], example: Any, chosen: tuple[str, ...]) -> SiteError:
    """The error for a model without sites, naming the smallest ``through=`` that would give it some."""
    graph = adapter.graph(example)
    name = adapter.name
    rules = through_rules(chosen)
    others = [option for option in THROUGH_OPTIONS if option not in chosen]
    for size in range(1, len(others) + 1):
        counts = {
            extra: len(sites_of(channel_groups(graph, chosen + extra)))
            for extra in itertools.combinations(others, size)
        }
        extra = max(counts, key=lambda key: counts[key])
        if counts[extra]:
            needed = [option for option in THROUGH_OPTIONS if option in chosen + extra]
            message = f"{name} has no sites to open {rules}; {through_hint(needed)} would open {counts[extra]}"
            if len(needed) < len(THROUGH_OPTIONS):
                every = len(sites_of(channel_groups(graph, THROUGH_OPTIONS)))
                message += f", and every option, {through_hint(THROUGH_OPTIONS)}, {every}"
            return SiteError(message + " (see tg.analyze for why each channel group is blocked)")
    return SiteError(
        f"{name} has no sites to open {rules}, nor with {through_hint(THROUGH_OPTIONS)}; "
        "see tg.analyze for why each channel group is blocked"
    )


@overload
def apply_edit(model: OnnxModel, group: ChannelGroup, edit: ChannelEdit, *, inplace: bool = ...) -> onnx.ModelProto: ...
@overload
def apply_edit(model: nn.Module, group: ChannelGroup, edit: ChannelEdit, *, inplace: bool = ...) -> nn.Module: ...
def apply_edit(model: AnyModel, group: ChannelGroup, edit: ChannelEdit, *, inplace: bool = False) -> Any:
    """Apply any channel edit (see :mod:`tunnelgraph.rewrite.edits`) to one group of ``model``; the new model."""
    return EditPass(group, edit, inplace=inplace)(adapter_for(model)).model


@overload
def reduce(
    model: OnnxModel, example_inputs: ExampleInputs | None = ..., *, data: Iterable[Any] | None = ...,
    batches: int | None = ..., tol: float = ..., through: Iterable[str] = ..., progress: bool = ...,
) -> tuple[onnx.ModelProto, ReductionReport]: ...
@overload
def reduce(
    model: nn.Module, example_inputs: ExampleInputs | None = ..., *, data: Iterable[Any] | None = ...,
    batches: int | None = ..., tol: float = ..., through: Iterable[str] = ..., progress: bool = ...,
) -> tuple[nn.Module, ReductionReport]: ...
def reduce(
    model: AnyModel,
    example_inputs: ExampleInputs | None = None,
    *,
    data: Iterable[Any] | None = None,
    batches: int | None = None,
    tol: float = 1e-12,
    through: Iterable[str] = (),
    progress: bool = False,
) -> tuple[Any, ReductionReport]:
    """Remove every reducible unit (docs/MATH.md section 2); return the smaller model and a report.

    Args:
        model: the network, a PyTorch module or an ONNX model (reduced into
            a new ``ModelProto``); not modified.
        example_inputs: inputs of its forward (to trace it, to read the
            constant activations of constant units, and to verify); for an
            ONNX model, random inputs of its declared shapes by default.
        data: optional batches (PyTorch models; ``batches`` limits them).
            Units the data show reducible within ``tol`` are then removed
            too, using the measured relation (the mean of a constant unit,
            the affine fit of a redundant one): an approximation whose
            function change the report gives.
        tol: relative tolerance of the parametric tests (see
            :func:`~tunnelgraph.analysis.reducibility.parametric_findings`)
            and of the empirical ones (see
            :func:`~tunnelgraph.analysis.reducibility.empirical_findings`).
        through: per-channel operations groups may pass (see :func:`find_sites`).

    Units are removed group by group, re-analysing after each group, until
    nothing reducible is left (:class:`~tunnelgraph.rewrite.passes.ReducePass`).
    A finding that cannot be applied exactly (a constant unit read by a conv
    that pads, a consumer without bias) is reported as skipped with the reason.
    """
    from tunnelgraph.equivalence import verify

    adapter = adapter_for(model)
    inputs = adapter.example_inputs(example_inputs)
    before = adapter.parameter_count()
    result, applied, skipped = ReducePass(
        inputs, data=data, batches=batches, tol=tol, through=through, progress=progress
    )(adapter)
    reduced = adapter.of(result.model)
    equivalence = verify(model, result.model, inputs) if applied else None
    report = ReductionReport(
        tuple(applied), tuple(skipped), before, reduced.parameter_count(), equivalence, result.records
    )
    logger.info("reduced %d units: %d -> %d parameters", len(applied), before, report.parameters_after)
    return (result.model if applied else adapter.copy()), report


def rewrite_records(model: AnyModel) -> list[RewriteRecord]:
    """Every rewrite ``model`` went through (open, close, reorganise, reduce, any edit), oldest first.

    Each :class:`~tunnelgraph.rewrite.passes.RewriteRecord` names the group,
    the channel edit (how every new channel derives from the old ones) and,
    for every parameter and buffer touched, its name, axis, old and new size
    and which new slices copy which old ones. Records travel with the model:
    a module keeps them in its ``tunnelgraph_records`` attribute (JSON-ready
    dicts, saved by ``torch.save``), an ONNX model in its metadata.
    """
    return adapter_for(model).records()


def save_records(model: AnyModel, path: str | os.PathLike[str]) -> list[RewriteRecord]:
    """Write ``model``'s rewrite records to ``path`` as JSON (a list of record dicts); returns them.

    Save it beside a ``state_dict`` checkpoint: :func:`replay` rebuilds the
    shapes in a freshly built model from it, so the checkpoint loads.
    """
    import json

    records = rewrite_records(model)
    with open(path, "w") as handle:
        json.dump([record.to_dict() for record in records], handle)
    return records


def replay(
    model: nn.Module, records: nn.Module | Sequence[RewriteRecord | dict[str, Any]] | str | os.PathLike[str]
) -> nn.Module:
    """Give a freshly built ``model`` the shapes a rewritten one has, so that its ``state_dict`` loads.

    ``model`` is built by the user's own code (``resnet18()``, ``MyNet()``):
    the same class as the model that was rewritten, before any rewrite. The
    records say, for every parameter and buffer each rewrite touched, how
    its channels changed; ``replay`` resizes the same tensors of ``model``
    **in place** (new entries are placeholders: load the rewritten model's
    ``state_dict`` next), updates the layers' size attributes
    (``out_channels``, ``in_features``, ``num_features``, ...), appends the
    records to ``model``'s own, and returns ``model``::

        tg.save_records(opened, "opened.json"); torch.save(opened.state_dict(), "opened.pt")
        fresh = tg.replay(MyNet(), "opened.json")
        fresh.load_state_dict(torch.load("opened.pt"))

    Args:
        model: the freshly built PyTorch module.
        records: the rewritten model itself (its records are read), a list
            of :class:`~tunnelgraph.rewrite.passes.RewriteRecord` (or their
            ``to_dict()`` dicts), or the path of a JSON file written by
            :func:`save_records`.

    Raises:
        RewriteError: a record names a tensor ``model`` does not have or
            that has another size (another class, or records that do not
            start from a freshly built model); ``model`` is unchanged then.
        TypeError: ``model`` is not a PyTorch module.

    A model whose forward hard-codes a width (``x.view(-1, 4608)``) comes
    back from a rewrite as a ``torch.fx.GraphModule`` with the new width;
    its own class cannot take it, and ``load_state_dict`` will say so.
    """
    import json

    import torch.nn as nn

    from tunnelgraph.backends.pytorch import replay as replay_records

    if not isinstance(model, nn.Module):
        raise TypeError(f"replay rebuilds the shapes of a PyTorch module; got {type(model).__name__}")
    if isinstance(records, nn.Module):
        entries: list[RewriteRecord] = rewrite_records(records)
    elif isinstance(records, (str, os.PathLike)):
        with open(records) as handle:
            entries = [RewriteRecord.from_dict(entry) for entry in json.load(handle)]
    else:
        entries = [entry if isinstance(entry, RewriteRecord) else RewriteRecord.from_dict(entry) for entry in records]
    adapter = adapter_for(model)
    target: nn.Module = adapter.model
    replay_records(target, entries)
    adapter.with_records(target, entries)
    logger.info("replayed %d rewrite(s) on a fresh %s", len(entries), type(target).__name__)
    return target


def _resolve(adapter: Adapter[Any], site: Site | str, example_inputs: Any, through: Iterable[str]) -> Site:
    """``site`` itself once checked against the model (a stale site is named as such), or the site of that name."""
    if isinstance(site, Site):
        check_shapes(site.group, adapter.shapes())
        return site
    if not isinstance(site, str):
        raise TypeError(f"site must be a tunnelgraph Site or its name, got {type(site).__name__}")
    try:
        graph = adapter.graph(example_inputs)
    except ValueError as error:
        raise SiteError(
            f"to find site {site!r} by name, pass example_inputs= (and through= if the site "
            "passes batch norm, pooling, dropout or depthwise layers), or pass a Site from "
            "tg.find_sites"
        ) from error
    return find_site(channel_groups(graph, check_through(through)), site)


def _lambda(lam: Lambda, site: Site) -> Coefficient:
    if hasattr(lam, "detach") and hasattr(lam, "cpu"):  # a torch tensor, without importing torch
        lam = lam.detach().cpu().double().numpy()
    array = np.asarray(lam, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError("lam must be finite")
    if array.ndim == 0:
        return float(array)
    if array.shape != (site.outbound_size,):
        raise ValueError(
            f"lam must be a number or a vector of {site.outbound_size} entries (one per outbound "
            f"weight of site {site.name}, consumers {', '.join(site.consumers)}); got shape "
            f"{array.shape}"
        )
    return array


def _edit(build: Callable[[], ChannelEdit]) -> ChannelEdit:
    """The edit ``build`` makes; an edit that does not fit the group is a :class:`SiteError`."""
    try:
        return build()
    except ValueError as error:
        raise SiteError(str(error)) from error

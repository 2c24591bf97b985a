"""The public entry points: find sites, analyse, and rewrite PyTorch and ONNX models.

Every rewrite returns a new model and leaves its input untouched unless
``inplace=True``; a rewrite that fails raises before anything is changed.
Models are PyTorch modules, or ONNX models (``onnx.ModelProto``, or a path
to an ``.onnx`` file), for which this module never imports torch: the
PyTorch machinery is imported when a PyTorch model is given.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence, Union

import numpy as np

from tunnelgraph.analysis.groups import THROUGH_OPTIONS, ChannelGroup, channel_groups, check_through, through_hint
from tunnelgraph.analysis.sites import AnalysisReport, Site, analyze_graph, find_site, sites_of
from tunnelgraph.errors import SiteError
from tunnelgraph.ir import Graph
from tunnelgraph.rewrite import edits
from tunnelgraph.rewrite.edits import ChannelEdit, Coefficient
from tunnelgraph.rewrite.plan import plan_edit

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from tunnelgraph.statistics.engine import LossFn, Method, SiteStatistics

logger = logging.getLogger(__name__)

ExampleInputs = Union["torch.Tensor", Sequence["torch.Tensor"]]
Lambda = Union[float, Sequence[float], np.ndarray, "torch.Tensor"]


def find_sites(
    model: nn.Module | Graph, example_inputs: ExampleInputs | None = None, *, through: Iterable[str] = ()
) -> list[Site]:
    """Every channel of ``model`` that can be cloned function-preservingly.

    Args:
        model: a PyTorch module (traced with ``torch.fx`` on
            ``example_inputs``) or an already traced :class:`Graph`.
        example_inputs: inputs of the model's forward (shapes matter).
        through: per-channel operations that sites may pass, cloning them
            with the channel: any of ``"batchnorm"``, ``"pooling"``,
            ``"dropout"``, ``"depthwise"``. By default, as in the paper,
            units feeding them are not sites.

    Returns:
        The sites, group by group in graph order, channels in order.
    """
    if _is_onnx(model):
        return sites_of(channel_groups(_onnx_graph(model), through))
    return sites_of(channel_groups(_graph(model, example_inputs), through))


def analyze(
    model: nn.Module | Graph,
    example_inputs: ExampleInputs | None = None,
    *,
    through: Iterable[str] = (),
    data: Iterable[Any] | None = None,
    batches: int | None = None,
    progress: bool = True,
) -> AnalysisReport:
    """Every hidden channel group of ``model``, legal or not, and why (see :func:`find_sites`).

    For a PyTorch model the report also lists the units its weights prove
    reducible (Sussmann's conditions, docs/MATH.md section 2; see
    :func:`tunnelgraph.reduce`). With ``data`` (batches of ``(inputs,
    targets)`` or of inputs; ``batches`` limits them) every unit also gets
    its empirical measures: outbound norm, activation mean and std, and the
    best affine fit by another unit of its group, so near-reducible units
    show too.
    """
    if _is_onnx(model):
        from tunnelgraph.backends.onnx import initializer_arrays
        from tunnelgraph.frontends.onnx import read_onnx

        proto, _ = read_onnx(model)
        if data is not None:
            raise TypeError("empirical measures run PyTorch models; convert the ONNX model first")
        return analyze_graph(_onnx_graph(proto), through, initializer_arrays(proto))
    if isinstance(model, Graph):
        if data is not None:
            raise TypeError("empirical measures need the model itself, not a traced Graph")
        return analyze_graph(model, through)
    import torch.nn as nn

    from tunnelgraph.backends.pytorch import weights_of
    from tunnelgraph.statistics.activity import unit_measures

    weights = weights_of(model) if isinstance(model, nn.Module) else None
    report = analyze_graph(_graph(model, example_inputs), through, weights)
    if data is not None:
        if not isinstance(model, nn.Module):
            raise TypeError("empirical measures need the model itself, not a traced Graph")
        measures = unit_measures(model, report.groups, data, batches=batches, progress=progress)
        ordered = tuple(measures[site.name] for site in report.sites)
        report = AnalysisReport(report.model, report.through, report.groups, report.reducibility, ordered)
    return report


def rewrite(
    model: nn.Module,
    site: Site | str,
    lam: Lambda = 0.5,
    *,
    example_inputs: ExampleInputs | None = None,
    through: Iterable[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """Open a tunnel: clone ``site``'s channel into a new last channel of its group.

    The clone copies the channel's inbound weights, bias and per-channel
    parameters (batch-norm statistics included). Outbound weight ``w`` of the
    channel becomes ``lam * w`` and the clone's ``(1 - lam) * w``, so the
    network computes the same function.

    Args:
        model: the network; not modified unless ``inplace``.
        site: a :class:`Site` from :func:`find_sites` on this model, or its
            name (then ``example_inputs`` and ``through`` are needed to find it).
        lam: a number, or a vector of ``site.outbound_size`` numbers in the
            order documented on :class:`Site` (consumer by consumer,
            row-major over each consumer's weight columns of the channel).
        inplace: edit ``model`` itself instead of a copy.

    Returns:
        The rewritten model, with one more channel in the site's group.
    """
    resolved = _resolve(model, site, example_inputs, through)
    vector = _lambda(lam, resolved)
    edit = edits.clone(resolved.group.size, resolved.channel, vector)
    return _apply(model, resolved.group, edit, inplace)


def merge(
    model: nn.Module,
    site: Site | str,
    into: int,
    *,
    example_inputs: ExampleInputs | None = None,
    through: Iterable[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """Close a tunnel: merge ``site``'s channel into channel ``into`` of the same group.

    Inbound weights, biases and per-channel parameters of ``into`` become the
    mean of the two channels; outbound weights are summed; ``site``'s
    channel is removed. Exact when the two channels have equal inbound
    weights (right after :func:`rewrite`); otherwise it changes the function,
    which :func:`verify` measures.
    """
    resolved = _resolve(model, site, example_inputs, through)
    edit = _edit(lambda: edits.merge(resolved.group.size, resolved.channel, into))
    return _apply(model, resolved.group, edit, inplace)


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


def reorganize(
    model: nn.Module,
    merge: tuple[Site | str, int] | None = None,
    clone: Site | str | int | None = None,
    lam: Lambda = 0.5,
    *,
    example_inputs: ExampleInputs | None = None,
    through: Iterable[str] = (),
    inplace: bool = False,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    batches: int | None = None,
    progress: bool = False,
) -> Any:
    """The paper's shape-preserving tunnel (docs/MATH.md section 6).

    ``merge = (site, into)`` merges ``site``'s channel into channel ``into``
    (as :func:`merge`); then ``clone`` (a site or a channel index of the same
    group) is cloned into the slot that the merge freed, splitting its
    outbound weights by ``lam`` (as :func:`rewrite`). Every shape is kept.
    The merge is exact only when the two merged channels are redundant;
    measure the change with :func:`verify`. Returns the new model.

    With ``merge=None``, ``clone`` must be a site and ``data`` is required:
    the most nearly redundant pair of the clone's group on the data (the
    largest ``|corr|`` of activations, the cloned channel never merged away)
    is merged, and the call returns ``(new_model, Reorganization)``, which
    reports the function change on the data (and the mean loss before and
    after, given ``loss_fn``).
    """
    if clone is None:
        raise TypeError("reorganize needs clone= (the site, or channel of the merged site's group, to clone)")
    if merge is None:
        return _reorganize_auto(
            model, clone, lam, example_inputs, through, inplace, data, loss_fn, batches, progress
        )
    merged_site, into = merge
    resolved = _resolve(model, merged_site, example_inputs, through)
    group = resolved.group
    if isinstance(clone, int):
        cloned = clone
    else:
        cloned_site = _resolve(model, clone, example_inputs, through)
        if cloned_site.group.name != group.name:
            raise SiteError(
                f"the cloned site {cloned_site.name} is not in the merged site's group '{group.name}'"
            )
        cloned = cloned_site.channel
    vector = _lambda(lam, resolved)
    edit = _edit(lambda: edits.reorganize(group.size, resolved.channel, into, cloned, vector))
    return _apply(model, group, edit, inplace)


def _reorganize_auto(
    model: nn.Module,
    clone: Site | str | int,
    lam: Lambda,
    example_inputs: ExampleInputs | None,
    through: Iterable[str],
    inplace: bool,
    data: Iterable[Any] | None,
    loss_fn: LossFn | None,
    batches: int | None,
    progress: bool,
) -> tuple[nn.Module, Reorganization]:
    if data is None:
        raise ValueError(
            "reorganize without merge= picks the most nearly redundant pair from data: pass data= "
            "(batches of (inputs, targets)), or name the pair with merge=(site, into)"
        )
    if isinstance(clone, int):
        raise TypeError("with merge=None, clone must be a Site (or a site name), not a channel index")
    from tunnelgraph.statistics.activity import unit_measures

    batches_list = list(itertools.islice(iter(data), batches)) if batches is not None else list(data)
    if not batches_list:
        raise ValueError("data yielded no batches")
    if example_inputs is None:
        example_inputs = _inputs_of(batches_list[0])
    site = _resolve(model, clone, example_inputs, through)
    group = site.group
    if group.size < 3:
        raise SiteError(f"group '{group.name}' has {group.size} channels: nothing to merge besides the clone")
    measures = unit_measures(model, [group], batches_list, progress=progress)
    candidates = [
        measures[f"{group.name}[{c}]"] for c in range(group.size) if c != site.channel
    ]
    best = max(candidates, key=lambda m: (m.correlation, -int(m.unit.rpartition("[")[2][:-1])))
    merged = int(best.unit.rpartition("[")[2][:-1])
    into = best.partner if best.partner is not None else (0 if merged else 1)
    merged_site = Site.of(group, merged)
    result = reorganize(
        model, merge=(merged_site, into), clone=site.channel, lam=lam, example_inputs=example_inputs,
        through=through, inplace=False,
    )
    change = function_change(model, result, batches_list, loss_fn)
    report = Reorganization(
        merged=best.unit, into=f"{group.name}[{into}]", correlation=best.correlation, **change
    )
    logger.info("reorganized %s: merged %s into %s (|corr| %.6f)", group.name, report.merged, report.into,
                best.correlation)
    if inplace:
        model.load_state_dict(result.state_dict())
        result = model
    return result, report


def function_change(
    before: nn.Module, after: nn.Module, data: Iterable[Any], loss_fn: LossFn | None = None
) -> dict[str, Any]:
    """Largest output change of ``after`` against ``before`` over ``data``, and mean losses (eval mode)."""
    import torch

    from tunnelgraph.runtime import preserved

    worst = reference = 0.0
    losses = [0.0, 0.0]
    samples = 0
    with preserved(before, train=False), preserved(after, train=False), torch.no_grad():
        for batch in data:
            inputs = _inputs_of(batch)
            inputs = inputs if isinstance(inputs, tuple) else (inputs,)
            first, second = before(*inputs), after(*inputs)
            worst = max(worst, float((first - second).abs().max()))
            reference = max(reference, float(first.abs().max()))
            count = int(inputs[0].shape[0])
            samples += count
            if loss_fn is not None:
                targets = batch[1]
                losses[0] += float(loss_fn(first, targets)) * count
                losses[1] += float(loss_fn(second, targets)) * count
    return {
        "max_abs_change": worst,
        "max_rel_change": worst / reference if reference else worst,
        "loss_before": losses[0] / samples if loss_fn is not None and samples else None,
        "loss_after": losses[1] / samples if loss_fn is not None and samples else None,
        "samples": samples,
    }


def _inputs_of(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs = batch[0]
    else:
        inputs = batch
    return tuple(inputs) if isinstance(inputs, list) else inputs


@dataclass(frozen=True)
class OpenedTunnel:
    """One tunnel that :func:`open_tunnels` opened.

    Attributes:
        site: the cloned site's name (in the model given to ``open_tunnels``).
        clone: the channel index of the clone in the returned model's group.
        lam: the outbound split used, ``lambda_t(statistics, t)``.
        statistics: what was measured for the site.
    """

    site: str
    clone: int
    lam: torch.Tensor
    statistics: SiteStatistics

    def __repr__(self) -> str:
        lam = self.lam.detach()
        span = f" in [{float(lam.min()):.4g}, {float(lam.max()):.4g}]" if lam.numel() else ""
        return (
            f"OpenedTunnel(site={self.site!r}, clone={self.clone}, lam={tuple(lam.shape)}{span}, "
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
    progress: bool = True,
) -> tuple[nn.Module, list[OpenedTunnel]]:
    """Measure every site, rank them, and open the ``k`` steepest tunnels with ``lambda_t``.

    Args:
        model: the network; not modified.
        data, loss_fn, batches, device, method, progress: as for
            :func:`tunnelgraph.a_statistics`.
        k: how many tunnels to open (distinct sites, best first).
        t: the radius of ``lambda_t``.
        sites: candidate sites; default: every site of ``model`` (found on
            the first batch's inputs with ``through``).
        through: per-channel operations sites may pass (see :func:`find_sites`).

    Returns:
        The new model (with ``k`` more channels in total) and the tunnels
        opened, steepest first. After opening, the loss is unchanged and the
        inbound gradients of each pair are ``A lambda_t`` and
        ``A (1 - lambda_t)``.
    """
    import torch

    from tunnelgraph.runtime import model_device, to_device, unwrap_model
    from tunnelgraph.statistics.engine import a_statistics, measurable
    from tunnelgraph.statistics.lambdas import lambda_t, rank_sites

    if k < 1:
        raise ValueError(f"k must be a positive number of tunnels, got {k}")
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise ValueError("data yielded no batches; pass an iterable of (inputs, targets) batches")
    data = itertools.chain([first], iterator)
    example = first[0] if isinstance(first, (tuple, list)) else None
    example = tuple(example) if isinstance(example, (tuple, list)) else example
    model = unwrap_model(model)
    example = to_device(example, torch.device(device) if device is not None else model_device(model))
    chosen = check_through(through)
    if sites is not None:
        candidates = list(sites)
    else:
        found = find_sites(model, example, through=chosen)
        candidates = [site for site in found if measurable(site)]
        if len(candidates) < len(found):
            logger.info(
                "left out %d site(s) whose group a layer both produces and reads (A is not defined there)",
                len(found) - len(candidates),
            )
    if not candidates:
        if sites is not None:
            raise ValueError("sites= is empty: pass sites from tg.find_sites, or sites=None to measure every site")
        raise _no_sites_error(model, example, chosen)
    stats = a_statistics(
        model, candidates, data, loss_fn, batches=batches, device=device, progress=progress, method=method
    )
    best = rank_sites(stats)[:k]
    result = model
    opened = []
    for entry in best:
        if entry.sigma == 0:
            logger.warning("site %s has sigma_max(A) = 0: its tunnel is flat", entry.site)
        site = _resolve(result, entry.site, example, chosen)
        lam = lambda_t(entry, t)
        result = rewrite(result, site, lam)
        opened.append(OpenedTunnel(entry.site, site.group.size, lam, entry))
        logger.info("opened %s (sigma %.3g) as channel %d", entry.site, entry.sigma, site.group.size)
    return result, opened


def _no_sites_error(model: nn.Module, example: ExampleInputs, chosen: tuple[str, ...]) -> SiteError:
    """The error for a model without sites, naming the smallest ``through=`` that would give it some."""
    graph = _graph(model, example)
    name = type(model).__name__
    rules = f"with {through_hint(chosen)}" if chosen else "under the default rules"
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


def apply_edit(model: nn.Module, group: ChannelGroup, edit: ChannelEdit, *, inplace: bool = False) -> nn.Module:
    """Apply any channel edit (see :mod:`tunnelgraph.rewrite.edits`) to one group of ``model``."""
    _check_fits(model, group)
    return _apply(model, group, edit, inplace)


def _check_fits(model: Any, group: ChannelGroup) -> None:
    """Raise :class:`SiteError` when ``group`` was found on another model (its parameter shapes differ).

    Checked before an edit is built, so that a stale site is named as such
    rather than as a channel index out of range.
    """
    if _is_onnx(model):
        from tunnelgraph.backends.onnx import check_fits
        from tunnelgraph.frontends.onnx import read_onnx

        check_fits(read_onnx(model)[0], group)
    else:
        from tunnelgraph.backends.pytorch import check_fits as check_module_fits

        check_module_fits(model, group)


def _apply(model: Any, group: ChannelGroup, edit: ChannelEdit, inplace: bool) -> Any:
    if not group.legal:
        raise SiteError(f"group '{group.name}' cannot be rewritten: {'; '.join(group.reasons)}")
    plan = plan_edit(group, edit)
    if _is_onnx(model):
        from tunnelgraph.backends.onnx import apply_plan_onnx
        from tunnelgraph.frontends.onnx import read_onnx

        if inplace:
            raise ValueError("ONNX models are rewritten into a new ModelProto; inplace=True is for PyTorch modules")
        return apply_plan_onnx(read_onnx(model)[0], plan)
    from tunnelgraph.backends.pytorch import apply_plan

    result = apply_plan(model, plan, inplace=inplace)
    logger.debug("group '%s': %d -> %d channels", group.name, group.size, plan.result.size)
    return result


def _is_onnx(model: Any) -> bool:
    """An ``onnx.ModelProto``, or a path or bytes of an ``.onnx`` file."""
    if isinstance(model, (str, os.PathLike)):
        return str(model).endswith(".onnx")
    if isinstance(model, bytes):
        return True
    try:
        import onnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, onnx.ModelProto)


def _onnx_graph(model: Any) -> Graph:
    from tunnelgraph.frontends.onnx import load_onnx

    return load_onnx(model)


def _graph(model: nn.Module | Graph, example_inputs: ExampleInputs | None) -> Graph:
    if isinstance(model, Graph):
        return model
    import torch.nn as nn

    from tunnelgraph.frontends.fx import trace

    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected an nn.Module, an ONNX model (ModelProto or .onnx path) or a tunnelgraph Graph, "
            f"got {type(model).__name__}"
        )
    if example_inputs is None:
        raise ValueError(
            "example_inputs are required to trace a PyTorch model: pass a tensor (or a tuple of "
            "tensors) of the shape the model's forward expects"
        )
    return trace(model, example_inputs)


def _resolve(
    model: nn.Module, site: Site | str, example_inputs: ExampleInputs | None, through: Iterable[str]
) -> Site:
    if isinstance(site, Site):
        _check_fits(model, site.group)
        return site
    if not isinstance(site, str):
        raise TypeError(f"site must be a tunnelgraph Site or its name, got {type(site).__name__}")
    if _is_onnx(model):
        return find_site(channel_groups(_onnx_graph(model), check_through(through)), site)
    if example_inputs is None:
        raise SiteError(
            f"to find site {site!r} by name, pass example_inputs= (and through= if the site "
            "passes batch norm, pooling, dropout or depthwise layers), or pass a Site from "
            "tg.find_sites"
        )
    return find_site(channel_groups(_graph(model, example_inputs), check_through(through)), site)


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


def _edit(build) -> ChannelEdit:  # type: ignore[no-untyped-def]
    try:
        return build()
    except ValueError as error:
        raise SiteError(str(error)) from error

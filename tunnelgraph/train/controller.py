"""Tunnels opened and closed from inside the user's own training loop.

A :class:`TunnelController` is a few lines added to a plain PyTorch loop; it
does not run the loop::

    controller = TunnelController(model, optimizer, loss_fn, data=loader,
                                  open_at=[50], close_after=250, k=2)
    for x, y in loader:
        loss = loss_fn(controller.model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        controller.step(loss)         # may open or close tunnels now

At a step in ``open_at``, or when its :class:`PlateauDetector` fires, it
measures A on a few batches of ``data`` (or takes the moving average of a
:class:`~tunnelgraph.statistics.tracker.StatisticsTracker`), ranks the
sites, and opens the ``k`` steepest with ``lambda_t`` (or a random lambda of
the same radius, the paper's control), or reorganises them (shapes kept).
``close_after`` steps later it merges each clone back into the unit it was
cloned from. Every rewrite is done in place on the user's module (its
module and parameter objects stay the ones the user holds), the user's
optimizer follows (:func:`~tunnelgraph.train.update_optimizer`), and each
event is logged and kept in :attr:`TunnelController.events`.

Data parallel: with ``torch.distributed`` initialised, the plateau test
reads the loss averaged over ranks, the statistics are all-reduced, rank 0's
choice of sites and lambdas is broadcast, every rank applies the same
rewrite at the same step, and a DistributedDataParallel model is wrapped
anew (its buckets were sized for the old shapes): use
:attr:`TunnelController.model` for the forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from tunnelgraph.analysis.groups import through_rules
from tunnelgraph.analysis.sites import Site
from tunnelgraph.api import find_sites, function_change, merge, rewrite, rewrite_records
from tunnelgraph.runtime import batch_parts, model_device, to_device, unwrap_model
from tunnelgraph.statistics.activity import unit_measures
from tunnelgraph.statistics.engine import Method, SiteStatistics, a_statistics, measurable
from tunnelgraph.statistics.lambdas import lambda_t, random_lambda, rank_sites
from tunnelgraph.statistics.tracker import StatisticsTracker
from tunnelgraph.train.optimizer import SurgeryMode, update_optimizer
from tunnelgraph.train.plateau import PlateauDetector

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LambdaChoice = Literal["steepest", "random"]
Action = Literal["open", "reorganize"]


@dataclass(frozen=True)
class TunnelEvent:
    """One thing a :class:`TunnelController` did.

    Attributes:
        step: optimizer steps completed when it happened.
        action: ``"open"``, ``"close"`` or ``"reorganize"``.
        reason: ``"scheduled"`` (a step of ``open_at``), ``"plateau"`` or
            ``"close_after"``.
        sites: the sites acted on (names in the model as it was before).
        channels: for ``"open"``, the clones' channel indices; for
            ``"close"``, the channels each clone was merged into; for
            ``"reorganize"``, the cloned units' indices after the merges.
        sigma: the top singular value of A of each opened site (empty otherwise).
        loss_before, loss_after: mean loss on the statistics batches before
            and after the rewrite (None when ``check=False``).
        max_rel_change: largest output change on those batches, relative to
            the largest output (0 up to rounding for an opening).
        seconds: wall-clock time of the event (statistics, rewrite, check).
        merged: for ``"reorganize"``, the pairs merged first, as
            ``"group[unit] -> [into]"`` (channel indices before the event).
    """

    step: int
    action: str
    reason: str
    sites: tuple[str, ...]
    channels: tuple[int, ...]
    sigma: tuple[float, ...]
    loss_before: float | None
    loss_after: float | None
    max_rel_change: float | None
    seconds: float
    merged: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)


@dataclass(frozen=True)
class _Pending:
    due: int
    group: str
    clone: int
    origin: int


class TunnelController:
    """Opens the steepest tunnels at a plateau (or at given steps) and closes them later.

    Args:
        model: the model being trained (an ``nn.Module``, or a
            DistributedDataParallel wrapper). Rewrites edit the module in
            place; a DDP wrapper is replaced (see :attr:`model`).
        optimizer: the optimizer of the user's loop; it is updated in place
            after every rewrite (``surgery`` mode) and stays the same object.
        loss_fn: ``loss_fn(outputs, targets)``, the batch-mean loss.
        data: batches ``(inputs, targets)`` (a DataLoader, a list) from which
            each event draws ``batches`` batches for the statistics and the
            check; drawn under :func:`torch.random.fork_rng`, so the loop's
            random number stream is not disturbed.
        k: tunnels per event (distinct sites, steepest first).
        one_per_group: at most one tunnel per channel group per event (the
            paper's deep experiment opens one filter in each of two layers).
        t: the radius of lambda (``lam = 1/2 + t * direction``).
        lam: ``"steepest"`` (``lambda_t``, the paper's method) or
            ``"random"`` (a uniformly random direction, the paper's control).
        action: ``"open"`` (clone, adds ``k`` channels; ``close_after``
            merges them back) or ``"reorganize"`` (merge the most nearly
            redundant pair of the group and clone into the freed slot:
            shapes kept).
        open_at: steps (optimizer steps completed) at which to act.
        detector: act also when this detector reports a plateau (fed the
            losses passed to :meth:`step`, averaged over ranks).
        close_after: merge each opened clone back into its origin this
            many steps after opening (None: keep the tunnels open).
        max_events: at most this many opening/reorganising events.
        batches: batches of ``data`` used per event.
        sites: candidate sites (names or :class:`Site`); default: every
            site of the model for which A is defined. That the model has a
            site to open, and that every name here is one (under
            ``through``), is checked when the controller is made: a
            ValueError then, not at the first event.
        through: per-channel operations sites may pass (see
            :func:`tunnelgraph.find_sites`).
        track: keep A as a moving average during training with a
            :class:`StatisticsTracker` (``decay``), instead of a pass over
            ``batches`` batches at each event.
        surgery: the optimizer surgery mode (see :func:`update_optimizer`).
        check: measure the loss before and after every rewrite (copies the
            module once per event).
        generator: draws of ``lam="random"``.
        wrap: rebuilds the training wrapper around the module after a
            rewrite; default: a DDP wrapper is rebuilt with its own options,
            a plain module is used as it is.
        method: the statistics path (see :func:`tunnelgraph.a_statistics`).
        progress: progress bars during the statistics pass.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        data: Iterable[Any],
        *,
        k: int = 1,
        one_per_group: bool = False,
        t: float = 1.0,
        lam: LambdaChoice = "steepest",
        action: Action = "open",
        open_at: Iterable[int] = (),
        detector: PlateauDetector | None = None,
        close_after: int | None = None,
        max_events: int | None = None,
        batches: int = 4,
        sites: Sequence[Site | str] | None = None,
        through: Iterable[str] = (),
        track: bool = False,
        decay: float = 0.9,
        surgery: SurgeryMode = "carry",
        check: bool = True,
        generator: torch.Generator | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        method: Method = "auto",
        progress: bool = False,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be a positive number of tunnels, got {k}")
        if lam not in ("steepest", "random"):
            raise ValueError(f"lam must be 'steepest' or 'random', got {lam!r}")
        if action not in ("open", "reorganize"):
            raise ValueError(f"action must be 'open' or 'reorganize', got {action!r}")
        if action == "reorganize" and close_after is not None:
            raise ValueError("a reorganisation keeps every shape: there is nothing to close; leave close_after=None")
        if close_after is not None and close_after < 1:
            raise ValueError(f"close_after must be a positive number of steps, got {close_after}")
        if batches < 1:
            raise ValueError(f"batches must be at least 1, got {batches}")
        self.open_at = sorted({int(s) for s in open_at})
        if any(s < 0 for s in self.open_at):
            raise ValueError(f"open_at holds negative steps: {self.open_at}")
        if not self.open_at and detector is None:
            raise ValueError("nothing would ever happen: pass open_at=[steps] or detector=PlateauDetector()")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._model = model
        self.module = unwrap_model(model)
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.data = data
        self.k, self.t, self.lam, self.action = k, float(t), lam, action
        self.one_per_group = one_per_group
        self.detector = detector
        self.close_after = close_after
        self.max_events = max_events
        self.batches = batches
        self.site_names = None if sites is None else [s.name if isinstance(s, Site) else str(s) for s in sites]
        self.through = tuple(through)
        self.surgery: SurgeryMode = surgery
        self.check = check
        self.generator = generator
        self.wrap = wrap
        self.method = method
        self.progress = progress
        self.decay = decay
        self.steps = 0
        self.events: list[TunnelEvent] = []
        self._pending: list[_Pending] = []
        self._opened = 0
        self._example = self._draw(1)[0][0]
        self._tracker: StatisticsTracker | None = None
        candidates = self._candidates()  # no site to open, or a name in sites= that is none: said now, not mid-run
        self._check_names(candidates)
        if track:
            self._tracker = self._new_tracker(candidates)

    # -- the loop's interface ---------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The model to train with now: the user's module, or the current DDP wrapper around it."""
        return self._model

    def step(self, loss: float | torch.Tensor | None = None, grad_norm: float | None = None) -> list[TunnelEvent]:
        """Call once after every ``optimizer.step()``; returns what was done at this step.

        Args:
            loss: this step's training loss (needed with a ``detector``).
            grad_norm: this step's gradient norm, for a detector with ``grad_tol``.
        """
        self.steps += 1
        if self._tracker is not None:
            self._tracker.update()
        plateau = False
        if self.detector is not None:
            if loss is None:
                raise ValueError("this controller has a plateau detector: pass the step's loss to step(loss)")
            plateau = self.detector.update(_mean_over_ranks(loss, model_device(self.module)), grad_norm)
        done: list[TunnelEvent] = []
        due = [p for p in self._pending if p.due <= self.steps]
        if due:
            done.append(self._close(due))
        budget = self.max_events is None or self._opened < self.max_events
        reason = "scheduled" if self.steps in self.open_at else "plateau" if plateau else None
        if reason is not None and budget:
            done.append(self._open(reason))
        if done and self.detector is not None:
            self.detector.reset()
        return done

    def close(self) -> None:
        """Remove the tracker's hooks (if any); the model and optimizer stay as they are."""
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None

    def summary(self) -> dict[str, Any]:
        """The events so far, JSON-serialisable."""
        return {"steps": self.steps, "events": [event.to_dict() for event in self.events]}

    # -- events -------------------------------------------------------------------------

    def _open(self, reason: str) -> TunnelEvent:
        start = time.perf_counter()
        batches = self._draw(self.batches)
        plan = _agree(self._plan(batches))
        before = copy.deepcopy(self.module) if self.check else None
        count = len(rewrite_records(self.module))
        if self.action == "reorganize":
            return self._reorganize(reason, plan, batches, before, count, start)
        channels: list[int] = []
        done: list[tuple[str, torch.Tensor, float]] = []
        with self._consistent_on_failure(count):
            for name, lam, sigma in plan:
                if len(done) == self.k:
                    break
                site = self._site(name)
                if site.outbound_size != lam.numel():
                    # an earlier tunnel of this event widened this site's consumers: A was measured
                    # for the old shapes, so measure this site again on the model as it is now
                    logger.info("step %d: measuring %s again (an earlier tunnel widened its consumers)",
                                self.steps, name)
                    (name, lam, sigma), = _agree(self._plan(batches, [site], fresh=True))
                rewrite(self.module, site, lam, example_inputs=self._example, through=self.through, inplace=True)
                channels.append(site.group.size)
                if self.close_after is not None:
                    self._pending.append(_Pending(self.steps + self.close_after, site.group.name,
                                                  site.group.size, site.channel))
                done.append((name, lam, sigma))
        self._opened += 1
        sigmas = tuple(float(s) for _, _, s in done)
        return self._finish("open", reason, done, channels, sigmas, before, batches, count, start)

    def _reorganize(
        self, reason: str, plan: list[tuple[str, torch.Tensor, float]], batches: list[Any],
        before: nn.Module | None, count: int, start: float,
    ) -> TunnelEvent:
        """The paper's reorganisation of ``k`` units (section 3.2): merge ``k`` pairs, then open ``k`` tunnels.

        In each group of the chosen sites, the most nearly redundant disjoint
        pairs (largest ``|corr|`` of activations on the batches; the chosen
        units are never merged) are merged, one per chosen unit; then A is
        measured again on the merged model and each chosen unit is cloned
        with ``lambda`` into a new last channel. Every shape is kept.
        """
        chosen: dict[str, list[tuple[str, int]]] = {}
        for name, _, _ in plan[: self.k]:
            site = self._site(name)
            chosen.setdefault(site.group.name, []).append((name, site.channel))
        merged: list[str] = []
        cloned: list[tuple[str, int]] = []
        with self._consistent_on_failure(count):
            for group_name, units in chosen.items():
                group = self._site(units[0][0]).group
                keep = {channel for _, channel in units}
                pairs = _disjoint_pairs(unit_measures(self.module, [group], batches, progress=False), group.name,
                                        keep, len(units))
                if len(pairs) < len(units):
                    logger.warning("step %d: only %d pair(s) of %s can merge; reorganising %d unit(s)",
                                   self.steps, len(pairs), group_name, len(pairs))
                alive = list(range(group.size))
                for unit, into in sorted(pairs, reverse=True):
                    merge(self.module, f"{group_name}[{alive.index(unit)}]", into=alive.index(into),
                          example_inputs=self._example, through=self.through, inplace=True)
                    alive.remove(unit)
                    merged.append(f"{group_name}[{unit}] -> [{into}]")
                cloned += [(name, alive.index(channel)) for name, channel in units[: len(pairs)]]
            done: list[tuple[str, torch.Tensor, float]] = []
            for original, channel in cloned:
                site = self._site(f"{original.rpartition('[')[0]}[{channel}]")
                (_, lam, sigma), = _agree(self._plan(batches, [site], fresh=True))
                rewrite(self.module, site, lam, example_inputs=self._example, through=self.through, inplace=True)
                done.append((original, lam, sigma))
        self._opened += 1
        sigmas = tuple(float(s) for _, _, s in done)
        return self._finish("reorganize", reason, done, [c for _, c in cloned], sigmas, before, batches, count, start,
                            merged=tuple(merged))

    def _close(self, due: list[_Pending]) -> TunnelEvent:
        start = time.perf_counter()
        batches = self._draw(self.batches) if self.check else []
        before = copy.deepcopy(self.module) if self.check else None
        count = len(rewrite_records(self.module))
        # highest clone first: removing a channel shifts the ones above it down
        ordered = sorted(due, key=lambda p: (p.group, -p.clone))
        with self._consistent_on_failure(count):
            for pending in ordered:
                merge(self.module, f"{pending.group}[{pending.clone}]", into=pending.origin,
                      example_inputs=self._example, through=self.through, inplace=True)
        self._pending = [_shifted(p, ordered) for p in self._pending if p not in due]
        plan = [(f"{p.group}[{p.clone}]", None, 0.0) for p in ordered]
        return self._finish("close", "close_after", plan, [p.origin for p in ordered], (), before, batches,
                            count, start)

    def _finish(
        self, action: str, reason: str, plan: Sequence[tuple[Any, ...]], channels: Sequence[int],
        sigma: tuple[float, ...], before: nn.Module | None, batches: list[Any], count: int, start: float,
        merged: tuple[str, ...] = (),
    ) -> TunnelEvent:
        records = rewrite_records(self.module)[count:]
        update_optimizer(self.optimizer, self.module, records, mode=self.surgery)
        self._model = self._rewrapped()
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = self._new_tracker()
        change: dict[str, Any] = {"loss_before": None, "loss_after": None, "max_rel_change": None}
        if before is not None:
            measured = function_change(before, self.module, batches, self.loss_fn)
            change = {key: measured[key] for key in change}
        event = TunnelEvent(
            step=self.steps, action=action, reason=reason, sites=tuple(str(p[0]) for p in plan),
            channels=tuple(int(c) for c in channels), sigma=sigma, seconds=time.perf_counter() - start,
            merged=merged, **change,
        )
        self.events.append(event)
        logger.info(
            "step %d: %s %s (%s)%s", event.step, action, ", ".join(event.sites), reason,
            "" if event.loss_before is None else f"; loss {event.loss_before:.6g} -> {event.loss_after:.6g}",
        )
        return event

    # -- helpers ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _consistent_on_failure(self, count: int) -> Iterator[None]:
        """If a rewrite of an event fails, the optimizer still follows the rewrites done before it."""
        try:
            yield
        except Exception:
            records = rewrite_records(self.module)[count:]
            if records:
                logger.error("step %d: a rewrite failed after %d others; the optimizer follows those",
                             self.steps, len(records))
                update_optimizer(self.optimizer, self.module, records, mode=self.surgery)
                self._model = self._rewrapped()
            raise

    def _plan(
        self, batches: list[Any], candidates: list[Site] | None = None, fresh: bool = False
    ) -> list[tuple[str, list[float], float]]:
        """The steepest sites with their lambdas, best first: ``[(site name, lam, sigma)]``.

        ``fresh``: measure on ``batches`` even when a tracker keeps A (its
        average belongs to the shapes before this event's rewrites).
        """
        if candidates is None:
            candidates = self._candidates()
        stats: dict[str, SiteStatistics]
        if self._tracker is not None and not fresh:
            stats = self._tracker.statistics()
        else:
            stats = a_statistics(self.module, candidates, batches, self.loss_fn, method=self.method,
                                 progress=self.progress)
        # the k steepest, and some more for one_per_group
        ranked = rank_sites([stats[site.name] for site in candidates if site.name in stats])
        if self.one_per_group:
            ranked = list({entry.site.group.name: entry for entry in reversed(ranked)}.values())[::-1]
            ranked = rank_sites(ranked)
        chosen = ranked[: 4 * self.k + 4]
        plan = []
        for entry in chosen:
            if self.lam == "steepest":
                lam = lambda_t(entry, self.t)
            else:
                lam = random_lambda(entry.site, self.t, generator=self.generator)
            plan.append((entry.name, lam.tolist(), float(entry.sigma)))
        return plan

    def _candidates(self) -> list[Site]:
        found = [site for site in find_sites(self.module, self._example, through=self.through) if measurable(site)]
        if self.site_names is not None:
            wanted = set(self.site_names)
            found = [site for site in found if site.name in wanted]
        if not found:
            raise ValueError(
                "no site to open in this model"
                + (f" among sites={self.site_names}" if self.site_names is not None else "")
                + "; see tg.analyze(model, x) for why, and through= for the operations sites may pass"
            )
        return found

    def _check_names(self, candidates: Sequence[Site]) -> None:
        """Raise ValueError naming the entries of ``sites=`` that are no site of the model among ``candidates``."""
        if self.site_names is None:
            return
        found = {site.name for site in candidates}
        unknown = [name for name in self.site_names if name not in found]
        if unknown:
            raise ValueError(
                f"sites={unknown} name no site of this model {through_rules(self.through)} for which A is measured; "
                "pass names that tg.find_sites(model, x) gives with this controller's through=, or the through= you "
                "found them with"
            )

    def _site(self, name: str) -> Site:
        sites = {site.name: site for site in find_sites(self.module, self._example, through=self.through)}
        return sites[name]

    def _draw(self, count: int) -> list[Any]:
        """``count`` batches of ``data`` (moved to the model's device), without touching the loop's RNG."""
        with torch.random.fork_rng(devices=[]):
            batches = list(itertools.islice(iter(self.data), count))
        if not batches:
            raise ValueError("data yielded no batches; pass an iterable of (inputs, targets) batches")
        device = model_device(self.module)
        return [to_device(batch_parts(batch), device) for batch in batches]

    def _new_tracker(self, candidates: Sequence[Site] | None = None) -> StatisticsTracker:
        """A tracker of ``candidates`` (default: the model's candidate sites now)."""
        if candidates is None:
            candidates = self._candidates()
        return StatisticsTracker(self.module, list(candidates), example_inputs=self._example, decay=self.decay)

    def _rewrapped(self) -> nn.Module:
        if self.wrap is not None:
            return self.wrap(self.module)
        old = self._model
        if isinstance(old, nn.parallel.DistributedDataParallel):
            return nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=old.device_ids,
                output_device=old.output_device,
                dim=old.dim,
                **_buffer_sync(old),
                process_group=old.process_group,
                bucket_cap_mb=old.bucket_bytes_cap / (1024 * 1024),
                find_unused_parameters=old.find_unused_parameters,
                gradient_as_bucket_view=old.gradient_as_bucket_view,
                static_graph=old.static_graph,
            )
        return old


def _buffer_sync(old: nn.parallel.DistributedDataParallel) -> dict[str, Any]:
    """The old wrapper's buffer-sync option, under the name this torch version takes."""
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters:
        return {"forward_sync_buffers": old.forward_sync_buffers}
    return {"broadcast_buffers": old.require_forward_param_sync}


def _disjoint_pairs(
    measures: dict[str, Any], group: str, keep: set[int], count: int
) -> list[tuple[int, int]]:
    """Up to ``count`` disjoint ``(unit, into)`` pairs, most nearly redundant first, touching no unit of ``keep``."""
    ranked = sorted(
        ((m.correlation, int(name.rpartition("[")[2][:-1]), m.partner) for name, m in measures.items()
         if name.startswith(f"{group}[") and m.partner is not None),
        key=lambda entry: (-entry[0], entry[1]),
    )
    used = set(keep)
    pairs: list[tuple[int, int]] = []
    for _, unit, partner in ranked:
        if len(pairs) == count:
            break
        if unit in used or partner in used:
            continue
        pairs.append((unit, partner))
        used |= {unit, partner}
    return pairs


def _shifted(pending: _Pending, removed: Sequence[_Pending]) -> _Pending:
    """``pending`` after the channels ``removed`` were merged away from its group (indices shift down)."""
    gone = [p.clone for p in removed if p.group == pending.group]
    clone = pending.clone - sum(1 for c in gone if c < pending.clone)
    origin = pending.origin - sum(1 for c in gone if c < pending.origin)
    return _Pending(pending.due, pending.group, clone, origin)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _mean_over_ranks(loss: float | torch.Tensor, device: torch.device) -> float:
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not _distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor) / dist.get_world_size()


def _agree(plan: list[tuple[str, list[float], float]]) -> list[tuple[str, torch.Tensor, float]]:
    """Rank 0's plan on every rank (the same sites and lambdas, bit for bit)."""
    if _distributed():
        box: list[Any] = [plan]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
    return [(name, torch.tensor(lam, dtype=torch.float64), sigma) for name, lam, sigma in plan]

"""A moving average of A kept during training, the paper's cheap approximation (appendix B).

The tracker installs the same hooks as :func:`tunnelgraph.a_statistics` on
the model being trained. Each training iteration's forward records the
producers' inputs and outputs, its backward the consumers' errors; the
iteration's A (for the batch-mean loss the iteration differentiated) is
folded into an exponential moving average, when :meth:`update` is called or,
at the latest, when the next forward starts. No extra pass over data is
needed: opening a tunnel at step ``s`` uses A averaged over the iterations
before it.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn as nn

from tunnelgraph.analysis.sites import Site
from tunnelgraph.errors import StatisticsError
from tunnelgraph.frontends.fx import trace
from tunnelgraph.ir import Graph
from tunnelgraph.statistics.capture import Recorder
from tunnelgraph.statistics.chain import GroupChain
from tunnelgraph.statistics.engine import (
    DEFAULT_MEMORY_BUDGET,
    SiteStatistics,
    check_finite,
    check_graph,
    check_sites_fit,
    check_statistics,
    exact_a,
    statistics_dtype,
    statistics_from_a,
    unwrap_model,
)

logger = logging.getLogger(__name__)


class StatisticsTracker:
    """Keeps A of some sites as an exponential moving average over training iterations.

    Usage::

        tracker = tg.StatisticsTracker(model, sites, example_inputs=x, decay=0.9)
        # or, with the graph the sites were found on: StatisticsTracker(model, sites, graph=graph)
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tracker.update()          # optional: the next forward does it too
        stats = tracker.statistics()  # dict like tg.a_statistics(...)
        tracker.close()               # or use the tracker as a context manager

    Args:
        model: the model being trained (a DistributedDataParallel wrapper is
            unwrapped; each rank then tracks its own batches).
        sites: the sites to track, from :func:`tunnelgraph.find_sites` on this model.
        example_inputs: inputs of the model's forward, to trace it; not
            needed when ``graph`` is given.
        graph: the model's graph, from :func:`tunnelgraph.trace` on this
            very model (not a copy), e.g. the one the sites were found on;
            it is used as it is instead of tracing the model again.
        decay: weight of the past in the average; ``A <- decay * A + (1 - decay) * A_batch``.
        every: record one training iteration in ``every`` (the others cost nothing).
        memory_budget: bytes of working memory per update, as for ``a_statistics``.

    In training mode, batch norm inside a site's chain is linearised with
    its batch statistics (as the training forward used them); dropout inside
    a chain must be off, since its random mask cannot be replayed.
    Forward passes without a backward (evaluation under ``torch.no_grad``)
    are ignored, and so are iterations whose values are NaN or infinite
    (logged, counted in ``skipped``). The average is bias-corrected, as
    Adam's moments are, so early estimates are not shrunk towards zero.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[Site],
        *,
        example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
        graph: Graph | None = None,
        decay: float = 0.9,
        every: int = 1,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"every must be a positive number of iterations, got {every}")
        if not sites:
            raise ValueError("pass at least one site to track (tg.find_sites(model, example_inputs))")
        self.model = unwrap_model(model)
        self.decay = decay
        self.every = every
        self.memory_budget = memory_budget
        if graph is not None:
            check_graph(self.model, graph)
        elif example_inputs is not None:
            graph = trace(self.model, example_inputs)
        else:
            raise ValueError("pass example_inputs= (to trace the model) or graph= (tg.trace(model, example_inputs))")
        by_group: dict[str, list[Site]] = {}
        for site in sites:
            by_group.setdefault(site.group.name, []).append(site)
        self.groups: list[tuple[GroupChain, list[Site]]] = []
        for members in by_group.values():
            check_sites_fit(self.model, members[0])
            self.groups.append((GroupChain(self.model, graph, members[0].group), members))
        self.averages: dict[str, torch.Tensor] = {}
        self.updates = 0
        self.skipped = 0  # iterations left out because a value was NaN or infinite
        self.samples = 0
        self._forwards = 0
        self._pending = False
        self._handle = self.model.register_forward_pre_hook(self._before_forward)
        source = self.groups[0][0].source if self.groups else None
        self.recorder = Recorder(self.model, source, [chain.tap() for chain, _ in self.groups]).__enter__()

    # -- lifecycle -----------------------------------------------------------------
    def close(self) -> None:
        """Remove the hooks; the averages stay readable."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            self.recorder.__exit__()

    def __enter__(self) -> "StatisticsTracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _before_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.update()
        self.recorder.active = self._forwards % self.every == 0
        self._pending = self.recorder.active
        self._forwards += 1

    # -- averaging -----------------------------------------------------------------
    def update(self) -> bool:
        """Fold the last recorded iteration into the average; False if there was none."""
        if not self._pending:
            return False
        self._pending = False
        if not self.recorder.capture.errors:  # a forward without backward
            self.recorder.discard()
            return False
        capture = self.recorder.take()
        try:
            check_finite(capture, self._forwards - 1)
        except StatisticsError as error:
            logger.warning("the tracker skips training iteration %d: %s", self._forwards - 1, error)
            self.skipped += 1
            return False
        keep = 1.0 - self.decay
        with torch.no_grad():
            for chain, members in self.groups:
                a = exact_a(
                    chain, capture, [site.channel for site in members], self.memory_budget,
                    training=self.model.training,
                ).double()
                average = self.averages.get(chain.group.name)
                self.averages[chain.group.name] = a * keep if average is None else average * self.decay + a * keep
        self.updates += 1
        self.samples += capture.batch
        return True

    def statistics(self) -> dict[str, SiteStatistics]:
        """The current averages as :class:`SiteStatistics`, keyed by site name."""
        self.update()
        if not self.updates:
            raise StatisticsError(
                "no training iteration has been recorded yet: run a forward and a backward pass "
                "of the model with the tracker attached"
            )
        correction = 1.0 - self.decay**self.updates
        results: dict[str, SiteStatistics] = {}
        for chain, members in self.groups:
            a = self.averages[chain.group.name] / correction
            results.update(statistics_from_a(members, a, self.samples, statistics_dtype(chain)))
        check_statistics(results.values())
        return results

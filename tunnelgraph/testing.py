"""Test helpers: the naive oracle for A, one rewrite and one autograd pass over the data per column.

By docs/MATH.md section 4, opening a tunnel with ``lam = e_l`` (the channel keeps
only outbound entry ``l``, the clone gets the rest) makes the channel's
inbound gradient ``A e_l``, column ``l`` of A. :func:`naive_a_matrix`
computes A that way, column by column, with nothing but
:func:`tunnelgraph.rewrite` and autograd: slow (L full passes over the data
per site) and independent of the statistics engine, which is what makes it a
check of the engine. Tests and benchmarks use it; it is not meant for real
models.

This module stands above the public functions (:mod:`tunnelgraph.api`): the
oracle is built on the rewrite, never the reverse.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from tunnelgraph.analysis.sites import Site
from tunnelgraph.api import rewrite
from tunnelgraph.statistics.engine import LossFn

__all__ = ["inbound_gradient", "naive_a_matrix"]


def naive_a_matrix(
    model: nn.Module,
    site: Site,
    data: Iterable[tuple[Any, Any]],
    loss_fn: LossFn,
    *,
    columns: Sequence[int] | None = None,
) -> torch.Tensor:
    """Columns ``columns`` (default: all L) of the site's A, in float64, for the mean loss over ``data``.

    The model runs in eval mode (as in :func:`tunnelgraph.a_statistics`);
    its training flags are restored afterwards.
    """
    batches = list(data)
    chosen = list(range(site.outbound_size)) if columns is None else list(columns)
    result = torch.zeros(site.inbound_size, len(chosen), dtype=torch.float64)
    for index, column in enumerate(chosen):
        lam = torch.zeros(site.outbound_size, dtype=torch.float64)
        lam[column] = 1.0
        opened = rewrite(model, site, lam)
        opened.eval()
        result[:, index] = inbound_gradient(opened, site, batches, loss_fn)
    return result


def inbound_gradient(
    model: nn.Module, site: Site, batches: Sequence[tuple[Any, Any]], loss_fn: LossFn
) -> torch.Tensor:
    """Autograd gradient of the site's channel's inbound weights (A's row order), mean loss over ``batches``."""
    weights = [
        (model.get_parameter(s.param), s) for s in site.group.slices if s.role == "inbound"
    ]
    total = sum(_batch_size(inputs) for inputs, _ in batches)
    sums = [torch.zeros_like(param, dtype=torch.float64) for param, _ in weights]
    for inputs, targets in batches:
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        loss = loss_fn(model(*inputs), targets) * (_batch_size(inputs) / total)
        grads = torch.autograd.grad(loss, [param for param, _ in weights], allow_unused=True)
        for acc, grad in zip(sums, grads):
            if grad is not None:
                acc += grad.double()
    return torch.cat(
        [acc.select(s.axis, s.offset + site.channel).reshape(-1) for acc, (_, s) in zip(sums, weights)]
    )


def _batch_size(inputs: Any) -> int:
    first = inputs[0] if isinstance(inputs, tuple) else inputs
    return int(first.shape[0])

"""Helpers for the statistics tests: small data sets and autograd gradients to check A against."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from tunnelgraph import Site
from zoo import ZooEntry, example_input


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean()


def regression_data(
    model: nn.Module, entry: ZooEntry, dtype: torch.dtype, batches: int = 2, batch: int = 5
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random inputs and random targets shaped like the model's output."""
    data = []
    for _ in range(batches):
        x = example_input(entry, dtype, batch=batch)
        with torch.no_grad():
            y = torch.randn_like(model(x))
        data.append((x, y))
    return data


def mean_gradients(model: nn.Module, data: list, loss_fn: Callable) -> dict[str, torch.Tensor]:
    """Gradient of the mean loss over every sample of ``data`` (batches weighted by size)."""
    params = dict(model.named_parameters())
    total = sum(x.shape[0] for x, _ in data)
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    for x, y in data:
        loss = loss_fn(model(x), y) * (x.shape[0] / total)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads):
            if grad is not None:
                sums[name] += grad
    return sums


def inbound_gradient(grads: dict[str, torch.Tensor], site: Site, channel: int) -> torch.Tensor:
    """The gradient of ``channel``'s inbound weights, in the row order of A."""
    parts = [
        grads[s.param].select(s.axis, s.offset + channel).reshape(-1)
        for s in site.group.slices
        if s.role == "inbound"
    ]
    return torch.cat(parts)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(b.norm()), float(a.norm()), 1e-300)
    return float((a - b).norm()) / scale

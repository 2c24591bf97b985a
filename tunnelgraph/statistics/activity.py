"""Empirical reducibility measures: how nearly each hidden unit is inconsequential, constant or redundant.

Over a data set, for every unit (channel of a group) as its consumers read
it: the norm of its outbound weights, the mean and standard deviation of its
activation (over samples and positions), and the unit of the same group
whose activation fits it best by an affine map ``x_unit ~ slope * x_partner
+ intercept`` (the correlation's magnitude says how well). For coupled
groups a unit is read at several places (every block of a residual stream);
a relation counts only as well as it holds at the worst of them.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from tunnelgraph.analysis.groups import ChannelGroup, ParamSlice
from tunnelgraph.analysis.reducibility import UnitMeasures, channel_rows
from tunnelgraph.errors import StatisticsError
from tunnelgraph.runtime import batch_parts, model_device, preserved, progress_bar, to_device, unwrap_model


class _Moments:
    """Mean and covariance of a group's channels at one consumer input, merged batch by batch (float64).

    Each batch contributes its own mean and its centred sum of products,
    merged with the running ones by Chan et al.'s pairwise update. The naive
    ``E[x x^T] - E[x] E[x]^T`` cancels catastrophically for a constant
    channel, leaving a variance of either sign at rounding level that
    depends on the order of the sums; the centred form gives a constant
    channel a variance at rounding level relative to its squared mean
    however the data are batched or summed.
    """

    def __init__(self, size: int) -> None:
        self.count = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.centred = torch.zeros(size, size, dtype=torch.float64)  # sum of (x - mean)(x - mean)^T

    def add(self, values: torch.Tensor) -> None:  # (rows, channels)
        rows = values.shape[0]
        if rows == 0:
            return
        values = values.double()
        batch_mean = values.mean(0)
        deviations = values - batch_mean
        batch_centred = (deviations.T @ deviations).cpu()
        batch_mean = batch_mean.cpu()
        total = self.count + rows
        delta = batch_mean - self.mean
        self.centred += batch_centred + torch.outer(delta, delta) * (self.count * rows / total)
        self.mean += delta * (rows / total)
        self.count = total

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.clone(), self.centred / max(self.count, 1)


def unit_measures(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    data: Iterable[Any],
    *,
    batches: int | None = None,
    progress: bool | None = None,
) -> dict[str, UnitMeasures]:
    """Measure every unit of the legal ``groups`` of ``model`` over ``data`` (eval mode, no gradients).

    ``data`` yields batches as :func:`tunnelgraph.runtime.batch_parts` reads
    them (bare inputs, ``(inputs, targets)`` or a dict); targets are not used. Training flags are restored afterwards.
    Units are read at the input of the consumers called as modules, so
    groups with layers called as functions (``group.unmeasured``) are left
    out.
    """
    model = unwrap_model(model)
    device = model_device(model)
    legal = [group for group in groups if group.legal and not group.unmeasured]
    moments: dict[tuple[str, str], _Moments] = {}
    slices: dict[tuple[str, str], ParamSlice] = {}
    for group in legal:
        for param_slice in group.slices:
            if param_slice.role == "outbound":
                moments[(group.name, param_slice.module)] = _Moments(group.size)
                slices[(group.name, param_slice.module)] = param_slice
    recorded: dict[str, torch.Tensor] = {}
    handles = []
    for module_name in {module for _, module in moments}:
        def hook(module: nn.Module, args: tuple[Any, ...], name: str = module_name) -> None:
            recorded[name] = args[0].detach()

        handles.append(model.get_submodule(module_name).register_forward_pre_hook(hook))
    samples = 0
    try:
        with preserved(model, train=False), torch.no_grad():
            for index, batch in enumerate(progress_bar(data, total=batches, desc="unit measures", enabled=progress)):
                if batches is not None and index >= batches:
                    break
                inputs = to_device(batch_parts(batch, index=index)[0], device)
                recorded.clear()
                model(*inputs)
                samples += int(inputs[0].shape[0])
                for key, accumulator in moments.items():
                    if not bool(torch.isfinite(recorded[key[1]]).all()):
                        raise StatisticsError(
                            f"batch {index}: the input of layer '{key[1]}' is not finite (NaN or infinite "
                            "values); check the batch for NaN or infinite inputs"
                        )
                    module = model.get_submodule(key[1])
                    accumulator.add(_channels_last(recorded[key[1]], slices[key], module, _size(legal, key[0])))
    finally:
        for handle in handles:
            handle.remove()
    if samples == 0:
        raise StatisticsError("data yielded no samples")
    weights = {name: p.detach().cpu().double().numpy() for name, p in model.named_parameters()}
    results = {}
    for group in legal:
        group_moments = [m for (g, _), m in moments.items() if g == group.name]
        results.update(_group_measures(group, weights, group_moments, samples))
    return results


def _size(groups: Sequence[ChannelGroup], name: str) -> int:
    return next(group.size for group in groups if group.name == name)


def _channels_last(value: torch.Tensor, param_slice: ParamSlice, module: nn.Module, size: int) -> torch.Tensor:
    """(rows, channels): the group's channels of a consumer's input, every sample and position a row."""
    axis = value.dim() - 1 if isinstance(module, nn.Linear) else 1
    part = value.narrow(axis, param_slice.offset, size * param_slice.block)
    if param_slice.block > 1:  # a flatten: each channel is a block of features
        shape = part.shape[:axis] + (size, param_slice.block) + part.shape[axis + 1:]
        part = part.reshape(shape).movedim(axis + 1, -1)
    return part.movedim(axis, -1).reshape(-1, size)


def _group_measures(
    group: ChannelGroup, weights: dict[str, np.ndarray], places: list[_Moments], samples: int
) -> dict[str, UnitMeasures]:
    outbound = channel_rows(weights, [s for s in group.slices if s.role == "outbound"], group.size)
    norms = np.linalg.norm(outbound, axis=1)
    means, stds, correlations = [], [], []
    for place in places:
        mean, covariance = place.mean_and_covariance()
        std = covariance.diagonal().clamp_min(0).sqrt()
        scale = torch.outer(std, std)
        correlation = torch.where(scale > 0, covariance / scale.clamp_min(1e-300), torch.zeros_like(covariance))
        means.append(mean)
        stds.append(std)
        correlations.append(correlation.abs())
    worst = torch.stack(correlations).min(0).values
    worst.fill_diagonal_(-1.0)
    first_mean, first_covariance = places[0].mean_and_covariance()
    results = {}
    for c in range(group.size):
        partner = int(worst[c].argmax()) if group.size > 1 else None
        if partner is not None:
            variance = float(first_covariance[partner, partner])
            slope = float(first_covariance[c, partner]) / variance if variance > 0 else 0.0
            intercept = float(first_mean[c]) - slope * float(first_mean[partner])
            correlation = max(0.0, float(worst[c, partner]))
        else:
            slope, intercept, correlation = 0.0, 0.0, 0.0
        results[f"{group.name}[{c}]"] = UnitMeasures(
            unit=f"{group.name}[{c}]",
            outbound_norm=float(norms[c]),
            mean=float(means[0][c]),
            std=float(max(float(s[c]) for s in stds)),
            partner=partner,
            correlation=correlation,
            slope=slope,
            intercept=intercept,
            samples=samples,
        )
    return results

"""Empirical unit measures: moments that do not depend on how the data are batched or summed."""

from __future__ import annotations

import pytest
import torch

from tunnelgraph.statistics.activity import _Moments


def _moments(values: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    moments = _Moments(values.shape[1])
    for start in range(0, values.shape[0], split):
        moments.add(values[start:start + split])
    return moments.mean_and_covariance()


@pytest.mark.parametrize("split", [1, 7, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_constant_channel_has_a_variance_at_rounding_level_of_its_mean(split: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    values = torch.randn(1000, 4, dtype=dtype)
    values[:, 1] = torch.relu(torch.tensor(0.7, dtype=dtype))  # a constant unit
    values[:, 3] = 1e4 + 0.0 * values[:, 3]                    # a large constant
    mean, covariance = _moments(values, split)
    for channel in (1, 3):
        variance = float(covariance[channel, channel])
        assert variance >= 0.0
        # the naive E[x^2] - E[x]^2 leaves a variance of about 1e-15 * mean^2 in either sign, a std
        # near 3e-8 * |mean|; the centred sums leave rounding of the batch means alone
        assert variance ** 0.5 <= 1e-12 * abs(float(mean[channel])), (channel, variance)


def test_moments_do_not_depend_on_the_batch_split() -> None:
    torch.manual_seed(1)
    values = 3.0 + torch.randn(500, 5, dtype=torch.float64) @ torch.randn(5, 5, dtype=torch.float64)
    reference_mean = values.mean(0)
    reference = (values - reference_mean).T @ (values - reference_mean) / values.shape[0]
    for split in (1, 3, 100, 500):
        mean, covariance = _moments(values, split)
        assert torch.allclose(mean, reference_mean, rtol=1e-12, atol=0)
        assert torch.allclose(covariance, reference, rtol=1e-10, atol=1e-12 * float(reference.abs().max()))

"""verify: the tolerance policy, failure detection, and leaving models unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import tunnelgraph as tg


def test_identical_models_pass_with_zero_difference() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    report = tg.verify(model, copy.deepcopy(model), torch.randn(5, 3))
    assert report.passed and report.max_abs == 0.0 and report.outputs == 1
    assert (report.rtol, report.dtype) == (1e-5, "float32")
    assert "PASS" in str(report)


def test_a_perturbed_model_fails_and_float64_is_stricter() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-7
    x = torch.randn(5, 3, dtype=torch.float64)
    report = tg.verify(model, other, x)
    assert report.rtol == 1e-10 and not report.passed and report.max_abs > 0
    assert tg.verify(model, other, x, rtol=1e-4).passed
    assert "FAIL" in str(report)


def test_train_mode_batch_norm_buffers_are_restored() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    tg.verify(model, model, torch.randn(8, 3))
    assert all(torch.equal(before[k], v) for k, v in model.named_buffers())


def test_tuple_outputs_are_all_compared() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc(x), {"b": self.fc(x) * 2}

    a, b = Two(), Two()
    report = tg.verify(a, b, torch.randn(2, 3))
    assert report.outputs == 2 and not report.passed


def test_models_without_tensor_outputs_are_refused() -> None:
    class Nothing(nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            return None

    with pytest.raises(ValueError, match="no tensors"):
        tg.verify(Nothing(), Nothing(), torch.randn(2, 3))

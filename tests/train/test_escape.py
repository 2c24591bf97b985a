"""The escape baselines: perturbed GD's gate and ball, isotropic noise, NEON's negative curvature."""

from __future__ import annotations

import math

import pytest
import torch

from tunnelgraph.train.escape import NEON, IsotropicNoise, NegativeCurvature, PerturbedGD, neon_direction


def _param(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_perturbed_gd_perturbs_only_below_the_threshold_and_after_the_wait() -> None:
    param = _param(0.0, 0.0, 0.0)
    perturb = PerturbedGD([param], radius=0.5, grad_threshold=0.1, wait=2, generator=torch.Generator().manual_seed(0))
    norms = [1.0, 0.01, 0.01, 0.01, 0.01, 0.01, 1.0, 0.01, 0.05, 0.1]
    fired = []
    for step, norm in enumerate(norms):
        param.grad = torch.tensor([norm, 0.0, 0.0], dtype=torch.float64)
        before = param.detach().clone()
        if perturb():
            fired.append(step)
            assert 0 < float(torch.linalg.norm(param.detach() - before)) <= 0.5
        else:
            assert torch.equal(param.detach(), before)
    # step 1: the first small gradient; 2, 3: within the wait; 4: waited; 6: large; 7: waited; 10 is not run
    assert fired == [1, 4, 7] == perturb.perturbations
    assert perturb.step == len(norms)


def test_perturbed_gd_draws_uniformly_from_the_ball_and_reproducibly() -> None:
    def run(seed: int) -> list[float]:
        param = _param(0.0, 0.0)
        param.grad = torch.zeros(2, dtype=torch.float64)
        perturb = PerturbedGD([param], radius=2.0, grad_threshold=0.0, wait=0,
                              generator=torch.Generator().manual_seed(seed))
        lengths = []
        for _ in range(2000):
            before = param.detach().clone()
            assert perturb()
            lengths.append(float(torch.linalg.norm(param.detach() - before)))
        return lengths

    lengths = run(1)
    assert max(lengths) <= 2.0
    # uniform in a disc: P(length < r / 2) = 1/4 (the standard error over 2000 draws is 0.01)
    assert abs(sum(length < 1.0 for length in lengths) / len(lengths) - 0.25) < 0.04
    assert run(1) == lengths and run(2) != lengths


def test_perturbed_gd_reads_gradients_and_refuses_bad_arguments() -> None:
    param = _param(0.0)
    with pytest.raises(RuntimeError, match="after loss.backward"):
        PerturbedGD([param], radius=1.0, grad_threshold=0.1, wait=0)()
    with pytest.raises(ValueError, match="radius must be a positive finite number, got -1"):
        PerturbedGD([param], radius=-1.0, grad_threshold=0.1, wait=0)
    with pytest.raises(ValueError, match="wait must be an integer >= 0, got -3"):
        PerturbedGD([param], radius=1.0, grad_threshold=0.1, wait=-3)
    with pytest.raises(ValueError, match="params is empty"):
        PerturbedGD([], radius=1.0, grad_threshold=0.1, wait=0)


def test_isotropic_noise_has_the_requested_standard_deviation() -> None:
    param = torch.nn.Parameter(torch.zeros(100_000, dtype=torch.float64))
    noise = IsotropicNoise([param], std=0.3, generator=torch.Generator().manual_seed(0))
    noise()
    values = param.detach()
    # the standard error of the estimate is 0.3 / sqrt(2e5) = 7e-4
    assert float(values.std()) == pytest.approx(0.3, rel=0.02)
    assert abs(float(values.mean())) < 0.01
    assert noise.step == 1
    with pytest.raises(ValueError, match="std must be a non-negative finite number, got nan"):
        IsotropicNoise([param], std=math.nan)


H = torch.diag(torch.tensor([1.0, 2.0, -0.5, 3.0], dtype=torch.float64))
NEGATIVE = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)


def _quadratic(param: torch.Tensor, hessian: torch.Tensor = H) -> torch.Tensor:
    return 0.5 * param @ (hessian @ param)


def test_neon_finds_the_negative_eigenvector_and_its_curvature() -> None:
    param = _param(0.2, -0.1, 0.3, 0.05)  # not a critical point: the gradient at x is subtracted
    start = param.detach().clone()
    found = neon_direction([param], lambda: _quadratic(param), radius=1e-3, eta=0.3, iterations=200,
                           generator=torch.Generator().manual_seed(0))
    assert isinstance(found, NegativeCurvature)
    direction = found.direction[0]
    assert float(torch.linalg.norm(direction)) == pytest.approx(1.0, abs=1e-12)
    assert abs(float(direction @ NEGATIVE)) > 0.99
    assert found.curvature == pytest.approx(-0.5, rel=0.05)
    assert found.iterations < 200  # it stopped once the curvature settled
    assert torch.equal(param.detach(), start)


def test_neon_finds_it_in_a_rotated_basis_too() -> None:
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    hessian = q @ H @ q.T
    param = _param(0.0, 0.0, 0.0, 0.0)
    found = neon_direction([param], lambda: _quadratic(param, hessian), radius=1e-2, eta=0.3, iterations=200,
                           generator=torch.Generator().manual_seed(1))
    assert found is not None
    assert abs(float(found.direction[0] @ (q @ NEGATIVE))) > 0.99
    assert found.curvature == pytest.approx(-0.5, rel=0.05)


def test_neon_returns_none_on_a_positive_definite_quadratic_and_restores_the_params() -> None:
    param = _param(0.2, -0.1, 0.3, 0.05)
    start = param.detach().clone()
    positive = torch.diag(torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64))
    found = neon_direction([param], lambda: _quadratic(param, positive), radius=1e-3, eta=0.3, iterations=50,
                           generator=torch.Generator().manual_seed(0))
    assert found is None
    assert torch.equal(param.detach(), start)


def test_neon_restores_the_params_when_the_closure_fails() -> None:
    param = _param(0.2, -0.1)
    start = param.detach().clone()
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return param @ param

    with pytest.raises(RuntimeError, match="boom"):
        neon_direction([param], closure, radius=1e-3, eta=0.1, iterations=10)
    assert torch.equal(param.detach(), start)
    with pytest.raises(ValueError, match="without a graph"):
        neon_direction([param], lambda: (param @ param).detach(), radius=1e-3, eta=0.1, iterations=10)
    with pytest.raises(ValueError, match="eta must be a positive finite number, got 0"):
        neon_direction([param], lambda: param @ param, radius=1e-3, eta=0.0, iterations=10)


def test_neon_moves_along_the_negative_curvature_and_lowers_the_loss() -> None:
    param = _param(0.0, 0.0, 0.0, 0.0)

    def closure() -> torch.Tensor:
        return _quadratic(param)

    neon = NEON([param], closure, radius=1e-3, eta=0.3, iterations=200, step=0.1, grad_threshold=1e-3, wait=5,
                generator=torch.Generator().manual_seed(0))
    closure().backward()
    loss_before = float(closure().detach())
    assert neon()
    moved = param.detach()
    assert float(torch.linalg.norm(moved)) == pytest.approx(0.1, rel=1e-9)
    assert abs(float(moved @ NEGATIVE)) / 0.1 > 0.99
    assert float(closure().detach()) < loss_before - 0.5 * 0.5 * 0.1**2 * 0.9
    assert neon.moves == [0] and neon.curvatures[0] == pytest.approx(-0.5, rel=0.05)
    assert not neon()  # the gradient is still small (stale .grad), but within the wait
    param.grad = torch.ones(4, dtype=torch.float64)
    for _ in range(10):
        assert not neon()  # a large gradient
    assert neon.step_count == 12 and neon.attempts == [0]
    with pytest.raises(ValueError, match="step must be a positive finite number, got 0"):
        NEON([param], closure, radius=1e-3, eta=0.3, iterations=10, step=0.0, grad_threshold=1e-3, wait=0)

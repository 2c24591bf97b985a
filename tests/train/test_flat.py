"""Krylov solvers reach the direct solve, Hessian-vector products equal the Hessian, Newton walks to a saddle."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from tunnelgraph.train.flat import (
    FlatArea,
    MinresInfo,
    conjugate_gradient,
    hessian_vector_product,
    minres,
    newton_flat_area,
)


Solver = Callable[..., tuple[torch.Tensor, MinresInfo]]


def _symmetric(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T


def _rhs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("solve", [minres, conjugate_gradient], ids=["minres", "cg"])
def test_both_solvers_reach_the_direct_solve_on_a_positive_definite_system(solve: Solver) -> None:
    a = _symmetric(torch.linspace(1.0, 10.0, 20, dtype=torch.float64), seed=1)
    b = _rhs(20, seed=2)
    x, info = solve(lambda v: a @ v, b, iterations=100, tol=1e-13)
    exact = torch.linalg.solve(a, b)
    assert float(torch.linalg.norm(x - exact) / torch.linalg.norm(exact)) < 1e-8
    assert info.converged and info.iterations <= 100
    assert info.residual == pytest.approx(float(torch.linalg.norm(b - a @ x)), abs=1e-10 * float(torch.linalg.norm(b)))


def test_minres_solves_a_symmetric_indefinite_system() -> None:
    eigenvalues = torch.cat([torch.linspace(1.0, 10.0, 10), -torch.linspace(0.5, 8.0, 10)]).double()
    a = _symmetric(eigenvalues, seed=3)
    b = _rhs(20, seed=4)
    x, info = minres(lambda v: a @ v, b, iterations=200, tol=1e-13)
    exact = torch.linalg.solve(a, b)
    assert info.converged
    assert float(torch.linalg.norm(x - exact) / torch.linalg.norm(exact)) < 1e-8
    true_residual = float(torch.linalg.norm(b - a @ x))
    assert info.residual == pytest.approx(true_residual, abs=1e-10 * float(torch.linalg.norm(b)))


def test_minres_reports_its_residual_when_stopped_early() -> None:
    a = _symmetric(torch.cat([torch.linspace(1.0, 100.0, 15), -torch.linspace(1.0, 50.0, 15)]).double(), seed=5)
    b = _rhs(30, seed=6)
    x, info = minres(lambda v: a @ v, b, iterations=5)
    assert info.iterations == 5 and not info.converged
    true_residual = float(torch.linalg.norm(b - a @ x))
    assert 0 < true_residual < float(torch.linalg.norm(b))  # the minimum-residual iterate improves on x = 0
    assert info.residual == pytest.approx(true_residual, rel=1e-6)


def test_solvers_handle_a_zero_right_hand_side_and_refuse_bad_arguments() -> None:
    x, info = minres(lambda v: v, torch.zeros(3, dtype=torch.float64), iterations=5)
    assert torch.equal(x, torch.zeros(3, dtype=torch.float64)) and info.converged and info.iterations == 0
    with pytest.raises(ValueError, match="iterations must be an integer >= 1, got 0"):
        minres(lambda v: v, torch.ones(3), iterations=0)
    with pytest.raises(ValueError, match="flat vector"):
        conjugate_gradient(lambda v: v, torch.ones(3, 1), iterations=3)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 2, bias=False)
        self.out = nn.Linear(2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sigmoid(self.hidden(x)))


def test_hessian_vector_product_equals_the_exact_hessian_times_the_vector() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    t = torch.randn(7, 1, generator=generator, dtype=torch.float64)
    model = _Tiny().double()
    params = list(model.parameters())

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        hidden, out = flat[:6].view(2, 3), flat[6:].view(1, 2)
        return torch.mean((torch.sigmoid(x @ hidden.T) @ out.T - t) ** 2)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    hessian = torch.autograd.functional.hessian(loss_of, flat)
    loss = torch.mean((model(x) - t) ** 2)
    assert float(loss.detach()) == pytest.approx(float(loss_of(flat)), rel=1e-12)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = torch.randn(8, generator=generator, dtype=torch.float64)
    product = hessian_vector_product(grads, params, [v[:6].view(2, 3), v[6:].view(1, 2)])
    assert torch.allclose(torch.cat([h.reshape(-1) for h in product]), hessian @ v, rtol=1e-9, atol=1e-12)
    again = hessian_vector_product(grads, params, [v[:6].view(2, 3), v[6:].view(1, 2)])  # the graph is retained
    assert torch.allclose(again[0], product[0], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="create_graph=True"):
        hessian_vector_product(torch.autograd.grad(torch.mean((model(x) - t) ** 2), params), params,
                               [v[:6].view(2, 3), v[6:].view(1, 2)])


class _Saddle(nn.Module):
    """f(w) = w0^2 - w1^2 + 0.1 w0^3 (a saddle at 0), the same for every sample."""

    def __init__(self, start: tuple[float, float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(start, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self.w[0] ** 2 - self.w[1] ** 2 + 0.1 * self.w[0] ** 3
        return value * torch.ones(len(x), dtype=torch.float64)


def _mean(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output.mean()


INPUTS = torch.zeros(6, 1, dtype=torch.float64)
TARGETS = torch.zeros(6, dtype=torch.float64)


def test_full_newton_steps_converge_to_the_saddle() -> None:
    model = _Saddle((0.3, -0.2))
    result = newton_flat_area(model, INPUTS, TARGETS, _mean, steps=20, step_size=1.0, iterations=4, progress=False)
    assert isinstance(result, FlatArea)
    assert len(result.losses) == len(result.grad_norms) == 21 and len(result.residuals) == 20
    assert result.grad_norms[-1] < 1e-8 * result.grad_norms[0]
    assert float(model.w.detach().abs().max()) < 1e-8  # it walked to the saddle, uphill in w1, not down
    assert max(result.residuals) < 1e-8 and result.seconds >= 0


def test_damped_newton_steps_shrink_the_gradient_geometrically_and_chunks_change_nothing() -> None:
    whole = _Saddle((0.3, -0.2))
    chunked = _Saddle((0.3, -0.2))
    first = newton_flat_area(whole, INPUTS, TARGETS, _mean, steps=20, step_size=0.1, iterations=4, progress=False)
    second = newton_flat_area(chunked, INPUTS, TARGETS, _mean, steps=20, step_size=0.1, iterations=4,
                              batch_size=4, progress=False)
    # 0.9 ** 20 = 0.12 on the quadratic part; the cubic term helps a little more
    assert first.grad_norms[-1] < 0.2 * first.grad_norms[0]
    assert all(later < earlier for earlier, later in zip(first.grad_norms, first.grad_norms[1:]))
    assert second.losses == pytest.approx(first.losses, rel=1e-9, abs=1e-12)
    assert second.grad_norms == pytest.approx(first.grad_norms, rel=1e-9, abs=1e-12)


def test_cg_takes_newton_steps_on_a_positive_definite_network_loss() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=generator, dtype=torch.float64)
    t = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    result = newton_flat_area(model, x, t, nn.MSELoss(), steps=3, step_size=1.0, iterations=10, solver="cg",
                              batch_size=7, progress=False)
    assert result.losses[-1] < 1e-20 + 1e-12 * result.losses[0]  # least squares: one Newton step is exact


def test_a_nan_loss_names_the_step_and_bad_arguments_are_refused() -> None:
    model = _Saddle((float("nan"), 0.0))
    with pytest.raises(ValueError, match="step 0: the loss is nan"):
        newton_flat_area(model, INPUTS, TARGETS, _mean, steps=2, progress=False)
    with pytest.raises(ValueError, match="solver must be 'minres' or 'cg'"):
        newton_flat_area(_Saddle((0.1, 0.1)), INPUTS, TARGETS, _mean,
                         solver="lu", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step_size must be a positive finite number, got 0"):
        newton_flat_area(_Saddle((0.1, 0.1)), INPUTS, TARGETS, _mean, step_size=0, progress=False)
    with pytest.raises(ValueError, match="3 inputs and 6 targets"):
        newton_flat_area(_Saddle((0.1, 0.1)), INPUTS[:3], TARGETS, _mean, progress=False)

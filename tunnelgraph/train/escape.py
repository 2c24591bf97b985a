"""Escape baselines: the ways other papers leave saddle points, for experiments that compare them to tunnels.

Each helper follows its paper and acts on the parameters **in place**
(under ``torch.no_grad()``): that is its job. None of them touches the
optimizer or its state.

- :class:`PerturbedGD` (Jin, Ge, Netrapalli, Kakade and Jordan 2017, "How
  to escape saddle points efficiently"): when the gradient is small and no
  perturbation happened recently, add a point drawn uniformly from a ball.
- :class:`IsotropicNoise` (noisy SGD, e.g. Ge, Huang, Jin and Yuan 2015,
  "Escaping from saddle points"): add Gaussian noise to every entry after
  every step.
- :func:`neon_direction` and :class:`NEON` (Xu and Yang 2017, "First-order
  stochastic algorithms for escaping from saddle points in almost linear
  time"): find a direction of negative curvature from gradient differences
  only (a power iteration on ``I - eta * H``), then move along it.

In a training loop the gated helpers run after ``loss.backward()`` and
before ``optimizer.step()``, so the step after a move applies the gradient
of the point before it (the papers take the next gradient at the moved
point; the difference is one step of size ``lr * grad_threshold`` at most).
Jin et al.'s stopping rule (return the point before the perturbation when
the loss did not fall) is the loop's business and not implemented here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["NEON", "IsotropicNoise", "NegativeCurvature", "PerturbedGD", "neon_direction"]


def _parameters(params: Iterable[torch.Tensor], who: str) -> list[torch.Tensor]:
    """``params`` as a non-empty list of floating-point tensors, or a ValueError that says what was wrong."""
    if isinstance(params, torch.Tensor):
        raise ValueError(
            f"{who}: params must be an iterable of parameters, got a single tensor; "
            "pass [tensor] or model.parameters()"
        )
    found = list(params)
    if not found:
        raise ValueError(f"{who}: params is empty; pass the parameters to act on, e.g. model.parameters()")
    for index, param in enumerate(found):
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"{who}: params[{index}] is a {type(param).__name__}, not a tensor")
        if not param.is_floating_point():
            raise ValueError(f"{who}: params[{index}] has dtype {param.dtype}; only floating-point parameters can move")
    return found


def _positive(who: str, name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{who}: {name} must be a positive finite number, got {value!r}")
    return float(value)


def _non_negative(who: str, name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{who}: {name} must be a non-negative finite number, got {value!r}")
    return float(value)


def _count(who: str, name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{who}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _dot(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> float:
    """The inner product of two lists of tensors, summed in float64."""
    return sum(float(torch.sum(a.detach().double() * b.detach().double())) for a, b in zip(first, second))


def _gradient_norm(params: Sequence[torch.Tensor], who: str) -> float:
    """The Euclidean norm of all ``.grad`` together (a missing one counts as zero)."""
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        raise RuntimeError(f"{who}: no parameter has a .grad; call it after loss.backward() and before zero_grad()")
    return math.sqrt(_dot(grads, grads))


def _gaussian(param: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal entries shaped like ``param``, drawn on the generator's device and moved to the param's."""
    device = param.device if generator is None else generator.device
    return torch.randn(param.shape, generator=generator, dtype=dtype, device=device).to(param.device)


class _Gate:
    """Jin et al.'s gate: act when the gradient norm is at most the threshold and the last action is over
    ``wait`` steps old (``t - t_noise > t_thres``)."""

    def __init__(self, who: str, grad_threshold: float, wait: int) -> None:
        self.grad_threshold = _non_negative(who, "grad_threshold", grad_threshold)
        self.wait = _count(who, "wait", wait, 0)
        self.step = 0
        self.last: int | None = None

    def open(self, grad_norm: float) -> bool:
        waited = self.last is None or self.step - self.last > self.wait
        return grad_norm <= self.grad_threshold and waited


class PerturbedGD:
    """Perturbed gradient descent's perturbation (Jin et al. 2017, Algorithm 2).

    Call it once per training step, after ``loss.backward()`` and before
    ``optimizer.step()``. It reads the parameters' ``.grad``; when their
    total norm is at most ``grad_threshold`` (g_thres) and no perturbation
    happened in the last ``wait`` steps (t_thres), it adds to the
    parameters, in place, a vector xi drawn uniformly from the ball of
    radius ``radius`` in dimension d = the number of parameter entries
    (direction: a normalised Gaussian; length: ``radius * U ** (1 / d)``
    with U uniform on [0, 1]). The first eligible step perturbs.

    Args:
        params: the parameters to perturb (e.g. ``model.parameters()``); a
            missing ``.grad`` counts as zero, but at least one is needed.
        radius: the ball's radius r; positive.
        grad_threshold: the gradient norm at or below which it perturbs;
            non-negative.
        wait: steps after a perturbation during which it does not perturb
            again; non-negative (0: every small-gradient step).
        generator: the random source (reproducible runs); on its device.

    Attributes:
        step: the number of calls so far.
        perturbations: the steps (0-based call indices) at which it perturbed.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        radius: float,
        grad_threshold: float,
        wait: int,
        generator: torch.Generator | None = None,
    ) -> None:
        who = "PerturbedGD"
        self.params = _parameters(params, who)
        self.radius = _positive(who, "radius", radius)
        self._gate = _Gate(who, grad_threshold, wait)
        self.grad_threshold = self._gate.grad_threshold
        self.wait = self._gate.wait
        self.generator = generator
        self.perturbations: list[int] = []

    @property
    def step(self) -> int:
        return self._gate.step

    def __call__(self) -> bool:
        """Perturb the parameters if the gate is open; True when it did."""
        grad_norm = _gradient_norm(self.params, "PerturbedGD")
        perturb = self._gate.open(grad_norm)
        if perturb:
            self._perturb()
            self._gate.last = self._gate.step
            self.perturbations.append(self._gate.step)
            logger.info("step %d: gradient norm %.3g <= %.3g, perturbed within radius %.3g",
                        self._gate.step, grad_norm, self.grad_threshold, self.radius)
        self._gate.step += 1
        return perturb

    def _perturb(self) -> None:
        directions = [_gaussian(param, self.generator, torch.float64) for param in self.params]
        norm = math.sqrt(_dot(directions, directions))
        dimension = sum(param.numel() for param in self.params)
        device = None if self.generator is None else self.generator.device
        uniform = float(torch.rand((), generator=self.generator, dtype=torch.float64, device=device))
        scale = self.radius * uniform ** (1.0 / dimension) / norm
        with torch.no_grad():
            for param, direction in zip(self.params, directions):
                param.add_((direction * scale).to(param.dtype))


class IsotropicNoise:
    """Noisy SGD's noise: every call adds independent N(0, std^2) noise to every parameter entry, in place.

    Call it after ``optimizer.step()``.

    Args:
        params: the parameters to perturb.
        std: the noise's standard deviation; non-negative (0 is a no-op control).
        generator: the random source (reproducible runs); on its device.

    Attributes:
        step: the number of calls so far.
    """

    def __init__(
        self, params: Iterable[torch.Tensor], *, std: float, generator: torch.Generator | None = None
    ) -> None:
        self.params = _parameters(params, "IsotropicNoise")
        self.std = _non_negative("IsotropicNoise", "std", std)
        self.generator = generator
        self.step = 0

    def __call__(self) -> None:
        """Add the noise."""
        with torch.no_grad():
            for param in self.params:
                param.add_(_gaussian(param, self.generator, param.dtype), alpha=self.std)
        self.step += 1


@dataclass(frozen=True, eq=False)
class NegativeCurvature:
    """A direction of negative curvature found by :func:`neon_direction`.

    Attributes:
        direction: one tensor per parameter, unit norm all together; its
            sign is arbitrary.
        curvature: the curvature along it, u^T H u / ||u||^2, estimated by
            finite differences; negative.
        iterations: the gradient evaluations it took (besides the one at x).
    """

    direction: list[torch.Tensor]
    curvature: float
    iterations: int


def _evaluate(
    closure: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], who: str
) -> tuple[float, list[torch.Tensor]]:
    """The loss at the parameters' current values and its gradient (zeros where a parameter is unused)."""
    with torch.enable_grad():
        loss = closure()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"{who}: closure() must return the loss as a scalar tensor, got {loss!r}")
        if not loss.requires_grad:
            raise ValueError(
                f"{who}: closure() returned a loss without a graph; return it as computed "
                "(no .item(), no .detach(), not under torch.no_grad()) from parameters that require grad"
            )
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ValueError(f"{who}: closure() returned a loss of {value}; curvature needs finite losses")
    return value, [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def neon_direction(
    params: Sequence[torch.Tensor],
    closure: Callable[[], torch.Tensor],
    *,
    radius: float,
    eta: float,
    iterations: int,
    generator: torch.Generator | None = None,
    tol: float = 1e-3,
) -> NegativeCurvature | None:
    """Extract a direction of negative curvature at the current parameters x from gradients only (NEON).

    Xu and Yang's NEON runs gradient descent on the difference
    ``f(x + u) - f(x) - grad f(x) . u`` from a random start: with g0 the
    gradient at x and ``u_0`` random of norm ``radius``,
    ``u_{t+1} = u_t - eta * (grad f(x + u_t) - g0)``, which (for small u)
    is the power iteration on ``I - eta * H``; it grows fastest along the
    most negative curvature. Here u is renormalised to norm ``radius``
    after each update (its direction is unchanged; its length stays in
    the range where the finite differences are accurate). After each
    gradient evaluation the curvature along u is estimated as
    ``c = (f(x + u) - f(x) - g0 . u) * 2 / ||u||^2`` (the Rayleigh quotient
    u^T H u / ||u||^2, exact on quadratics).

    ``eta`` should be below ``1 / L`` (L: the largest curvature), or the
    iteration amplifies the largest positive curvature instead. ``closure``
    must be deterministic (eval mode, a fixed batch): it is evaluated at
    nearby points and differenced.

    Args:
        params: the parameters (tensors that require grad).
        closure: returns the loss at the parameters' current values, with
            its graph (gradients are taken with ``torch.autograd.grad``; it
            should not call ``backward``).
        radius: the length of u; positive, small (the finite-difference step).
        eta: the power iteration's step; positive.
        iterations: the most gradient evaluations after the one at x; >= 1.
        generator: the random source of ``u_0``; on its device.
        tol: the curvature has stabilised when two consecutive estimates
            differ by at most ``tol`` times its magnitude.

    Returns:
        The direction (unit norm) and its curvature as soon as the estimate
        is negative and has stabilised, or the last direction after
        ``iterations`` if its curvature is negative; None if no negative
        curvature was found. The parameters are restored exactly to x.
    """
    who = "neon_direction"
    params = _parameters(params, who)
    for index, param in enumerate(params):
        if not param.requires_grad:
            raise ValueError(f"{who}: params[{index}] does not require grad; the gradients come from autograd")
    radius = _positive(who, "radius", radius)
    eta = _positive(who, "eta", eta)
    iterations = _count(who, "iterations", iterations, 1)
    tol = _non_negative(who, "tol", tol)

    origin = [param.detach().clone() for param in params]
    try:
        loss0, grad0 = _evaluate(closure, params, who)
        u = [_gaussian(param, generator, param.dtype) for param in params]
        u = _rescale(u, radius)
        previous: float | None = None
        curvature = math.nan
        for iteration in range(1, iterations + 1):
            with torch.no_grad():
                for param, start, step in zip(params, origin, u):
                    param.copy_(start + step)
            # the displacement actually applied (rounded to the params' dtype) is what the values measure
            displacement = [param.detach() - start for param, start in zip(params, origin)]
            loss, grad = _evaluate(closure, params, who)
            squared = _dot(displacement, displacement)
            if squared == 0.0:
                raise ValueError(f"{who}: radius={radius} is below the parameters' precision; use a larger radius")
            curvature = (loss - loss0 - _dot(grad0, displacement)) * 2.0 / squared
            if curvature < 0 and previous is not None and abs(curvature - previous) <= tol * abs(curvature):
                return NegativeCurvature(_rescale(displacement, 1.0), curvature, iteration)
            previous = curvature
            if iteration == iterations:
                break
            updated = [step - eta * (g - g0) for step, g, g0 in zip(u, grad, grad0)]
            if _dot(updated, updated) == 0.0:
                logger.info("%s: the power iteration collapsed (u = eta * H u); no negative curvature", who)
                return None
            u = _rescale(updated, radius)
        if curvature < 0:
            return NegativeCurvature(_rescale(displacement, 1.0), curvature, iterations)
        return None
    finally:
        with torch.no_grad():
            for param, start in zip(params, origin):
                param.copy_(start)


def _rescale(vector: list[torch.Tensor], norm: float) -> list[torch.Tensor]:
    scale = norm / math.sqrt(_dot(vector, vector))
    return [entry * scale for entry in vector]


class NEON:
    """NEON as an escape step: when the gradient is small, move along a direction of negative curvature.

    Call it once per training step, after ``loss.backward()`` and before
    ``optimizer.step()``. When the ``.grad`` norm is at most
    ``grad_threshold`` and no extraction was attempted in the last ``wait``
    steps, it runs :func:`neon_direction` and, if a direction u of negative
    curvature was found, moves the parameters in place to ``x + step * u``
    or ``x - step * u``, whichever has the lower ``closure()`` loss.

    The wait counts from the last *attempt*, not only the last move: an
    extraction costs ``iterations`` gradients, and one that found nothing
    at a point will not find anything one step later.

    Args:
        params: the parameters (tensors that require grad).
        closure: returns the loss with its graph, as for :func:`neon_direction`.
        radius, eta, iterations: as for :func:`neon_direction`.
        step: the length of the move; positive.
        grad_threshold: the gradient norm at or below which it acts; non-negative.
        wait: steps after an attempt during which it does not try again; non-negative.
        generator: the random source.

    Attributes:
        step_count: the number of calls so far.
        attempts: the steps (0-based call indices) at which it extracted.
        moves: the steps at which it moved.
        curvatures: the curvature found at each move.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        closure: Callable[[], torch.Tensor],
        *,
        radius: float,
        eta: float,
        iterations: int,
        step: float,
        grad_threshold: float,
        wait: int,
        generator: torch.Generator | None = None,
    ) -> None:
        who = "NEON"
        self.params = _parameters(params, who)
        self.closure = closure
        self.radius = _positive(who, "radius", radius)
        self.eta = _positive(who, "eta", eta)
        self.iterations = _count(who, "iterations", iterations, 1)
        self.step = _positive(who, "step", step)
        self._gate = _Gate(who, grad_threshold, wait)
        self.grad_threshold = self._gate.grad_threshold
        self.wait = self._gate.wait
        self.generator = generator
        self.attempts: list[int] = []
        self.moves: list[int] = []
        self.curvatures: list[float] = []

    @property
    def step_count(self) -> int:
        return self._gate.step

    def __call__(self) -> bool:
        """Extract and move if the gate is open; True when it moved."""
        grad_norm = _gradient_norm(self.params, "NEON")
        moved = False
        if self._gate.open(grad_norm):
            self._gate.last = self._gate.step
            self.attempts.append(self._gate.step)
            found = neon_direction(
                self.params, self.closure, radius=self.radius, eta=self.eta,
                iterations=self.iterations, generator=self.generator,
            )
            if found is None:
                logger.info("step %d: gradient norm %.3g, no negative curvature found", self._gate.step, grad_norm)
            else:
                self._move(found)
                self.moves.append(self._gate.step)
                self.curvatures.append(found.curvature)
                moved = True
        self._gate.step += 1
        return moved

    def _move(self, found: NegativeCurvature) -> None:
        origin = [param.detach().clone() for param in self.params]
        losses = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                for param, start, direction in zip(self.params, origin, found.direction):
                    param.copy_(start + (sign * self.step) * direction)
                losses.append(float(self.closure().detach()))
            sign = 1.0 if losses[0] <= losses[1] else -1.0
            for param, start, direction in zip(self.params, origin, found.direction):
                param.copy_(start + (sign * self.step) * direction)
        logger.info("step %d: curvature %.3g after %d iterations, moved %.3g along it (loss %.6g)",
                    self._gate.step, found.curvature, found.iterations, self.step, min(losses))

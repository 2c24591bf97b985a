"""Finding flat areas: Newton's method on the full-batch loss, which is attracted to saddle points too.

The paper reaches flat areas (the saddles that tunnels escape) with
Newton's method on the full empirical loss: 20 steps of size 0.1 with the
inverse of the full empirical Hessian. Forming and inverting the Hessian
is out of reach beyond toy sizes, so :func:`newton_flat_area` computes the
same Newton direction ``d = H^-1 g`` matrix-free instead: Hessian-vector
products by double backward (:func:`hessian_vector_product`) and a Krylov
solve of ``H d = g``. The default solver is MINRES (:func:`minres`, Paige
and Saunders 1975), which handles the symmetric *indefinite* Hessian
found near saddles; conjugate gradients (:func:`conjugate_gradient`) is an
option for positive-definite cases. With enough iterations (at most the
number of parameters, in exact arithmetic) the solve is the exact Newton
step; with fewer it is the best one in the Krylov space, and the residual
of each solve is reported.

All solvers work on flat vectors and keep their scalar recurrences in
float64 (Python floats), whatever the vectors' dtype.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from tunnelgraph.runtime import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["FlatArea", "MinresInfo", "conjugate_gradient", "hessian_vector_product", "minres", "newton_flat_area"]


@dataclass(frozen=True)
class MinresInfo:
    """What a Krylov solve of ``A x = b`` (:func:`minres` or :func:`conjugate_gradient`) reports.

    Attributes:
        iterations: operator applications made.
        residual: ``||b - A x||`` for the returned x, from the solver's
            recurrences (equal to the true residual in exact arithmetic).
        converged: whether ``residual <= tol * ||b||``.
    """

    iterations: int
    residual: float
    converged: bool


@dataclass(frozen=True)
class FlatArea:
    """What :func:`newton_flat_area` did.

    Attributes:
        losses: the full-batch loss before each step and after the last
            (``steps + 1`` entries).
        grad_norms: the full-batch gradient norm at the same points.
        residuals: each solve's relative residual ``||g - H d|| / ||g||``
            (``steps`` entries; 0 when g is 0).
        seconds: the wall-clock time it took.
    """

    losses: list[float]
    grad_norms: list[float]
    residuals: list[float]
    seconds: float


def hessian_vector_product(
    loss_grad: Sequence[torch.Tensor], params: Sequence[torch.Tensor], vector: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The Hessian of the loss times ``vector``, by differentiating ``loss_grad . vector`` again.

    Args:
        loss_grad: the loss's gradient with respect to ``params``, computed
            with ``torch.autograd.grad(loss, params, create_graph=True)``.
        params: the parameters.
        vector: one tensor per parameter, shaped like it.

    Returns:
        ``H v`` as one tensor per parameter (detached). The graph is
        retained, so it can be called again with the same ``loss_grad``.
    """
    if not len(loss_grad) == len(params) == len(vector):
        raise ValueError(
            f"hessian_vector_product: got {len(loss_grad)} gradients, {len(params)} parameters and "
            f"{len(vector)} vector parts; pass one of each per parameter"
        )
    for index, (param, part) in enumerate(zip(params, vector)):
        if part.shape != param.shape:
            raise ValueError(
                f"hessian_vector_product: vector[{index}] has shape {tuple(part.shape)}, "
                f"its parameter {tuple(param.shape)}; shape the vector like the parameters"
            )
    # a gradient entry without a graph is constant in the parameters: its rows of H are zero
    live = [index for index, grad in enumerate(loss_grad) if grad.requires_grad]
    if not live:
        raise ValueError(
            "hessian_vector_product: no entry of loss_grad has a graph; compute it with "
            "torch.autograd.grad(loss, params, create_graph=True) (a loss linear in every parameter has H = 0)"
        )
    result = [torch.zeros_like(param) for param in params]
    products = torch.autograd.grad(
        [loss_grad[index] for index in live], list(params),
        grad_outputs=[vector[index] for index in live], retain_graph=True, allow_unused=True,
    )
    return [zero if product is None else product.detach() for zero, product in zip(result, products)]


def _dot(first: torch.Tensor, second: torch.Tensor) -> float:
    return float(torch.dot(first.detach().double(), second.detach().double()))


def _check_system(who: str, b: torch.Tensor, iterations: int, tol: float) -> None:
    if b.dim() != 1:
        raise ValueError(f"{who}: b must be a flat vector, got shape {tuple(b.shape)}; flatten it first")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{who}: iterations must be an integer >= 1, got {iterations!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"{who}: tol must be a non-negative finite number, got {tol!r}")


def minres(
    operator: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *, iterations: int, tol: float = 1e-10
) -> tuple[torch.Tensor, MinresInfo]:
    """Solve ``A x = b`` for a symmetric, possibly indefinite A by MINRES (Paige and Saunders 1975).

    From ``x_0 = 0``, iteration k returns the x of the Krylov space
    ``span(b, A b, ..., A^(k-1) b)`` with the smallest residual norm, by
    the Lanczos process and Givens rotations (short recurrences; no stored
    basis). It stops after ``iterations`` operator applications, when the
    residual is at most ``tol * ||b||``, or when the Krylov space stops
    growing (the solution is then exact, or A is singular and x is the
    least-squares point reached).

    Args:
        operator: ``v -> A v`` on flat vectors shaped like ``b``; must be symmetric.
        b: the right-hand side, a 1-D tensor.
        iterations: the most operator applications; >= 1.
        tol: the relative residual to reach.

    Returns:
        x (b's dtype and device) and the solve's :class:`MinresInfo`.
    """
    _check_system("minres", b, iterations, tol)
    x = torch.zeros_like(b)
    beta1 = math.sqrt(_dot(b, b))
    if beta1 == 0.0:
        return x, MinresInfo(0, 0.0, True)
    tiny = torch.finfo(torch.float64).eps
    # Lanczos vectors: v_k = r2 / beta; r1 is the previous unnormalised one
    r1 = b.clone()
    r2 = b.clone()
    y = b.clone()
    old_beta = 0.0
    beta = beta1
    # the rotations' state: (cs, sn) the previous rotation, dbar / epsilon the entries it carries over
    dbar = 0.0
    epsilon = 0.0
    phibar = beta1
    cs = -1.0
    sn = 0.0
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    done = 0
    for done in range(1, iterations + 1):
        v = y / beta
        y = operator(v)
        if y.shape != b.shape:
            raise ValueError(f"minres: operator returned shape {tuple(y.shape)} for a vector of shape {tuple(b.shape)}")
        if done >= 2:
            y = y - (beta / old_beta) * r1
        alpha = _dot(v, y)
        y = y - (alpha / beta) * r2
        r1 = r2
        r2 = y
        old_beta = beta
        beta = math.sqrt(max(_dot(y, y), 0.0))
        # apply the previous rotation to the new column of the tridiagonal matrix
        old_epsilon = epsilon
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsilon = sn * beta
        dbar = -cs * beta
        # the next rotation, which annihilates beta
        gamma = max(math.hypot(gbar, beta), tiny)
        cs = gbar / gamma
        sn = beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1 = w2
        w2 = w
        w = (v - old_epsilon * w1 - delta * w2) / gamma
        x = x + phi * w
        if not math.isfinite(phibar):
            raise ValueError("minres: the recurrences produced a non-finite residual; the operator returned NaN or Inf")
        if phibar <= tol * beta1 or beta <= tiny * beta1:
            break
    residual = abs(phibar)
    return x, MinresInfo(done, residual, residual <= tol * beta1)


def conjugate_gradient(
    operator: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *, iterations: int, tol: float = 1e-10
) -> tuple[torch.Tensor, MinresInfo]:
    """Solve ``A x = b`` for a symmetric positive-definite A by conjugate gradients (Hestenes and Stiefel 1952).

    From ``x_0 = 0``; stops after ``iterations`` operator applications or
    when the residual is at most ``tol * ||b||``. On an indefinite A it may
    stall, wander or break down (it stops when ``p^T A p`` is zero); use
    :func:`minres` there.

    Args:
        operator: ``v -> A v`` on flat vectors shaped like ``b``.
        b: the right-hand side, a 1-D tensor.
        iterations: the most operator applications; >= 1.
        tol: the relative residual to reach.

    Returns:
        x (b's dtype and device) and the solve's :class:`MinresInfo`.
    """
    _check_system("conjugate_gradient", b, iterations, tol)
    x = torch.zeros_like(b)
    norm_b = math.sqrt(_dot(b, b))
    if norm_b == 0.0:
        return x, MinresInfo(0, 0.0, True)
    r = b.clone()
    p = b.clone()
    rr = norm_b * norm_b
    done = 0
    for done in range(1, iterations + 1):
        ap = operator(p)
        if ap.shape != b.shape:
            raise ValueError(
                f"conjugate_gradient: operator returned shape {tuple(ap.shape)} for a vector of shape {tuple(b.shape)}"
            )
        curvature = _dot(p, ap)
        if not math.isfinite(curvature):
            raise ValueError("conjugate_gradient: p^T A p is not finite; the operator returned NaN or Inf")
        if curvature == 0.0:
            logger.debug("conjugate_gradient: breakdown (p^T A p = 0) at iteration %d", done)
            break
        step = rr / curvature
        x = x + step * p
        r = r - step * ap
        rr_new = _dot(r, r)
        if math.sqrt(rr_new) <= tol * norm_b:
            rr = rr_new
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    residual = math.sqrt(rr)
    return x, MinresInfo(done, residual, residual <= tol * norm_b)


class _FullBatch:
    """The loss over all of ``inputs``, its gradient and Hessian-vector products, chunk by chunk.

    Chunk losses are weighted by their share of the samples, so for a
    ``loss_fn`` that averages over its batch the weighted sum is the
    full-batch loss; gradients and Hessian-vector products are linear in
    the loss, so their weighted chunk sums are exact too. With one chunk
    the gradient's graph is kept for the step's Hessian-vector products;
    with several each product recomputes each chunk (bounded memory).
    """

    def __init__(
        self,
        model: nn.Module,
        params: list[torch.Tensor],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        batch_size: int | None,
    ) -> None:
        self.model = model
        self.params = params
        self.loss_fn = loss_fn
        count = len(inputs)
        size = count if batch_size is None else min(batch_size, count)
        self.chunks = [
            (inputs[start:start + size], targets[start:start + size], min(size, count - start) / count)
            for start in range(0, count, size)
        ]
        self._graph: tuple[torch.Tensor, ...] | None = None
        self.step = 0

    def _chunk(self, index: int) -> torch.Tensor:
        inputs, targets, weight = self.chunks[index]
        loss = self.loss_fn(self.model(inputs), targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"newton_flat_area: loss_fn must return a scalar tensor, got {loss!r}")
        if not torch.isfinite(loss):
            raise ValueError(
                f"newton_flat_area: step {self.step}: the loss is {float(loss.detach())} on chunk {index} "
                "of the inputs; Newton needs a finite loss (try a smaller step_size or more solver iterations)"
            )
        return loss * weight

    def gradient(self, step: int, keep_graph: bool) -> tuple[float, torch.Tensor]:
        """The full-batch loss and flat gradient; with ``keep_graph`` and one chunk, keep the graph for :meth:`hvp`."""
        self._graph = None
        self.step = step
        total = 0.0
        flat = torch.zeros(sum(p.numel() for p in self.params), dtype=self.params[0].dtype,
                           device=self.params[0].device)
        create = keep_graph and len(self.chunks) == 1
        for index in range(len(self.chunks)):
            with torch.enable_grad():
                loss = self._chunk(index)
                grads = torch.autograd.grad(loss, self.params, create_graph=create, allow_unused=True)
            total += float(loss.detach())
            filled = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
            if create:
                self._graph = tuple(filled)
            flat += torch.cat([g.detach().reshape(-1) for g in filled]).to(flat.dtype)
        if not math.isfinite(total):
            raise ValueError(f"newton_flat_area: step {step}: the loss is {total}; Newton needs a finite loss")
        return total, flat

    def hvp(self, flat: torch.Tensor) -> torch.Tensor:
        """The full-batch Hessian times a flat vector."""
        vector = [part.view_as(p) for part, p in zip(torch.split(flat, [p.numel() for p in self.params]), self.params)]
        if self._graph is not None:
            return torch.cat([h.reshape(-1) for h in hessian_vector_product(self._graph, self.params, vector)])
        total = torch.zeros_like(flat)
        for index in range(len(self.chunks)):
            with torch.enable_grad():
                loss = self._chunk(index)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            filled = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads))
            total += torch.cat([h.reshape(-1) for h in hessian_vector_product(filled, self.params, vector)])
        return total


def newton_flat_area(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    steps: int = 20,
    step_size: float = 0.1,
    iterations: int = 50,
    solver: Literal["minres", "cg"] = "minres",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> FlatArea:
    """Walk ``model`` into a flat area by damped Newton steps on the full-batch loss; modifies its parameters in place.

    Each step computes the loss and gradient g over all of ``inputs``,
    solves ``H d = g`` (H: the full-batch Hessian, by Hessian-vector
    products) with ``iterations`` iterations of ``solver``, and sets
    ``params <- params - step_size * d``. Newton steps go to the nearest
    critical point, saddles included: near a saddle the gradient norm
    falls (by ``1 - step_size`` per step on a quadratic) while the loss
    stays up, which is the flat area the paper's tunnels escape.

    Only parameters with ``requires_grad`` move. Buffers are not touched
    by this function, but every forward pass runs in the model's current
    mode: use ``model.eval()`` for a model with dropout or batch norm (a
    deterministic loss, and no running statistics updated).

    Args:
        model: the network; its parameters are changed in place.
        inputs: the whole training set's inputs (first dimension: samples).
        targets: the matching targets.
        loss_fn: ``loss_fn(model(inputs), targets)``, averaged over the
            batch (the default reduction of torch's losses), so that chunk
            losses weighted by their sizes add up to the full-batch loss.
        steps: Newton steps; >= 0 (the paper: 20).
        step_size: the damping; positive (the paper: 0.1).
        iterations: solver iterations per step (Hessian-vector products); >= 1.
        solver: ``"minres"`` (symmetric indefinite H) or ``"cg"``
            (positive-definite H only).
        batch_size: evaluate the full batch in chunks of this many samples
            (bounded memory: each Hessian-vector product then recomputes
            every chunk); None: all at once.
        progress: show a bar over the steps (True), never (False), or in
            interactive use only (None, the default: stderr is a terminal).

    Returns:
        A :class:`FlatArea` with the loss and gradient norm before each
        step and after the last, and each solve's residual.

    Raises:
        ValueError: bad arguments, or a NaN or infinite loss (naming the step).
    """
    who = "newton_flat_area"
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{who}: steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"{who}: step_size must be a positive finite number, got {step_size!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{who}: iterations must be an integer >= 1, got {iterations!r}")
    solvers = {"minres": minres, "cg": conjugate_gradient}
    if solver not in solvers:
        raise ValueError(f"{who}: solver must be 'minres' or 'cg', got {solver!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"{who}: batch_size must be a positive integer or None, got {batch_size!r}")
    if len(inputs) == 0 or len(inputs) != len(targets):
        raise ValueError(
            f"{who}: got {len(inputs)} inputs and {len(targets)} targets; pass the same non-zero number of each"
        )
    params: list[torch.Tensor] = [param for param in model.parameters() if param.requires_grad]
    if not params:
        raise ValueError(f"{who}: the model has no parameters that require grad; there is nothing to move")
    solve = solvers[solver]
    batch = _FullBatch(model, params, inputs, targets, loss_fn, batch_size)

    started = time.perf_counter()
    losses: list[float] = []
    grad_norms: list[float] = []
    residuals: list[float] = []
    for step in progress_bar(range(steps), desc="Newton steps", enabled=progress):
        loss, gradient = batch.gradient(step, keep_graph=True)
        grad_norm = math.sqrt(_dot(gradient, gradient))
        losses.append(loss)
        grad_norms.append(grad_norm)
        direction, info = solve(batch.hvp, gradient, iterations=iterations)
        residual = info.residual / grad_norm if grad_norm > 0 else 0.0
        residuals.append(residual)
        with torch.no_grad():
            offset = 0
            for param in params:
                count = param.numel()
                param.sub_(direction[offset:offset + count].view_as(param).to(param.dtype), alpha=step_size)
                offset += count
        logger.info("%s: step %d loss %.6g, gradient norm %.3g, %s relative residual %.2g after %d iterations",
                    who, step, loss, grad_norm, solver, residual, info.iterations)
    loss, gradient = batch.gradient(steps, keep_graph=False)
    losses.append(loss)
    grad_norms.append(math.sqrt(_dot(gradient, gradient)))
    logger.info("%s: after %d steps loss %.6g, gradient norm %.3g", who, steps, loss, grad_norms[-1])
    return FlatArea(losses, grad_norms, residuals, time.perf_counter() - started)

"""Top singular triplets of many small matrices at once: from A itself, or from products with A.

Both solvers are batched over channels: every call handles all channels of
a group together. The sign of a singular pair is arbitrary; it is fixed so
that the right singular vector's largest-magnitude entry is positive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Triplet:
    """Top singular value, right vector and how it was found, for a batch of matrices."""

    sigma: torch.Tensor  # (S,)
    direction: torch.Tensor  # (S, L), unit norm, sign fixed
    steps: int  # products with A and A^T each (0 for the exact solver)
    residual: torch.Tensor  # (S,) ||A^T u - sigma v|| (0 for the exact solver)


def fix_sign(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-magnitude entry is positive (ties: the first one)."""
    index = vectors.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(vectors.gather(-1, index))
    sign[sign == 0] = 1
    return vectors * sign


def top_singular(a: torch.Tensor) -> Triplet:
    """Top singular triplet of each matrix in ``a`` (S, K, L), through the smaller Gram matrix."""
    rows, cols = a.shape[1:]
    if rows <= cols:
        _, vectors = torch.linalg.eigh(a @ a.transpose(1, 2))
        right = torch.einsum("skl,sk->sl", a, vectors[:, :, -1])  # sigma * v
        sigma = right.norm(dim=1)
    else:
        _, vectors = torch.linalg.eigh(a.transpose(1, 2) @ a)
        right = vectors[:, :, -1]
        sigma = torch.einsum("skl,sl->sk", a, right).norm(dim=1)
    norm = right.norm(dim=1, keepdim=True)
    direction = torch.where(norm > 0, right / norm.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(right))
    return Triplet(sigma, fix_sign(direction), 0, torch.zeros_like(sigma))


Operator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(vectors, channels) -> products``: rows of ``vectors`` belong to the matrices ``channels`` (indices)."""


def lanczos_top(
    product: Operator,
    transposed: Operator,
    start: torch.Tensor,
    *,
    max_steps: int = 20,
    tol: float = 1e-4,
    dtype: torch.dtype | None = None,
) -> Triplet:
    """Top singular triplets by Golub-Kahan-Lanczos bidiagonalisation, batched over matrices.

    Args:
        product: ``(v (n, L), channels (n,)) -> A v (n, K)`` for the matrices
            ``channels`` of the batch (indices into it, ascending).
        transposed: ``(u (n, K), channels) -> A^T u (n, L)``.
        start: starting right vectors (S, L), e.g. random or a previous answer.
        max_steps: most products with each of A and A^T.
        tol: a matrix is done when ``||A^T u - sigma v|| <= tol * sigma``
            (the residual of the Ritz pair; ``A v - sigma u`` is zero by
            construction).
        dtype: the precision of the Lanczos vectors (default: ``start``'s).
            The bases are most of the solver's memory; products computed in
            float32 gain nothing from float64 bases. The small bidiagonal
            problem, the Ritz vectors and the results are float64.

    Each matrix stops on its own: once its triplet has converged it leaves
    the batch, and later products are asked only for the matrices still
    running, so they cost in proportion to those (the engine restricts its
    convolutions to their channels). Both bases are fully re-orthogonalised,
    so the Ritz values are reliable after a handful of steps; the top one
    converges at a rate set by the gap between the first two singular
    values. ``steps`` of the result is the most any matrix used.
    """
    count = start.shape[0]
    basis = dtype or start.dtype
    tiny = torch.finfo(basis).tiny ** 0.5
    sigma_out = torch.zeros(count, dtype=torch.float64, device=start.device)
    residual_out = torch.zeros_like(sigma_out)
    direction_out = torch.zeros(start.shape, dtype=torch.float64, device=start.device)
    active = torch.arange(count, device=start.device)  # the matrices still running
    v = start.to(basis)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(tiny)
    right: list[torch.Tensor] = [v]
    left: list[torch.Tensor] = []
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    step = 0
    for step in range(1, max_steps + 1):
        u = product(v, active).to(basis)
        if betas:
            u.addcmul_(betas[-1].unsqueeze(1), left[-1], value=-1)
        u = _orthogonalise(u, left)
        alpha = u.norm(dim=1)
        u.div_(alpha.clamp_min(tiny).unsqueeze(1))
        left.append(u)
        alphas.append(alpha)
        w = transposed(u, active).to(basis)
        w.addcmul_(alpha.unsqueeze(1), v, value=-1)
        w = _orthogonalise(w, right)
        beta = w.norm(dim=1)
        betas.append(beta)

        running = active.numel()
        bidiagonal = torch.zeros(running, step, step, dtype=torch.float64, device=start.device)
        index = torch.arange(step, device=start.device)
        bidiagonal[:, index, index] = torch.stack(alphas, dim=1).double()
        if step > 1:
            bidiagonal[:, index[:-1], index[1:]] = torch.stack(betas[:-1], dim=1).double()
        p, s, qh = torch.linalg.svd(bidiagonal)
        sigma = s[:, 0]
        residual = (beta.double() * p[:, -1, 0]).abs()
        done = (residual <= tol * sigma) | (sigma <= tiny)
        if step == max_steps:
            done[:] = True
        if bool(done.any()):
            finished = done.nonzero().squeeze(1)
            direction = torch.zeros(finished.numel(), start.shape[1], dtype=torch.float64, device=start.device)
            for j, basis_vector in enumerate(right):  # the Ritz vectors, without stacking the basis
                direction.addcmul_(qh[finished, 0, j].unsqueeze(1), basis_vector[finished])
            direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(tiny)
            converged = sigma[finished].unsqueeze(1) > tiny
            direction = torch.where(converged, direction, torch.zeros_like(direction))
            where = active[finished]
            sigma_out[where] = sigma[finished]
            residual_out[where] = residual[finished]
            direction_out[where] = direction
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            # the running matrices' bases, compacted once per change of the batch
            active = active[keep]
            right = [vector[keep] for vector in right]
            left = [vector[keep] for vector in left]
            alphas = [value[keep] for value in alphas]
            betas = [value[keep] for value in betas]
            w, beta = w[keep], beta[keep]
        v = w.div_(beta.clamp_min(tiny).unsqueeze(1))
        right.append(v)
    return Triplet(sigma_out, fix_sign(direction_out), step, residual_out)


def _orthogonalise(vectors: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """Remove the components along ``basis``: modified Gram-Schmidt, repeated once where it cancelled much.

    Each basis vector is read where it lies (no stacked copy) and the
    vectors are updated in place: the basis is (matrices x length) per
    vector, often tens of megabytes, so memory traffic is the cost. A
    second pass runs when the first removed more than half a vector's norm
    ("twice is enough"), the case where rounding leaves a component behind.
    """
    if not basis:
        return vectors
    before = vectors.norm(dim=1)
    for sweep in range(2):
        for vector in basis:
            coefficient = torch.bmm(vector.unsqueeze(1), vectors.unsqueeze(2)).reshape(-1, 1)
            vectors.addcmul_(coefficient, vector, value=-1)
        after = vectors.norm(dim=1)
        if sweep or bool((after >= 0.5 * before).all()):
            break
        before = after
    return vectors

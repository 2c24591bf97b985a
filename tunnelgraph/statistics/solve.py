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


def lanczos_top(
    product: Callable[[torch.Tensor], torch.Tensor],
    transposed: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    *,
    max_steps: int = 20,
    tol: float = 1e-4,
) -> Triplet:
    """Top singular triplets by Golub-Kahan-Lanczos bidiagonalisation, batched over matrices.

    Args:
        product: ``v (S, L) -> A v (S, K)`` for every matrix of the batch.
        transposed: ``u (S, K) -> A^T u (S, L)``.
        start: starting right vectors (S, L), e.g. random or a previous answer.
        max_steps: most products with each of A and A^T.
        tol: stop when every matrix has ``||A^T u - sigma v|| <= tol * sigma``
            (the residual of the Ritz pair; ``A v - sigma u`` is zero by
            construction).

    Both bases are fully re-orthogonalised, so the Ritz values are reliable
    after a handful of steps; the top one converges at a rate set by the gap
    between the first two singular values.
    """
    tiny = torch.finfo(start.dtype).tiny ** 0.5
    v = start / start.norm(dim=1, keepdim=True).clamp_min(tiny)
    right: list[torch.Tensor] = [v]
    left: list[torch.Tensor] = []
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    count = start.shape[0]
    for step in range(1, max_steps + 1):
        u = product(v)
        if betas:
            u = u - betas[-1].unsqueeze(1) * left[-1]
        u = _orthogonalise(u, left)
        alpha = u.norm(dim=1)
        u = u / alpha.clamp_min(tiny).unsqueeze(1)
        left.append(u)
        alphas.append(alpha)
        w = transposed(u) - alpha.unsqueeze(1) * v
        w = _orthogonalise(w, right)
        beta = w.norm(dim=1)
        betas.append(beta)

        bidiagonal = torch.zeros(count, step, step, dtype=start.dtype, device=start.device)
        index = torch.arange(step, device=start.device)
        bidiagonal[:, index, index] = torch.stack(alphas, dim=1)
        if step > 1:
            bidiagonal[:, index[:-1], index[1:]] = torch.stack(betas[:-1], dim=1)
        p, s, qh = torch.linalg.svd(bidiagonal)
        sigma = s[:, 0]
        residual = (beta * p[:, -1, 0]).abs()
        done = (residual <= tol * sigma) | (sigma <= tiny)
        if bool(done.all()) or step == max_steps:
            basis = torch.stack(right, dim=1)  # (S, step, L)
            direction = torch.einsum("sj,sjl->sl", qh[:, 0, :], basis)
            direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(tiny)
            direction = torch.where(sigma.unsqueeze(1) > tiny, direction, torch.zeros_like(direction))
            return Triplet(sigma, fix_sign(direction), step, residual)
        v = w / beta.clamp_min(tiny).unsqueeze(1)
        right.append(v)
    raise AssertionError("unreachable")


def _orthogonalise(vectors: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """Remove the components along ``basis`` (twice, for numerical safety)."""
    if not basis:
        return vectors
    stacked = torch.stack(basis, dim=1)  # (S, j, n)
    for _ in range(2):
        vectors = vectors - torch.einsum("sj,sjn->sn", torch.einsum("sjn,sn->sj", stacked, vectors), stacked)
    return vectors

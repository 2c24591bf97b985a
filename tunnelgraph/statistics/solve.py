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
    right = _Basis(count, start.shape[1], basis, max_steps + 1, start.device)
    right.append(v)
    left: _Basis | None = None
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    step = 0
    for step in range(1, max_steps + 1):
        u = product(v, active).to(basis)
        if left is None:
            left = _Basis(count, u.shape[1], basis, max_steps, start.device)
        if betas:
            u.addcmul_(betas[-1].unsqueeze(1), left.last(), value=-1)
        u = left.orthogonalise(u)
        alpha = u.norm(dim=1)
        u.div_(alpha.clamp_min(tiny).unsqueeze(1))
        left.append(u)
        alphas.append(alpha)
        w = transposed(u, active).to(basis)
        w.addcmul_(alpha.unsqueeze(1), v, value=-1)
        w = right.orthogonalise(w)
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
            direction = right.combine(qh[finished, 0, :], finished).double()  # the Ritz vectors
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
            right.keep(keep)
            left.keep(keep)
            alphas = [value[keep] for value in alphas]
            betas = [value[keep] for value in betas]
            w, beta = w[keep], beta[keep]
        v = w.div_(beta.clamp_min(tiny).unsqueeze(1))
        right.append(v)
    return Triplet(sigma_out, fix_sign(direction_out), step, residual_out)


class _Basis:
    """Lanczos vectors of a batch of matrices: one (matrices, vectors, length) tensor, grown in blocks.

    Held as one tensor, the basis is read by one batched matrix product per
    re-orthogonalisation sweep (classical Gram-Schmidt) rather than one
    small product per vector. It starts with room for at most
    :attr:`BLOCK` vectors and grows by as many when full, so a solve that
    converges in a few steps holds about those, not ``max_steps``.
    """

    BLOCK = 8

    def __init__(self, count: int, length: int, dtype: torch.dtype, most: int, device: torch.device) -> None:
        self.most = most
        self.data = torch.empty(count, min(most, self.BLOCK), length, dtype=dtype, device=device)
        self.size = 0

    def append(self, vectors: torch.Tensor) -> None:
        if self.size == self.data.shape[1]:
            room = min(self.most, self.size + self.BLOCK)
            grown = self.data.new_empty(self.data.shape[0], room, self.data.shape[2])
            grown[:, :self.size] = self.data[:, :self.size]
            self.data = grown
        self.data[:, self.size] = vectors
        self.size += 1

    def last(self) -> torch.Tensor:
        return self.data[:, self.size - 1]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the matrices ``rows`` (ascending indices) only, moved down in place.

        No second copy of the basis is made (the bases are most of a
        solve's memory): each kept row moves to its new place, which never
        lies after it, so no row is overwritten before it has moved.
        """
        for place, row in enumerate(rows.tolist()):
            if place != row:
                self.data[place, :self.size] = self.data[row, :self.size]
        self.data = self.data[:rows.numel()]

    def combine(self, coefficients: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """sum_j coefficients[:, j] * vector j, for the matrices ``rows``: (len(rows), length)."""
        vectors = self.data[rows, :self.size]
        weights = coefficients[:, :self.size].to(vectors.dtype).unsqueeze(1)
        return torch.bmm(weights, vectors).squeeze(1)

    def orthogonalise(self, vectors: torch.Tensor) -> torch.Tensor:
        """Remove the components along the basis, in place: classical Gram-Schmidt, repeated where it cancelled.

        A second sweep runs when the first removed more than a fraction
        1 - 1/sqrt(2) of a vector's norm (the criterion of Daniel, Gragg,
        Kaufman and Stewart: "twice is enough"), the case where rounding
        leaves a component behind.
        """
        if self.size == 0:
            return vectors
        basis = self.data[:, :self.size]  # (n, k, length), a view
        before = vectors.norm(dim=1)
        for sweep in range(2):
            coefficients = torch.bmm(basis, vectors.unsqueeze(2))  # (n, k, 1)
            vectors.unsqueeze(1).baddbmm_(coefficients.transpose(1, 2), basis, alpha=-1)
            after = vectors.norm(dim=1)
            if sweep or bool((after >= 0.7071 * before).all()):
                break
            before = after
        return vectors

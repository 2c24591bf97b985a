"""Top singular triplets of many small matrices at once: from A itself, or from products with A.

Both solvers (the exact :func:`top_singular` and the Lanczos
:func:`lanczos_gram_top`) are batched over channels: every call handles all
channels of a group together. The sign of a singular pair is arbitrary; it
is fixed so that the right singular vector's largest-magnitude entry is
positive.
"""

from __future__ import annotations

import math
import mmap
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


def fix_sign(vectors: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Flip each row so that its largest-magnitude entry is positive (ties: the first one).

    A new tensor, or ``vectors`` itself with ``inplace``. Each row's sign is
    read off its minimum and maximum; a row whose largest
    magnitude is reached with both signs is settled by its first such entry.
    """
    if vectors.numel() == 0:
        return vectors if inplace else vectors.clone()
    sign = signs(vectors)
    return vectors.mul_(sign) if inplace else vectors * sign


def signs(vectors: torch.Tensor) -> torch.Tensor:
    """(rows, 1): +1 or -1 per row of ``vectors``, what :func:`fix_sign` multiplies it by (a positive factor of a row
    leaves its sign as it is)."""
    # two reductions: torch's aminmax along a dimension is many times slower on the CPU (2.8 against 0.12 ms on
    # 512 rows of 4,608)
    low, high = vectors.amin(dim=-1, keepdim=True), vectors.amax(dim=-1, keepdim=True)
    negative = -low > high
    tied = (-low == high) & (high > 0)
    # rare: decide by the first entry of largest magnitude (on an accelerator, without waiting to learn whether)
    if not reads_are_free(vectors.device) or bool(tied.any()):
        first = vectors.gather(-1, vectors.abs().argmax(dim=-1, keepdim=True))
        negative = torch.where(tied, first < 0, negative)
    return 1 - 2 * negative.to(vectors.dtype)


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a value of a tensor on ``device`` into Python costs nothing more than the read.

    True on the CPU. On an accelerator a read waits for all the work queued
    before it, so the solver's optional work (a second Gram-Schmidt sweep,
    the settling of sign ties) is done unconditionally there rather than
    after asking whether it is needed.
    """
    return device.type == "cpu"


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


Operator = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``(vectors, channels, out) -> products``: rows of ``vectors`` belong to the matrices ``channels`` (indices).

The products are written into ``out`` when it is given (a view of the
solver's basis, in its precision) and ``out`` is returned; an operator may
also return a new tensor, which is then copied there.
"""


def lanczos_gram_top(
    gram: Operator,
    start: torch.Tensor,
    *,
    max_steps: int = 20,
    tol: float = 1e-4,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    workspace: Workspace | None = None,
    lift: Operator | None = None,
) -> Triplet:
    """Top singular triplets from products with ``A^T A``: symmetric Lanczos, batched over matrices.

    ``gram`` may be a product with A followed by one with A^T (the Krylov
    space and Ritz pair of Golub-Kahan bidiagonalisation, with one basis of
    L entries rather than two of K and L), or a cheaper product
    (:class:`GramFactors`). One basis, of right vectors, fully
    re-orthogonalised; the tridiagonal ``T_j`` (diagonal ``alpha``,
    off-diagonal ``beta``) has top eigenpair ``(theta, s)``, the Ritz
    vector is ``V_j s`` and ``sigma = sqrt(theta)``. A matrix stops when
    ``||A^T A v - theta v|| = |beta_j s_j| <= tol * theta``, which is
    ``||A^T u - sigma v|| <= tol * sigma`` for ``u = A v / sigma``;
    ``residual`` reports ``||A^T u - sigma v||``.

    Each matrix stops on its own: once its triplet has converged its result
    is kept, and the matrix leaves the batch when a quarter of the batch
    has finished (compacting the basis costs a copy of it, so it is not
    done for every straggler); later products are asked only for the
    matrices still in the batch, so they cost in proportion to those (the
    engine restricts its convolutions to their channels). The products are
    written straight into the basis. Full re-orthogonalisation makes the
    Ritz values reliable after a handful of steps; the top one converges
    at a rate set by the gap between the first two singular values.
    ``steps`` of the result is the most any matrix used.

    With ``lift``, the solve is of ``B B^T`` for matrices ``B`` whose right
    singular vectors are wanted (A of the description above is ``B^T``):
    ``gram`` is ``y -> B B^T y``, ``start`` holds vectors of B's rows (such
    as ``B v`` for a start ``v``), and each Ritz vector ``y`` comes back
    as ``lift(y) = B^T y``, normalised, in ``out`` (required). Short
    vectors of many columns (:class:`GramFactors`) keep the basis small.
    The Ritz vectors are lifted all together when the solve ends, by one
    call of ``lift`` on every matrix of the batch, in order.
    ``residual`` is then ``||B v - sigma y||`` for ``v = B^T y / sigma``,
    whose other side ``B^T y - sigma v`` is zero by construction.

    Args:
        gram: ``(v (n, L), channels (n,), out) -> A^T A v (n, L)`` for the
            matrices ``channels`` of the batch (indices into it, ascending;
            see :data:`Operator`).
        start: starting right vectors (S, L), e.g. random or a previous answer.
        max_steps: most products with ``A^T A`` (with A and with A^T each).
        tol: the stopping criterion above.
        dtype: the precision of the Lanczos vectors and of the returned
            directions (default: ``start``'s). The basis is most of the
            solver's memory; products computed in float32 gain nothing from
            a float64 basis. The small tridiagonal problem, sigma and the
            residuals are float64, on the host: each step copies its alpha
            and beta there (on an accelerator, the step's one wait for the
            device) and sends back only what finishing channels need.
        out: where the directions go (S, L), in ``dtype``: the returned
            ``direction``.
        workspace: memory for the basis, kept from one solve to the next
            (see :class:`Workspace`); by default it is allocated afresh.
        lift: ``(y (n, r), channels (n,), out) -> B^T y (n, L')`` for vectors ``y`` of B's r rows, see above.
    """
    if lift is not None and out is None:
        raise ValueError("lanczos_gram_top: lift needs out, the (matrices x L') tensor its directions go to")
    basis = dtype or start.dtype
    ledger = _Ledger(start, basis, max_steps, out, lift)
    tiny = ledger.tiny
    right, v = _started(start, basis, max_steps, workspace)
    step = 0
    for step in range(1, max_steps + 1):
        w = _apply(gram, v, ledger.batch, right.slot())
        alpha = torch.linalg.vecdot(w, v)
        beta = right.orthogonalise(w)  # against every vector so far, v included: w - alpha v - beta v_prev - ...
        ledger.record(step, alpha, beta)

        tridiagonal = torch.diag_embed(ledger.alphas[:, :step])
        index = torch.arange(step - 1)
        tridiagonal[:, index, index + 1] = ledger.betas[:, :step - 1]
        tridiagonal[:, index + 1, index] = ledger.betas[:, :step - 1]
        values, vectors = torch.linalg.eigh(tridiagonal)
        theta = values[:, -1].clamp_min(0)
        sigma = theta.sqrt()
        residual = (ledger.betas[:, step - 1] * vectors[:, -1, -1]).abs()  # ||A^T A x - theta x||
        done = (residual <= tol * theta) | (sigma <= tiny) | (step == max_steps)
        # ||A^T u - sigma v|| = ||A^T A x - theta x|| / sigma for u = A x / sigma
        if ledger.finish(done, right, vectors[:, :, -1], sigma, residual / sigma.clamp_min(tiny)):
            break
        v = ledger.next_vector(right, beta)
    return ledger.triplet(step)


def _started(start: torch.Tensor, dtype: torch.dtype, max_steps: int,
             workspace: Workspace | None) -> tuple[_Basis, torch.Tensor]:
    """A solve's basis of right vectors (room for ``max_steps + 1``, from ``workspace`` handed out again from its
    start, or from a fresh one that keeps nothing) and the first of them: ``start``'s rows, normalised."""
    memory = workspace if workspace is not None else Workspace(start.device, keep=False)
    memory.reset()  # the last solve's basis is gone: its memory serves this one
    right = _Basis(start.shape[0], start.shape[1], dtype, max_steps + 1, memory)
    v = right.slot().copy_(start)
    v.div_(v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny ** 0.5))
    right.commit()
    return right, v


class _Ledger:
    """The host bookkeeping of a batched Lanczos solve, and its results.

    Which matrix each row of the basis holds (``rows`` on the host,
    ``batch`` where the products index with it), which rows finished, each
    row's recurrence coefficients (``alphas``, ``betas``, float64 on the
    host: each step copies its two there, on an accelerator the step's one
    wait for the device), and the results, written once per matrix when it
    finishes: sigma and residual (float64, host), the Ritz vectors
    (``direction``, in the basis' precision). With a ``lift`` the Ritz
    vectors are kept as they are (``short``, B's few rows) and lifted all
    together when the solve ends (:meth:`triplet`): one product for every
    matrix, on the channels in their order, rather than one per step on
    the few that finished, picked from the factors.
    """

    def __init__(self, start: torch.Tensor, dtype: torch.dtype, max_steps: int, out: torch.Tensor | None,
                 lift: Operator | None = None) -> None:
        count, self.device, self.lift = start.shape[0], start.device, lift
        self.tiny = torch.finfo(dtype).tiny ** 0.5
        self.sigma = torch.zeros(count, dtype=torch.float64)
        self.residual = torch.zeros_like(self.sigma)
        self.direction = torch.empty(start.shape, dtype=dtype, device=self.device) if out is None else out
        self.short = None if lift is None else torch.empty(start.shape, dtype=dtype, device=self.device)
        self.rows = torch.arange(count)
        self.batch = self.rows.to(self.device)
        self.retired = torch.zeros(count, dtype=torch.bool)  # rows whose result is kept, still in the basis
        self.alphas = torch.zeros(count, max_steps, dtype=torch.float64)
        self.betas = torch.zeros_like(self.alphas)

    def record(self, step: int, alpha: torch.Tensor, beta: torch.Tensor) -> None:
        """Step ``step``'s coefficients of every row, read to the host in one transfer."""
        self.alphas[:, step - 1], self.betas[:, step - 1] = torch.stack((alpha, beta)).to("cpu", torch.float64)

    def finish(self, done: torch.Tensor, basis: _Basis, coefficients: torch.Tensor, sigma: torch.Tensor,
               residual: torch.Tensor) -> bool:
        """Keep the results of the rows ``done`` that were not kept yet; True once every row's is.

        ``coefficients`` (rows x basis vectors, host) combine ``basis`` into
        each row's Ritz vector: normalised, zero where sigma is
        (numerically) zero, its sign fixed; or, with a ``lift``, kept as it
        is until :meth:`triplet`. ``sigma`` and ``residual`` are the rows'
        (host).
        """
        new = done & ~self.retired
        if not bool(new.any()):
            return False
        finished = new.nonzero().squeeze(1)
        on_device = finished.to(self.device)
        where = self.rows[finished]
        self.sigma[where] = sigma[finished]
        self.residual[where] = residual[finished]
        kept = self.direction if self.short is None else self.short
        first, count = int(where[0]), where.numel()
        # rows in a run (ascending and unique) are made where they go; others are made apart and copied there
        target = kept[first:first + count] if int(where[-1]) - first + 1 == count else None
        direction = basis.combine(coefficients[finished].to(self.device), on_device, out=target)  # the Ritz vectors
        if self.short is None:
            _normalise(direction, sigma[finished] > self.tiny, self.tiny)
        if target is None:
            kept.index_copy_(0, self.batch[on_device], direction)
        self.retired |= new
        return bool(self.retired.all())

    def compact(self, right: _Basis) -> torch.Tensor | None:
        """Once a quarter of the rows finished, drop them from the basis (its pending vector moves too).

        Returns the kept rows (on the device, for the caller's per-row
        tensors), or None when nothing moved: compacting costs a copy of the
        basis, not worth it for a straggler.
        """
        if 4 * int(self.retired.sum()) < self.retired.numel():
            return None
        keep = (~self.retired).nonzero().squeeze(1)  # on the host, as the basis reads it
        right.keep(keep, pending=True)
        self.rows, self.retired, self.alphas, self.betas = (
            self.rows[keep], self.retired[keep], self.alphas[keep], self.betas[keep])
        kept = keep.to(self.device)
        self.batch = self.batch[kept]
        return kept

    def next_vector(self, right: _Basis, beta: torch.Tensor) -> torch.Tensor:
        """The next Lanczos vector: the pending one in ``right``'s slot (orthogonalised, of norm ``beta``, one per
        row) divided by ``beta`` and committed, once finished rows left the basis where due (:meth:`compact`)."""
        kept = self.compact(right)
        if kept is not None:
            beta = beta[kept]
        right.slot().div_(beta.clamp_min(self.tiny).unsqueeze(1))
        right.commit()
        return right.last()

    def triplet(self, steps: int) -> Triplet:
        """The results, sigma and residual on the device; with a ``lift``, every row's Ritz vector lifted,
        normalised and signed into ``direction`` first."""
        if self.lift is not None and self.short is not None:  # lifted once: short is then dropped
            rows = torch.arange(self.short.shape[0], device=self.device)
            lifted = self.lift(self.short, rows, self.direction)
            self.short = None
            if lifted is not self.direction:  # a lift may return a tensor of its own (see Operator)
                self.direction.copy_(lifted)
            _normalise(self.direction, self.sigma > self.tiny, self.tiny)
        return Triplet(self.sigma.to(self.device), self.direction, steps, self.residual.to(self.device))


def _normalise(vectors: torch.Tensor, alive: torch.Tensor, tiny: float) -> torch.Tensor:
    """``vectors``' rows normalised, zero where ``alive`` (host, per row) is False, their signs fixed
    (:func:`signs`): one factor per row, applied in place in one pass."""
    alive = alive.to(device=vectors.device, dtype=vectors.dtype)
    return vectors.mul_(signs(vectors) * (alive / vectors.norm(dim=1).clamp_min(tiny)).unsqueeze(1))


def _apply(operator: Operator, vectors: torch.Tensor, channels: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``operator``'s products written into ``out``."""
    result = operator(vectors, channels, out)
    if result is not out:
        out.copy_(result)
    return out


class _Basis:
    """Lanczos vectors of a batch of matrices: one (vectors, matrices, length) tensor, grown in blocks.

    Held as one tensor, the basis is read by one batched matrix product per
    re-orthogonalisation sweep (classical Gram-Schmidt) rather than one
    small product per vector. Vector-major, each new vector is one
    contiguous block (:meth:`slot`, then :meth:`commit`), where the
    products write it. It starts with room for at most :attr:`BLOCK`
    vectors and grows by as many when full, so a solve that converges in a
    few steps holds about those, not ``max_steps``.
    """

    BLOCK = 8

    def __init__(self, count: int, length: int, dtype: torch.dtype, most: int, memory: Workspace) -> None:
        self.most, self.memory = most, memory
        self.data = memory.take((min(most, self.BLOCK), count, length), dtype)
        self.size = 0

    def slot(self) -> torch.Tensor:
        """Where the next vector goes, (matrices, length), contiguous; counted once :meth:`commit` is called."""
        if self.size == self.data.shape[0]:
            room = min(self.most, self.size + self.BLOCK)
            grown = self.memory.take((room, *self.data.shape[1:]), self.data.dtype)
            grown[:self.size] = self.data[:self.size]
            self.data = grown
        return self.data[self.size]

    def commit(self) -> None:
        self.size += 1

    def append(self, vectors: torch.Tensor) -> None:
        self.slot().copy_(vectors)
        self.commit()

    def last(self) -> torch.Tensor:
        return self.data[self.size - 1]

    def vectors(self) -> torch.Tensor:
        """(matrices, vectors, length): the basis of each matrix, a view."""
        return self.data[:self.size].transpose(0, 1)

    def keep(self, rows: torch.Tensor, pending: bool = False) -> None:
        """Keep the matrices ``rows`` (ascending indices) only, moved down in place.

        With ``pending`` the vector in :meth:`slot` moves too. No second copy
        of the basis is made (the basis is most of a solve's memory): one
        vector's rows at a time are gathered, then written to their places;
        the leading rows that keep their place are not touched. ``rows`` are
        read on the host: pass them there to spare an accelerator the wait.
        """
        kept = rows.numel()
        moved = rows.cpu() != torch.arange(kept)
        stay = int(moved.int().argmax()) if bool(moved.any()) else kept  # rows before it stay where they are
        if stay < kept:
            rows = rows.to(self.data.device)
            for vector in self.data[:self.size + int(pending)]:
                vector[stay:kept] = vector[rows[stay:]]
        self.data = self.data[:, :kept]

    def combine(self, coefficients: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """sum_j coefficients[:, j] * vector j, for the matrices ``rows``: (len(rows), length), into ``out`` when given.

        For most of the matrices, every row is combined (zero weights for the
        others) and the rows picked from the result, which reads the basis
        once instead of gathering the rows' vectors into a copy first.
        """
        count = self.data.shape[1]
        weights = coefficients[:, :self.size].to(self.data.dtype)
        into = None if out is None else out.unsqueeze(1)
        if 2 * rows.numel() < count:
            vectors = self.data[:self.size, rows]  # (k, n, length), gathered
            return torch.bmm(weights.unsqueeze(1), vectors.transpose(0, 1), out=into).squeeze(1)
        every = rows.numel() == count  # ascending and unique: all of them, in order
        if every:
            return torch.bmm(weights.unsqueeze(1), self.vectors(), out=into).squeeze(1)
        weights = weights.new_zeros(count, self.size).index_copy_(0, rows, weights)
        combined = torch.bmm(weights.unsqueeze(1), self.vectors()).squeeze(1)
        return combined[rows] if out is None else torch.index_select(combined, 0, rows, out=out)

    def orthogonalise(self, vectors: torch.Tensor) -> torch.Tensor:
        """Remove the components along the basis, in place: classical Gram-Schmidt, repeated where it cancelled.

        Returns the norms of the orthogonalised rows (computed for the
        criterion anyway). A second sweep runs when the first removed more
        than a fraction 1 - 1/sqrt(2) of a vector's norm (the criterion of
        Daniel, Gragg, Kaufman and Stewart: "twice is enough"), the case
        where rounding leaves a component behind; on an accelerator it always
        runs, which costs less than waiting to learn whether it is needed (the
        criterion is read on the host). Both products put the long
        axis last (row vector times matrix), the fast form of a batched
        product with one vector per matrix.
        """
        after = vectors.norm(dim=1)
        if self.size == 0:
            return after
        basis = self.vectors()  # (n, k, length), a view
        for sweep in range(2):
            before = after
            coefficients = torch.bmm(vectors.unsqueeze(1), basis.transpose(1, 2))  # (n, 1, k)
            vectors.unsqueeze(1).baddbmm_(coefficients, basis, alpha=-1)
            after = vectors.norm(dim=1)
            # on an accelerator a second sweep is cheaper than waiting to learn whether it is needed
            if sweep or (reads_are_free(vectors.device) and bool((after >= 0.7071 * before).all())):
                break
        return after


class Workspace:
    """Memory for the Lanczos bases of one solve after another, handed out in order and reused.

    The bases are a solve's largest temporaries. Fresh memory costs a page
    fault and a page of zeros per 4 KiB on first touch, several times the
    cost of writing it again; on the C heap, freed pages stay with the
    process, and the next solve's tensors, laid out around the results kept
    in between, do not always fit there (resident memory ratchets up solve
    after solve). A workspace holds one buffer (on the CPU from
    :data:`MAPPED` bytes an anonymous memory map, given back to the system
    when dropped) that every solve reuses from its start (:meth:`reset`);
    what does not fit is allocated apart, and the buffer grows to the
    largest need seen at the next reset. With ``keep=False`` nothing is
    kept: every request is allocated apart.
    """

    ALIGN = 64

    def __init__(self, device: torch.device, keep: bool = True) -> None:
        self.device, self.keep = device, keep
        self.buffer: torch.Tensor | None = None
        self.needed = self.largest = 0

    def reset(self) -> None:
        """Hand the buffer out again from its start; call when no tensor taken from it is in use."""
        if self.keep and self.largest > (0 if self.buffer is None else self.buffer.numel()):
            self.buffer = None  # dropped before its replacement is made
            self.buffer = _empty((self.largest,), torch.uint8, self.device)
        self.needed = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor, from the buffer where it fits."""
        size = math.prod(shape) * dtype.itemsize
        start = -(-self.needed // self.ALIGN) * self.ALIGN
        self.needed = start + size
        self.largest = max(self.largest, self.needed)
        if self.buffer is not None and self.needed <= self.buffer.numel():
            return self.buffer[start:self.needed].view(dtype).view(shape)
        return _empty(shape, dtype, self.device)


MAPPED = 2**20
"""Bytes from which a basis on the CPU lives in memory of its own (an anonymous map), not on the heap."""


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor; on the CPU, from :data:`MAPPED` bytes, in an anonymous memory map of its own
    (given back to the system when the tensor is freed, not kept on the heap)."""
    size = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or size < MAPPED:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, size), dtype=dtype).view(shape)

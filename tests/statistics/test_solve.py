"""The batched Lanczos solver against a dense SVD: channels that stop early, late, or never converge."""

from __future__ import annotations

import pytest
import torch

from tunnelgraph.statistics import solve
from tunnelgraph.statistics.solve import MAPPED, Operator, Workspace, _Basis, fix_sign, lanczos_gram_top


def _matrices(count: int, rows: int, columns: int, gaps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(count, rows, columns) float64 matrices whose top two singular values are 1 and 1 - gap."""
    size = min(rows, columns)
    left, _ = torch.linalg.qr(torch.randn(count, rows, size, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(count, columns, size, generator=generator, dtype=torch.float64))
    values = torch.linspace(1, 0.05, size, dtype=torch.float64).repeat(count, 1)
    values[:, 1] = 1 - gaps
    values[:, 2:] = values[:, 2:] * (1 - gaps).unsqueeze(1)
    return left @ torch.diag_embed(values) @ right.transpose(1, 2)


def _normal(product: Operator, transposed: Operator) -> Operator:
    """``A^T A`` from a product with A and one with A^T, as the engine composes them (the basis slot ``out`` goes
    to the second)."""
    return lambda v, channels, out: transposed(product(v, channels, None), channels, out)


def test_lanczos_finds_each_matrix_top_triplet_whether_it_stops_early_late_or_at_the_limit() -> None:
    """Fast and slow channels in one batch: the bases grow past one block and are compacted as channels stop.

    Each matrix must get its own top pair (a row mixed up with another in a
    compaction would give another matrix's vector); the products are asked
    for the running channels only, and the most steps used is reported.
    """
    generator = torch.Generator().manual_seed(0)
    gaps = torch.tensor([0.5, 0.3, 0.02, 0.5, 0.005, 0.2, 0.01, 0.4], dtype=torch.float64)
    a = _matrices(gaps.numel(), 40, 60, gaps, generator)
    asked: list[int] = []

    def product(v: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        asked.append(channels.numel())
        return torch.einsum("nkl,nl->nk", a[channels], v.double())

    def transposed(u: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        return torch.einsum("nkl,nk->nl", a[channels], u.double())

    start = torch.randn(gaps.numel(), 60, generator=generator, dtype=torch.float64)
    solved = lanczos_gram_top(_normal(product, transposed), start, max_steps=30, tol=1e-10)
    _, s, vh = torch.linalg.svd(a)
    assert torch.allclose(solved.sigma, s[:, 0], rtol=1e-12, atol=0)
    # the angle to the true vector is at most tol * sigma^2 / gap: 1e-8 at the smallest gap
    assert torch.allclose(solved.direction, fix_sign(vh[:, 0]), atol=1e-7)
    assert solved.steps > _Basis.BLOCK  # the slow channels grew their bases past one block
    assert asked[0] == gaps.numel() and asked[-1] < gaps.numel()  # finished channels left the batch
    assert bool((solved.residual <= 1e-10 * solved.sigma).all())

    limited = lanczos_gram_top(_normal(product, transposed), start, max_steps=3, tol=1e-10)
    assert limited.steps == 3
    assert bool((limited.sigma <= s[:, 0] * (1 + 1e-12)).all())  # Ritz values never exceed the true one
    assert bool((limited.residual > 0).all())


def test_a_basis_orthogonalises_and_keeps_rows_in_place() -> None:
    generator = torch.Generator().manual_seed(1)
    basis = _Basis(5, 30, torch.float64, most=12, memory=Workspace(torch.device("cpu"), keep=False))
    for _ in range(10):  # past one block: the basis grows
        vector = torch.randn(5, 30, generator=generator, dtype=torch.float64)
        norms = basis.orthogonalise(vector)
        assert torch.allclose(norms, vector.norm(dim=1), rtol=1e-15)
        basis.append(vector / vector.norm(dim=1, keepdim=True))
    gram = basis.vectors() @ basis.vectors().transpose(1, 2)
    assert torch.allclose(gram, torch.eye(10, dtype=torch.float64).expand(5, 10, 10), atol=1e-12)
    before = basis.vectors().clone()
    basis.keep(torch.tensor([1, 3, 4]))
    assert torch.equal(basis.vectors(), before[[1, 3, 4]])
    coefficients = torch.randn(2, 10, generator=generator, dtype=torch.float64)
    combined = basis.combine(coefficients, torch.tensor([0, 2]))
    assert torch.allclose(combined, torch.einsum("nj,njl->nl", coefficients, before[[1, 4]]), atol=1e-12)


def test_a_zero_matrix_finishes_at_once_and_rides_along_until_a_quarter_of_the_batch_is_done() -> None:
    """A finished matrix keeps its result; it stays in the bases (its products are zero) until compaction pays."""
    generator = torch.Generator().manual_seed(2)
    gaps = torch.tensor([0.5, 0.3, 0.5, 0.05, 0.2, 0.02], dtype=torch.float64)
    a = _matrices(gaps.numel(), 20, 30, gaps, generator)
    a[2] = 0
    asked: list[int] = []

    def product(v: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        asked.append(channels.numel())
        return torch.einsum("nkl,nl->nk", a[channels], v)

    def transposed(u: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        result = torch.einsum("nkl,nk->nl", a[channels], u)
        if out is None:
            return result
        out.copy_(result)  # an operator may write into the basis itself
        return out

    start = torch.randn(gaps.numel(), 30, generator=generator, dtype=torch.float64)
    solved = lanczos_gram_top(_normal(product, transposed), start, max_steps=30, tol=1e-10)
    _, s, vh = torch.linalg.svd(a)
    assert solved.sigma[2] == 0 and bool((solved.direction[2] == 0).all()) and solved.residual[2] == 0
    live = [0, 1, 3, 4, 5]
    assert torch.allclose(solved.sigma[live], s[live, 0], rtol=1e-12, atol=0)
    assert torch.allclose(solved.direction[live], fix_sign(vh[live, 0]), atol=1e-7)
    assert asked[:2] == [6, 6]  # one of six done after the first step: not worth a compaction
    assert asked[-1] < 6


def test_a_basis_keeps_the_pending_vector_when_compacted() -> None:
    generator = torch.Generator().manual_seed(3)
    basis = _Basis(6, 10, torch.float64, most=4, memory=Workspace(torch.device("cpu"), keep=False))
    for _ in range(3):
        basis.append(torch.randn(6, 10, generator=generator, dtype=torch.float64))
    basis.slot().copy_(torch.randn(6, 10, generator=generator, dtype=torch.float64))
    before, pending = basis.vectors().clone(), basis.slot().clone()
    rows = torch.tensor([0, 2, 5])
    basis.keep(rows, pending=True)
    assert torch.equal(basis.vectors(), before[rows]) and torch.equal(basis.slot(), pending[rows])
    basis.commit()
    assert basis.size == 4 and torch.equal(basis.last(), pending[rows])


def test_fix_sign_makes_the_largest_entry_positive_and_settles_ties_by_the_first() -> None:
    vectors = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.25, -0.1], [1.0, -1.0, 0.0], [-1.0, 1.0, 0.0],
                            [-2.0, 1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([[-1.0, 3.0, -2.0], [0.5, 0.25, -0.1], [1.0, -1.0, 0.0], [1.0, -1.0, 0.0],
                             [2.0, -1.0, -2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(fix_sign(vectors), expected)
    same = vectors.clone()
    assert fix_sign(same, inplace=True) is same and torch.equal(same, expected)


def test_a_basis_combines_few_or_most_of_its_rows() -> None:
    """A few rows are gathered first; most rows are combined all together and picked: the same sums, returned or
    written into ``out`` (a block of rows of a larger tensor, the solver's directions) and nowhere else."""
    generator = torch.Generator().manual_seed(4)
    basis = _Basis(9, 12, torch.float64, most=8, memory=Workspace(torch.device("cpu"), keep=False))
    for _ in range(5):
        basis.append(torch.randn(9, 12, generator=generator, dtype=torch.float64))
    vectors = basis.vectors()
    for rows in (torch.tensor([4]), torch.tensor([0, 3]), torch.tensor([1, 2, 5, 6, 8]), torch.arange(9)):
        coefficients = torch.randn(rows.numel(), 5, generator=generator, dtype=torch.float64)
        expected = torch.einsum("nj,njl->nl", coefficients, vectors[rows])
        assert torch.allclose(basis.combine(coefficients, rows), expected, atol=1e-13)
        whole = torch.full((rows.numel() + 2, 12), float("nan"), dtype=torch.float64)
        out = whole[1:-1]
        assert basis.combine(coefficients, rows, out=out).data_ptr() == out.data_ptr()
        assert torch.allclose(out, expected, atol=1e-13)
        assert bool(whole[[0, -1]].isnan().all())


def test_a_workspace_hands_its_buffer_out_again_and_grows_to_the_largest_need() -> None:
    """Within a solve the tensors taken do not overlap; the next solve reuses the same memory from its start,
    once the buffer has grown to the largest need seen (what did not fit was allocated apart)."""
    memory = Workspace(torch.device("cpu"))
    memory.reset()
    first = [memory.take((3, 1000), torch.float32), memory.take((2, 500), torch.float64)]  # no buffer yet: apart
    memory.reset()  # grows to what the first solve needed
    assert memory.buffer is not None and memory.buffer.numel() >= 3 * 1000 * 4 + 2 * 500 * 8
    a, b = memory.take((3, 1000), torch.float32), memory.take((2, 500), torch.float64)
    a.fill_(1.0)
    b.fill_(2.0)
    assert bool((a == 1).all()) and bool((b == 2).all())  # no overlap
    base = memory.buffer.data_ptr()
    assert a.data_ptr() == base and b.data_ptr() % Workspace.ALIGN == 0
    memory.reset()
    again = memory.take((3, 1000), torch.float32)
    assert again.data_ptr() == base  # the same memory, handed out again
    large = memory.take((MAPPED,), torch.float32)  # does not fit: allocated apart, in a map of its own
    assert large.data_ptr() != base and large.numel() == MAPPED
    memory.reset()
    assert memory.buffer.numel() >= 3 * 1000 * 4 + MAPPED * 4
    del first


def test_the_solver_without_reads_of_its_criteria_finds_the_same_triplets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator's path, taken on the CPU: the second sweep always runs and sign ties are settled without
    asking whether there are any. The triplets are those of the path that asks."""
    generator = torch.Generator().manual_seed(4)
    gaps = torch.tensor([0.5, 0.3, 0.02, 0.5, 0.005, 0.2], dtype=torch.float64)
    a = _matrices(gaps.numel(), 30, 50, gaps, generator)

    def product(v: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        return torch.einsum("nkl,nl->nk", a[channels], v)

    def transposed(u: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        return torch.einsum("nkl,nk->nl", a[channels], u)

    start = torch.randn(gaps.numel(), 50, generator=generator, dtype=torch.float64)
    asked = lanczos_gram_top(_normal(product, transposed), start, max_steps=40, tol=1e-10)
    monkeypatch.setattr(solve, "reads_are_free", lambda device: False)
    unasked = lanczos_gram_top(_normal(product, transposed), start, max_steps=40, tol=1e-10)
    _, s, vh = torch.linalg.svd(a)
    for solved in (asked, unasked):
        assert torch.allclose(solved.sigma, s[:, 0], rtol=1e-12, atol=0)
        assert torch.allclose(solved.direction, fix_sign(vh[:, 0]), atol=1e-7)
    assert torch.allclose(unasked.direction, asked.direction, atol=1e-9)
    ties = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 2.0, -2.0]], dtype=torch.float64)
    assert torch.equal(fix_sign(ties), torch.tensor([[1.0, -1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 2.0, -2.0]],
                                                    dtype=torch.float64))


def test_symmetric_lanczos_on_a_t_a_finds_each_matrix_top_triplet() -> None:
    """lanczos_gram_top, from products with A^T A alone, against the dense SVD: sigma, lambda*, the residual
    ``||A^T u - sigma v||`` of the stopping criterion, channels leaving the batch, a zero matrix."""
    generator = torch.Generator().manual_seed(3)
    gaps = torch.tensor([0.5, 0.3, 0.02, 0.5, 0.005, 0.2, 0.01, 0.4], dtype=torch.float64)
    a = _matrices(gaps.numel(), 40, 60, gaps, generator)
    a[5] = 0  # finishes at once, sigma 0 and a zero direction
    asked: list[int] = []

    def gram(v: torch.Tensor, channels: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        asked.append(channels.numel())
        block = a[channels]
        return torch.einsum("nkl,nk->nl", block, torch.einsum("nkl,nl->nk", block, v))

    start = torch.randn(gaps.numel(), 60, generator=generator, dtype=torch.float64)
    solved = solve.lanczos_gram_top(gram, start, max_steps=30, tol=1e-10)
    _, s, vh = torch.linalg.svd(a)
    live = torch.arange(gaps.numel()) != 5
    assert torch.allclose(solved.sigma[live], s[live, 0], rtol=1e-12, atol=0)
    assert torch.allclose(solved.direction[live], fix_sign(vh[live, 0]), atol=1e-6)
    assert solved.sigma[5] == 0 and bool((solved.direction[5] == 0).all())
    assert asked[0] == gaps.numel() and asked[-1] < gaps.numel()
    # the reported residual is ||A^T u - sigma v|| for u = A v / sigma
    u = torch.einsum("nkl,nl->nk", a, solved.direction) / solved.sigma.clamp_min(1e-300).unsqueeze(1)
    true = (torch.einsum("nkl,nk->nl", a, u) - solved.sigma.unsqueeze(1) * solved.direction).norm(dim=1)
    assert bool((solved.residual[live] <= 1e-10 * solved.sigma[live]).all())
    assert torch.allclose(solved.residual[live], true[live], rtol=1e-3, atol=1e-13)

    limited = solve.lanczos_gram_top(gram, start, max_steps=3, tol=1e-10)
    assert limited.steps == 3
    assert bool((limited.sigma <= s[:, 0] * (1 + 1e-12)).all())  # Ritz values never exceed the true one


def test_symmetric_lanczos_on_b_b_t_lifts_its_directions_to_b_right_singular_vectors() -> None:
    """lanczos_gram_top with ``lift``: a solve of B B^T on vectors of B's few rows gives B's top right singular
    vectors (as GramFactors uses it), normalised and signed in ``out``; each Ritz vector is kept whether the finished
    rows run consecutively or not, and all are lifted at the end, in one call on every matrix in order; a zero matrix
    gives sigma 0 and a zero direction; lift needs out.

    With ``tol=0`` the live matrices stop together at ``max_steps``, the
    rows' count, where the Krylov space is the whole space and the answer
    exact; the zero matrices (first and last) stop at the first step. So
    the finished rows are ``[0, 5]`` (not a run: scattered) and then
    ``[1, 2, 3, 4]`` (a run, after the compaction: written in place),
    whatever the rounding."""
    generator = torch.Generator().manual_seed(4)
    gaps = torch.tensor([0.5, 0.01, 0.3, 0.002, 0.2, 0.05], dtype=torch.float64)
    b = _matrices(gaps.numel(), 12, 70, gaps, generator)  # 12 rows, 70 columns: vectors of 12 entries
    b[0] = b[5] = 0
    lifted: list[list[int]] = []  # the channels of each lift
    kept: list[torch.Tensor] = []  # the Ritz vectors it lifts

    def gram(y: torch.Tensor, channels: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        block = b[channels]
        return torch.einsum("nkl,nl->nk", block, torch.einsum("nkl,nk->nl", block, y))

    def lift(y: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        lifted.append(channels.tolist())
        kept.append(y.clone())
        return torch.einsum("nkl,nk->nl", b[channels], y)

    start = torch.randn(12, generator=generator, dtype=torch.float64).expand(gaps.numel(), -1)
    out = torch.full((gaps.numel(), 70), float("nan"), dtype=torch.float64)
    solved = solve.lanczos_gram_top(gram, start, max_steps=12, tol=0.0, out=out, lift=lift)
    assert solved.direction is out
    assert lifted == [[0, 1, 2, 3, 4, 5]]
    # the zero matrices' Ritz vectors, kept apart from the rest at the first step, are the normalised start
    assert torch.allclose(kept[0][[0, 5]].abs(), (start[:2] / start[0].norm()).abs(), rtol=0, atol=1e-15)
    _, s, vh = torch.linalg.svd(b)
    live = torch.tensor([False, True, True, True, True, False])
    assert torch.allclose(solved.sigma[live], s[live, 0], rtol=1e-12, atol=0)
    assert torch.allclose(out[live], fix_sign(vh[live, 0]), atol=1e-6)
    assert bool((solved.sigma[~live] == 0).all()) and bool((out[~live] == 0).all())
    assert bool((solved.residual[live] <= 1e-10 * solved.sigma[live]).all())
    with pytest.raises(ValueError, match="lift needs out"):
        solve.lanczos_gram_top(gram, start, lift=lift)

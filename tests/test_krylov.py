"""The Lanczos kernel (engine/krylov.py) on built symmetric matrices, against dense references.

Every check compares the recurrence's output with something computed independently from the
dense matrix: the basis is orthonormal and projects the matrix onto the (block) tridiagonal of
its coefficients, whose eigenvalues approach the matrix's extremes; chains are independent;
a thick restart keeps the locked rows orthogonal; breakdowns on invariant subspaces are found.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lr_batch_callback import CurvatureOperator
from lr_batch_callback.engine.krylov import LanczosRecurrence, random_rows
from lr_batch_callback.engine.linear_operator import NonFiniteCurvatureError
from tests.reference import eigvalsh

P = 60
F64 = torch.float64


def _orthogonal(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim, dim, dtype=F64, generator=g))[0]


def _matrix(values: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q diag(values) Qᵀ`` with a random orthogonal ``Q`` (columns: eigenvectors)."""
    Q = _orthogonal(values.numel(), seed)
    A = Q @ torch.diag(values.to(F64)) @ Q.T
    return (A + A.T) / 2, Q


def _spectrum(seed: int = 0) -> torch.Tensor:
    """Two outliers well above a uniform bulk in [-1, 1], one below it."""
    g = torch.Generator().manual_seed(seed)
    bulk = torch.rand(P - 3, dtype=F64, generator=g) * 2 - 1
    return torch.cat([torch.tensor([5.0, 3.0, -4.0], dtype=F64), bulk])


def _unit_rows(n: int, b: int, dim: int, seed: int) -> torch.Tensor:
    """``(n, b, dim)`` start blocks with orthonormal rows."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, dim, b, dtype=F64, generator=g)
    return torch.linalg.qr(raw)[0].transpose(1, 2).contiguous()


def _tridiagonal(diag: np.ndarray, off: np.ndarray, chain: int = 0) -> np.ndarray:
    """The projected matrix ``T`` of one chain assembled from ``coefficients()``: block
    ``(j, j)`` is ``A_j`` and block ``(j, j+1)`` is ``G_j`` (``X_j A X_{j+1}ᵀ``)."""
    m, b = diag.shape[1], diag.shape[2]
    T = np.zeros((m * b, m * b))
    for j in range(m):
        s = slice(j * b, (j + 1) * b)
        T[s, s] = diag[chain, j]
        if j + 1 < m:
            t = slice((j + 1) * b, (j + 2) * b)
            T[s, t] = off[chain, j]
            T[t, s] = off[chain, j].T
    return T


def _run(rec: LanczosRecurrence, steps: int | None = None) -> LanczosRecurrence:
    count = 0
    while not rec.full and (steps is None or count < steps):
        rec.step()
        count += 1
    return rec


def _recurrence(A: torch.Tensor, start: torch.Tensor, capacity: int | None, seed: int = 0,
                locked: torch.Tensor | None = None) -> LanczosRecurrence:
    return LanczosRecurrence(CurvatureOperator.from_matrix(A), start, capacity=capacity,
                             locked=locked, generator=torch.Generator().manual_seed(seed))


# -- the basis and the projected matrix ----------------------------------------------------------

@pytest.mark.parametrize("block", [1, 3])
def test_the_basis_is_orthonormal_and_projects_the_matrix_onto_its_coefficients(block: int) -> None:
    A, _ = _matrix(_spectrum())
    rec = _run(_recurrence(A, _unit_rows(1, block, P, 1), capacity=30))
    assert rec.full and rec.steps == 30 // block
    V = rec.rows(0)
    assert V.shape == (30, P)
    torch.testing.assert_close(V @ V.T, torch.eye(30, dtype=F64), rtol=0, atol=1e-13)
    diag, off = rec.coefficients()
    assert diag.shape == off.shape == (1, rec.steps, block, block)
    # Q A Qᵀ = T, computed densely from the basis the recurrence kept.
    np.testing.assert_allclose((V @ A @ V.T).numpy(), _tridiagonal(diag, off), rtol=0, atol=1e-12)
    # Each G_j is lower triangular (row-wise Gram–Schmidt of the remainder).
    assert np.allclose(np.triu(off[0], 1), 0.0)
    assert rec.num_products == 30 and rec.operator.num_products == 30
    assert rec.asymmetry < 1e-12  # a symmetric matrix: the projections agree with the transposes


def test_ritz_values_approach_the_extremes_and_stay_inside_the_spectrum() -> None:
    values = _spectrum()
    A, _ = _matrix(values)
    exact = eigvalsh(A)
    rec = _recurrence(A, _unit_rows(1, 1, P, 2), capacity=P)
    errors = []
    for m in (5, 10, 20, 30):
        _run(rec, m - rec.steps)
        theta = np.linalg.eigvalsh(_tridiagonal(*rec.coefficients()))
        # Cauchy interlacing: the projected matrix's eigenvalues lie inside A's spectrum.
        assert theta[0] >= exact[0] - 1e-12 and theta[-1] <= exact[-1] + 1e-12
        errors.append((exact[-1] - theta[-1], theta[0] - exact[0]))
    top, bottom = zip(*errors)
    assert all(a >= b - 1e-13 for a, b in zip(top, top[1:]))  # monotone in the subspace
    assert all(a >= b - 1e-13 for a, b in zip(bottom, bottom[1:]))
    assert top[-1] < 1e-10 and bottom[-1] < 1e-10  # outliers 2 and 3 away from the bulk


def test_the_three_term_recurrence_gives_the_same_coefficients_and_extremes() -> None:
    A, _ = _matrix(_spectrum())
    exact = eigvalsh(A)
    start = _unit_rows(1, 1, P, 3)
    full = _run(_recurrence(A, start, capacity=40))
    short = _run(_recurrence(A, start, capacity=None), 40)
    assert short.steps == 40 and not short.full
    with pytest.raises(RuntimeError, match="keeps no basis"):
        short.rows(0)
    d_full, o_full = full.coefficients()
    d_short, o_short = short.coefficients()
    # Equal in exact arithmetic; the first steps agree to rounding before orthogonality is lost.
    np.testing.assert_allclose(d_short[0, :10], d_full[0, :10], rtol=0, atol=1e-10)
    np.testing.assert_allclose(o_short[0, :10], o_full[0, :10], rtol=0, atol=1e-10)
    theta = np.linalg.eigvalsh(_tridiagonal(d_short, o_short))
    assert abs(theta[-1] - exact[-1]) < 1e-9 and abs(theta[0] - exact[0]) < 1e-9


def test_chains_are_independent_and_each_costs_its_products() -> None:
    A, _ = _matrix(_spectrum())
    starts = _unit_rows(3, 2, P, 4)
    together = _run(_recurrence(A, starts, capacity=16))
    assert together.num_products == 3 * 2 * 8
    d_all, o_all = together.coefficients()
    for c in range(3):
        alone = _run(_recurrence(A, starts[c : c + 1], capacity=16))
        d, o = alone.coefficients()
        np.testing.assert_allclose(d_all[c], d[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(o_all[c], o[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(together.rows(c), alone.rows(0), rtol=0, atol=1e-12)


# -- thick restart --------------------------------------------------------------------------------

def test_a_restart_keeps_the_locked_rows_orthogonal_and_records_their_coupling() -> None:
    A, _ = _matrix(_spectrum())
    rec = _run(_recurrence(A, _unit_rows(1, 1, P, 5), capacity=20))
    theta, Y = np.linalg.eigh(_tridiagonal(*rec.coefficients()))
    keep = [17, 18, 19]  # the three largest Ritz vectors
    locked = torch.from_numpy(Y[:, keep]).T @ rec.rows(0)
    residual_block = rec.next_block()[0].clone()
    rec.restart(locked, residual_block)
    assert rec.num_locked == 3 and rec.steps == 0 and not rec.full
    _run(rec)
    assert rec.steps == 17
    V = rec.rows(0)
    assert V.shape == (20, P)
    torch.testing.assert_close(V[:3], locked, rtol=0, atol=0)
    torch.testing.assert_close(V @ V.T, torch.eye(20, dtype=F64), rtol=0, atol=1e-13)
    # The Ritz vectors stay Ritz vectors: V A Vᵀ is diag(θ) on them, coupled only to X_1.
    projected = (V @ A @ V.T).numpy()
    np.testing.assert_allclose(projected[:3, :3], np.diag(theta[keep]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(projected[:3, 4:], 0.0, rtol=0, atol=1e-12)
    assert rec.coupling is not None and rec.coupling.shape == (1, 3, 1)
    np.testing.assert_allclose(rec.coupling[0].numpy(), projected[:3, 3:4], rtol=0, atol=1e-12)
    np.testing.assert_allclose(projected[3:, 3:], _tridiagonal(*rec.coefficients()), rtol=0,
                               atol=1e-12)
    # Courant–Fischer: the new subspace holds the old top Ritz vector, so no worse a top value.
    new_top = np.linalg.eigvalsh(projected)[-1]
    assert new_top >= theta[-1] - 1e-12
    assert new_top <= float(eigvalsh(A)[-1]) + 1e-12


def test_restart_and_construction_refuse_what_they_cannot_hold() -> None:
    A, _ = _matrix(_spectrum())
    op = CurvatureOperator.from_matrix(A)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="start must have shape"):
        LanczosRecurrence(op, torch.zeros(1, P), capacity=10, generator=g)
    with pytest.raises(ValueError, match="start must have shape"):
        LanczosRecurrence(op, torch.zeros(1, 1, P + 1), capacity=10, generator=g)
    locked = _unit_rows(1, 4, P, 6)[0]
    with pytest.raises(ValueError, match="cannot hold 4 locked rows and a block of 2"):
        LanczosRecurrence(op, _unit_rows(1, 2, P, 7), capacity=5, locked=locked, generator=g)
    with pytest.raises(ValueError, match="locked rows need a basis capacity"):
        LanczosRecurrence(op, _unit_rows(1, 1, P, 7), capacity=None, locked=locked, generator=g)
    two = _run(_recurrence(A, _unit_rows(2, 1, P, 8), capacity=10), 3)
    with pytest.raises(RuntimeError, match="one chain and a basis capacity"):
        two.restart(locked, two.next_block()[0])
    one = _run(_recurrence(A, _unit_rows(1, 1, P, 8), capacity=6), 3)
    with pytest.raises(ValueError, match="cannot hold 6 locked rows"):
        one.restart(_unit_rows(1, 6, P, 9)[0], one.next_block()[0])


# -- breakdowns and non-finite products ----------------------------------------------------------

def _invariant_start(Q: torch.Tensor, columns: list[int], seed: int) -> torch.Tensor:
    """A unit start row in the span of the eigenvectors ``Q[:, columns]`` (an invariant
    subspace: the Krylov space has dimension ``len(columns)``)."""
    g = torch.Generator().manual_seed(seed)
    v = Q[:, columns] @ torch.randn(len(columns), dtype=F64, generator=g)
    return (v / v.norm()).reshape(1, 1, -1)


def test_a_breakdown_on_an_invariant_subspace_is_found_and_truncated_exactly() -> None:
    values = _spectrum()
    A, Q = _matrix(values)
    inside = [0, 5, 9]
    rec = _run(_recurrence(A, _invariant_start(Q, inside, 10), capacity=12))
    diag, _ = rec.coefficients()
    assert rec.breakdown == [2]  # the third remainder vanishes: the space had 3 dimensions
    assert rec.truncate_at_breakdown()
    assert rec.steps == 3 and rec.num_products == 12  # the discarded products stay counted
    diag, off = rec.coefficients()
    assert off[0, -1, 0, 0] == 0.0
    theta = np.linalg.eigvalsh(_tridiagonal(diag, off))
    np.testing.assert_allclose(theta, np.sort(values[inside].numpy()), rtol=0, atol=1e-12)
    # Continue with a random unit row orthogonal to the basis: the basis stays orthonormal and
    # the Krylov space now reaches the rest of the spectrum (the top eigenvalue 5 is not inside).
    rec.continue_after_breakdown()
    nxt = rec.next_block()[0, 0]
    assert abs(float(nxt.norm()) - 1.0) < 1e-14
    assert float((rec.rows(0) @ nxt).abs().max()) < 1e-14
    _run(rec)
    V = rec.rows(0)
    assert V.shape == (12, P)
    torch.testing.assert_close(V @ V.T, torch.eye(12, dtype=F64), rtol=0, atol=1e-12)
    np.testing.assert_allclose((V @ A @ V.T).numpy(), _tridiagonal(*rec.coefficients()), rtol=0,
                               atol=1e-12)
    assert rec.breakdown == [None]


def test_breakdowns_are_per_chain_and_not_claimed_without_one() -> None:
    A, Q = _matrix(_spectrum())
    generic = _unit_rows(1, 1, P, 11)
    starts = torch.cat([_invariant_start(Q, [1, 2], 12), generic])
    rec = _run(_recurrence(A, starts, capacity=None), 6)
    rec.coefficients()
    assert rec.breakdown == [1, None]
    assert not rec.truncate_at_breakdown()  # several chains: nothing to truncate
    single = _run(_recurrence(A, generic, capacity=10))
    assert not single.truncate_at_breakdown() and single.steps == 10
    with pytest.raises(RuntimeError, match="needs one chain, b = 1 and a capacity"):
        _recurrence(A, _unit_rows(1, 2, P, 0), capacity=10).continue_after_breakdown()


def test_a_vanished_row_of_a_block_is_replaced_by_an_orthogonal_one() -> None:
    values = _spectrum()
    A, Q = _matrix(values)
    # Two start rows in a 3-dimensional invariant subspace: the first remainder has rank 1.
    g = torch.Generator().manual_seed(13)
    start = torch.linalg.qr(Q[:, [0, 4, 7]] @ torch.randn(3, 2, dtype=F64, generator=g))[0]
    rec = _run(_recurrence(A, start.T.reshape(1, 2, P).contiguous(), capacity=12))
    diag, off = rec.coefficients()
    assert off[0, 0, 1, 1] == 0.0 and abs(off[0, 0, 0, 0]) > 1e-3  # second row replaced
    V = rec.rows(0)
    torch.testing.assert_close(V @ V.T, torch.eye(12, dtype=F64), rtol=0, atol=1e-12)
    T = _tridiagonal(diag, off)
    np.testing.assert_allclose((V @ A @ V.T).numpy(), T, rtol=0, atol=1e-12)
    # The invariant subspace's three eigenvalues are exact Ritz values.
    theta = np.linalg.eigvalsh(T)
    for lam in values[[0, 4, 7]].numpy():
        assert np.min(np.abs(theta - lam)) < 1e-12


def test_an_asymmetric_operator_is_measured() -> None:
    A, _ = _matrix(_spectrum())
    g = torch.Generator().manual_seed(14)
    S = torch.randn(P, P, dtype=F64, generator=g)
    skew = 1e-3 * (S - S.T)
    op = CurvatureOperator.from_function(lambda V: V @ (A + skew), P, dtype=F64)
    rec = LanczosRecurrence(op, _unit_rows(1, 1, P, 15), capacity=10,
                            generator=torch.Generator().manual_seed(0))
    _run(rec)
    assert rec.asymmetry > 1e-5
    sym = _run(_recurrence(A, _unit_rows(1, 1, P, 15), capacity=10))
    assert sym.asymmetry < 1e-12


def test_a_non_finite_product_is_an_error_when_the_coefficients_are_read() -> None:
    A, _ = _matrix(_spectrum())
    calls = []

    def matmat(V: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        out = V @ A
        return out * float("nan") if len(calls) == 3 else out

    op = CurvatureOperator.from_function(matmat, P, dtype=F64)
    rec = LanczosRecurrence(op, _unit_rows(1, 1, P, 16), capacity=10,
                            generator=torch.Generator().manual_seed(0))
    _run(rec, 2)
    rec.coefficients()  # finite so far
    _run(rec, 2)
    with pytest.raises(NonFiniteCurvatureError, match="non-finite coefficient"):
        rec.coefficients()


# -- random_rows ----------------------------------------------------------------------------------

def test_random_rows_are_seeded_on_the_cpu_in_the_precision_of_like() -> None:
    state = torch.get_rng_state()
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        like = torch.zeros(1, dtype=dtype)
        a = random_rows(3, 7, torch.Generator().manual_seed(5), like)
        b = random_rows(3, 7, torch.Generator().manual_seed(5), like)
        assert a.shape == (3, 7) and a.dtype == dtype and a.device == like.device
        assert torch.equal(a, b)
        assert float(a.float().std()) > 0.3  # Gaussian, not a constant
    # Half precisions are drawn in float32 and rounded.
    f32 = random_rows(3, 7, torch.Generator().manual_seed(5), torch.zeros(1))
    bf16 = random_rows(3, 7, torch.Generator().manual_seed(5), torch.zeros(1, dtype=torch.bfloat16))
    assert torch.equal(bf16, f32.to(torch.bfloat16))
    # The generator advances; the global stream is never touched.
    g = torch.Generator().manual_seed(5)
    assert not torch.equal(random_rows(3, 7, g, f32), random_rows(3, 7, g, f32))
    assert torch.equal(torch.get_rng_state(), state)

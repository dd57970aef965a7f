"""Ritz pairs, residuals and error bounds (engine/ritz.py) against dense references.

The Lanczos basis is built with the kernel, then every quantity ``ritz`` reads from the
coefficients is recomputed densely from the basis and the matrix: Ritz values are the
eigenvalues of ``V A Vᵀ``, residual norms are ``‖A x - θ x‖`` of the Ritz vectors ``x``, the
residual and Kato–Temple bounds hold against ``torch.linalg.eigvalsh`` of the matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lr_batch_callback import CurvatureOperator
from lr_batch_callback.engine.krylov import LanczosRecurrence
from lr_batch_callback.engine.ritz import (
    complete,
    error_bounds,
    floor_bounds,
    ritz,
    thick_restart,
    tridiagonal_eigh,
    wanted_indices,
)
from tests.reference import eigvalsh

P = 80
F64 = torch.float64
NONE = np.zeros(0)


def _matrix(values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(values.numel(), values.numel(), dtype=F64, generator=g))[0]
    A = Q @ torch.diag(values.to(F64)) @ Q.T
    return (A + A.T) / 2


def _spectrum(top: list[float], seed: int = 0, dim: int = P) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    bulk = torch.rand(dim - len(top), dtype=F64, generator=g) * 2 - 1
    return torch.cat([torch.tensor(top, dtype=F64), bulk])


def _recurrence(A: torch.Tensor, block: int = 1, capacity: int = 40, seed: int = 0
                ) -> LanczosRecurrence:
    g = torch.Generator().manual_seed(seed)
    start = torch.linalg.qr(torch.randn(A.shape[0], block, dtype=F64, generator=g))[0]
    return LanczosRecurrence(CurvatureOperator.from_matrix(A), start.T.reshape(1, block, -1),
                             capacity=capacity, generator=torch.Generator().manual_seed(seed + 1))


def _steps(rec: LanczosRecurrence, count: int) -> LanczosRecurrence:
    for _ in range(count):
        rec.step()
    return rec


def _dense_ritz(A: torch.Tensor, V: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values, vectors (rows, in the full space) and residual norms from the basis rows
    ``V`` and the matrix alone."""
    theta, S = torch.linalg.eigh(V @ A @ V.T)
    X = S.T @ V
    residual = torch.linalg.vector_norm(X @ A - theta[:, None] * X, dim=1)
    return theta.numpy(), X.numpy(), residual.numpy()


# -- tridiagonal_eigh, wanted_indices -------------------------------------------------------------

def test_tridiagonal_eigh_matches_a_dense_eigendecomposition() -> None:
    g = np.random.default_rng(0)
    alpha, beta = g.normal(size=12).tolist(), g.normal(size=11).tolist()
    T = torch.diag(torch.tensor(alpha, dtype=F64))
    T += torch.diag(torch.tensor(beta, dtype=F64), 1) + torch.diag(torch.tensor(beta, dtype=F64), -1)
    theta, S = tridiagonal_eigh(alpha, beta + [123.0])  # an extra β (the next coupling) is ignored
    assert theta.dtype == S.dtype == F64 and S.shape == (12, 12)
    torch.testing.assert_close(theta, eigvalsh(T), rtol=0, atol=1e-12)
    torch.testing.assert_close(T @ S, S * theta, rtol=0, atol=1e-12)
    one, vec = tridiagonal_eigh([2.5], [])
    assert one.tolist() == [2.5] and vec.tolist() == [[1.0]]


def test_wanted_indices_pick_the_ends_largest_first() -> None:
    assert wanted_indices(10, 3, "largest") == [9, 8, 7]
    assert wanted_indices(10, 2, "smallest") == [1, 0]
    assert wanted_indices(10, 2, "both") == [9, 8, 1, 0]
    assert wanted_indices(3, 2, "both") == [2, 1, 0]  # the ends overlap: each index once
    assert wanted_indices(2, 5, "largest") == [1, 0]


# -- ritz: values, residuals, the projected matrix ------------------------------------------------

@pytest.mark.parametrize("block", [1, 2])
def test_ritz_values_and_residuals_equal_the_dense_ones_of_the_basis(block: int) -> None:
    A = _matrix(_spectrum([6.0, 4.0, -5.0]))
    rec = _steps(_recurrence(A, block), 12 // block)
    theta, Y, residual = ritz(rec, NONE)
    dense_theta, dense_X, dense_residual = _dense_ritz(A, rec.rows(0))
    assert theta.shape == residual.shape == (12,) and Y.shape == (12, 12)
    np.testing.assert_allclose(theta, dense_theta, rtol=0, atol=1e-12)
    np.testing.assert_allclose(residual, dense_residual, rtol=0, atol=1e-11)
    # The eigenvectors of T map to the Ritz vectors (up to sign).
    X = Y.T @ rec.rows(0).numpy()
    np.testing.assert_allclose(np.abs(np.sum(X * dense_X, axis=1)), 1.0, rtol=0, atol=1e-9)


def test_every_ritz_value_has_an_eigenvalue_within_its_residual() -> None:
    values = _spectrum([3.0, 2.9, 2.0, -3.0], seed=2)
    A = _matrix(values, seed=2)
    exact = eigvalsh(A).numpy()
    rec = _recurrence(A, seed=3)
    for m in (3, 6, 10, 20):
        _steps(rec, m - rec.steps)
        theta, _, residual = ritz(rec, NONE)
        distance = np.min(np.abs(theta[:, None] - exact[None, :]), axis=1)
        assert np.all(distance <= residual * (1 + 1e-9) + 1e-13), m


def test_the_kato_temple_bound_holds_with_the_true_gap() -> None:
    """|θ - λ| ≤ r²/δ, δ the distance from θ to the rest of the spectrum, while r < δ."""
    values = _spectrum([4.0, 2.5, -4.0], seed=4)
    A = _matrix(values, seed=4)
    exact = eigvalsh(A).numpy()
    rec = _recurrence(A, seed=5)
    checked = 0
    for m in range(2, 30):
        rec.step()
        theta, _, residual = ritz(rec, NONE)
        for i in (theta.size - 1, 0):  # the two ends
            nearest = int(np.argmin(np.abs(exact - theta[i])))
            gap = float(np.min(np.abs(np.delete(exact, nearest) - theta[i])))
            r = float(residual[i])
            if r < gap:
                error = abs(theta[i] - exact[nearest])
                assert error <= r * r / gap * (1 + 1e-6) + 1e-13, (m, i, error, r, gap)
                checked += 1
    assert checked > 30
    # ... and at the end the top value is far more accurate than its residual alone says.
    assert abs(theta[-1] - exact[-1]) < 1e-3 * residual[-1] or residual[-1] < 1e-12


def test_error_bounds_bound_the_true_error_of_the_wanted_values() -> None:
    checked = 0
    for seed, top in enumerate(([5.0], [5.0, 4.0], [3.0, 2.0, 1.5], [1.2, 1.1])):
        A = _matrix(_spectrum(top + [-3.0], seed=10 + seed), seed=10 + seed)
        exact = eigvalsh(A).numpy()
        rec = _recurrence(A, seed=20 + seed, capacity=P)
        for m in range(4, 40, 3):
            _steps(rec, m - rec.steps)
            theta, _, residual = ritz(rec, NONE)
            wanted = wanted_indices(theta.size, 1, "both")
            bounds = error_bounds(theta, residual, wanted)
            # Never more than the residual bound, never less than a fifth of it.
            assert np.all(bounds <= residual[wanted] + 1e-15)
            assert np.all(bounds >= residual[wanted] / 5 - 1e-15)
            # The bound is on the distance to the nearest eigenvalue (an eigenvalue no Ritz value
            # has seen yet, e.g. the top one of an unlucky start, is beyond any Krylov method).
            for bound, i in zip(bounds, wanted):
                error = np.min(np.abs(exact - theta[i]))
                assert error <= bound * (1 + 1e-9) + 1e-13, (top, m, i, error, bound)
                checked += 1
    assert checked == 4 * 12 * 2


def test_floor_bounds_use_a_known_lower_bound_for_the_smallest_values() -> None:
    # A positive semi-definite matrix with a 10-dimensional null space (a GGN-like operator).
    values = torch.cat([torch.zeros(10, dtype=F64), torch.linspace(0.1, 3.0, P - 10, dtype=F64)])
    A = _matrix(values, seed=6)
    rec = _steps(_recurrence(A, seed=7, capacity=P), 25)
    theta, _, residual = ritz(rec, NONE)
    wanted = wanted_indices(theta.size, 1, "both")
    bounds = error_bounds(theta, residual, wanted)
    floored = floor_bounds(theta, bounds, wanted, 1, "both", 0.0, 1e-12)
    smallest = wanted.index(0)
    assert floored[smallest] == pytest.approx(min(bounds[smallest], max(theta[0], 0.0)))
    assert abs(theta[0] - 0.0) <= floored[smallest] + 1e-15  # the true λ_min is 0
    assert floored[wanted.index(theta.size - 1)] == bounds[wanted.index(theta.size - 1)]
    # No floor for "largest", none without a bound, none when a Ritz value is below the floor.
    assert floor_bounds(theta, bounds, wanted, 1, "largest", 0.0, 1e-12) is bounds
    assert floor_bounds(theta, bounds, wanted, 1, "both", None, 1e-12) is bounds
    assert floor_bounds(theta, bounds, wanted, 1, "both", 0.5, 1e-12) is bounds


# -- thick restart and completion -----------------------------------------------------------------

def test_a_thick_restart_keeps_the_wanted_ritz_pairs_and_improves_them() -> None:
    A = _matrix(_spectrum([5.0, 4.5, -3.0], seed=8), seed=8)
    exact = eigvalsh(A).numpy()
    rec = _steps(_recurrence(A, seed=9, capacity=20), 20)
    theta, Y, residual = ritz(rec, NONE)
    kept = thick_restart(rec, theta, Y, 2, "largest", capacity=20)
    assert kept.size == 10  # capacity // 2 of the largest
    np.testing.assert_allclose(kept, theta[-10:], rtol=0, atol=0)
    assert rec.num_locked == 10 and rec.steps == 0
    # The locked rows are the Ritz vectors: V A Vᵀ is diag(kept) on them.
    L = rec.rows(0)
    np.testing.assert_allclose((L @ A @ L.T).numpy(), np.diag(kept), rtol=0, atol=1e-11)
    _steps(rec, 10)
    theta2, _, residual2 = ritz(rec, kept)
    dense_theta, _, dense_residual = _dense_ritz(A, rec.rows(0))
    np.testing.assert_allclose(theta2, dense_theta, rtol=0, atol=1e-11)
    np.testing.assert_allclose(residual2, dense_residual, rtol=0, atol=1e-10)
    assert theta2[-1] >= theta[-1] - 1e-12 and theta2[-2] >= theta[-2] - 1e-12  # Courant–Fischer
    assert exact[-1] - theta2[-1] <= exact[-1] - theta[-1] + 1e-12
    assert residual2[-1] < residual[-1]


def test_complete_gives_the_exact_spectrum_when_the_basis_lacks_less_than_a_block() -> None:
    dim, block = 20, 3
    values = _spectrum([2.0, 1.5], seed=11, dim=dim)
    A = _matrix(values, seed=11)
    rec = _steps(_recurrence(A, block, capacity=dim, seed=12), 6)
    assert rec.rows(0).shape == (18, dim) and rec.full  # 2 dimensions missing, < a block
    theta, Y, residual, C = complete(rec, NONE, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(theta, eigvalsh(A).numpy(), rtol=0, atol=1e-12)
    assert np.all(residual == 0.0) and Y.shape == (dim, dim)
    assert C.shape == (2, dim)
    torch.testing.assert_close(C @ C.T, torch.eye(2, dtype=F64), rtol=0, atol=1e-13)
    assert float((C @ rec.rows(0).T).abs().max()) < 1e-13

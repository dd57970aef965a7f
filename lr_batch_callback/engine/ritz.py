r"""Ritz pairs of a Krylov decomposition: the projected matrix, error bounds, restarts.

The eigensolver (:mod:`~lr_batch_callback.engine.lanczos`) reads, from the kernel's
:class:`~lr_batch_callback.engine.krylov.LanczosRecurrence`, the projected matrix :math:`T`
(block tridiagonal, bordered by the Ritz values kept at thick restarts), its Ritz pairs and their
residual norms; bounds each wanted eigenvalue's error; compresses the basis at a thick restart;
and finishes exactly when the basis lacks fewer than a block of dimensions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lr_batch_callback.engine.krylov import LanczosRecurrence, random_rows

__all__ = [
    "complete", "error_bounds", "floor_bounds", "ritz", "thick_restart", "tridiagonal_eigh",
    "wanted_indices"]

# An eigenvalue next to a neighbour no Ritz value has resolved yet can be off by up to its
# residual: the bound never claims less than residual / 5 (measured on built spectra with
# clusters and pairs: never above 5x the tolerance; residual/10 let 4-clusters reach 13x).
_UNRESOLVED = 5.0


def tridiagonal_eigh(alpha: list[float], beta: list[float]) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the symmetric tridiagonal (diagonal ``alpha``, off-diagonal ``beta``), ascending.

    Computed in float64 with NumPy's LAPACK: torch's CPU ``eigh`` on small matrices can spend
    a long time starting threads on a busy machine.
    """
    m = len(alpha)
    T = np.diag(np.asarray(alpha, dtype=np.float64))
    if m > 1:
        off = np.asarray(beta[: m - 1], dtype=np.float64)
        T += np.diag(off, 1) + np.diag(off, -1)
    theta, s = np.linalg.eigh(T)
    return torch.from_numpy(theta), torch.from_numpy(s)


def error_bounds(theta: np.ndarray, residuals: np.ndarray, indices: list[int]) -> np.ndarray:
    r"""Eigenvalue error bounds of the Ritz values ``theta[indices]``.

    :mod:`~lr_batch_callback.engine.lanczos` explains them:
    :math:`\max(\min(r_i, r_i^2/\delta_i),\ r_i/5)`, with :math:`\delta_i` trusted only when it
    exceeds :math:`r_i`.

    Example:
        >>> theta = np.array([0.0, 1.0, 2.0]); r = np.array([0.5, 0.1, 1e-3])
        >>> error_bounds(theta, r, [2])  # gap 2 - 1 - 0.1 = 0.9: r²/gap = 1.1e-6 < r/5
        array([0.0002])
    """
    out = np.empty(len(indices))
    for n, i in enumerate(indices):
        others = np.delete(np.arange(theta.size), i)
        # No other Ritz value: nothing is known of the gap, only the residual bound holds.
        gap = float(np.min(np.abs(theta[i] - theta[others]) - residuals[others])) if others.size \
            else 0.0
        r = float(residuals[i])
        quadratic = min(r, r * r / gap) if gap > r else r
        out[n] = max(quadratic, r / _UNRESOLVED)
    return out

def floor_bounds(theta: np.ndarray, bounds: np.ndarray, indices: list[int], k: int, which: str,
                 lower: float | None, rounding: float) -> np.ndarray:
    r"""Tighten the bounds of the ``k`` smallest Ritz values with a known spectral lower bound.

    Rayleigh–Ritz on any subspace gives :math:`\theta_{(j)} \ge \lambda_{(j)} \ge \ell` for
    the :math:`j`-th smallest values (Courant–Fischer), so
    :math:`|\theta_{(j)} - \lambda_{(j)}| \le \theta_{(j)} - \ell`. For a positive
    semi-definite operator with a null space (a GGN) that makes a zero eigenvalue converge, where
    a residual bound over a cluster at 0 would not. Not applied when a Ritz value lies below
    ``lower - rounding``: then ``lower`` is not a bound of this operator.

    Example:
        >>> theta = np.array([1e-9, 0.5, 2.0])
        >>> floor_bounds(theta, np.array([0.1, 0.3]), [2, 0], 1, "both", 0.0, 1e-12)
        array([1.e-01, 1.e-09])
    """
    if lower is None or which == "largest" or not theta.size or theta[0] < lower - rounding:
        return bounds
    out = bounds.copy()
    for n, i in enumerate(indices):
        if i < k:
            out[n] = min(out[n], max(float(theta[i]) - lower, 0.0))
    floored: np.ndarray = out
    return floored


def wanted_indices(n: int, k: int, which: str) -> list[int]:
    """Indices into ascending Ritz values for the wanted end(s), largest value first."""
    top = set(range(max(n - k, 0), n))
    bottom = set(range(min(k, n)))
    chosen = top if which == "largest" else bottom if which == "smallest" else top | bottom
    return sorted(chosen, reverse=True)

def ritz(rec: LanczosRecurrence, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values (ascending), vectors in the basis ``[kept; blocks]`` and residual norms."""
    diag, off = rec.coefficients()
    m, b, n_kept = rec.steps, rec.block, kept.size
    size = n_kept + m * b
    T = np.zeros((size, size))
    T[np.arange(n_kept), np.arange(n_kept)] = kept
    if n_kept and m:
        assert rec.coupling is not None
        S = rec.coupling[0].cpu().numpy()
        T[:n_kept, n_kept : n_kept + b] = S
        T[n_kept : n_kept + b, :n_kept] = S.T
    for j in range(m):
        lo = n_kept + j * b
        T[lo : lo + b, lo : lo + b] = diag[0, j]
        if j + 1 < m:
            # T[j, j+1] = X_j A X_{j+1}^T = G_j (lower triangular, see the kernel).
            T[lo : lo + b, lo + b : lo + 2 * b] = off[0, j]
            T[lo + b : lo + 2 * b, lo : lo + b] = off[0, j].T
    theta, Y = np.linalg.eigh(T)
    last = Y[size - b :, :] if m else np.zeros((b, size))
    residual = np.linalg.norm(off[0, m - 1].T @ last, axis=0) if m else np.zeros(size)
    return theta, Y, residual


def complete(rec: LanczosRecurrence, kept: np.ndarray, generator: torch.Generator
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Tensor]:
    """Exact eigenpairs once the basis lacks fewer than a block of dimensions.

    They come from the projection on the basis ``V`` and its orthonormal complement ``C``
    (``r < b`` rows, ``r`` products).

    ``V A Vᵀ = T`` is known; with ``W = C A`` (symmetric ``A``), ``C A Vᵀ = W Vᵀ`` and
    ``C A Cᵀ = W Cᵀ``.
    """
    V = rec.rows(0)
    r = rec.operator.dim - V.shape[0]
    C = random_rows(r, rec.operator.dim, generator, V)
    for _ in range(2):
        C = C - (C @ V.T) @ V
    C = torch.linalg.qr(C.T.to(torch.float64))[0].T.to(V)
    W = rec.operator.matmat(C)
    theta_T, Y_T, _ = ritz(rec, kept)
    T = (Y_T * theta_T) @ Y_T.T
    cross = (W @ V.T).to(torch.float64).cpu().numpy()
    corner = (W @ C.T).to(torch.float64).cpu().numpy()
    full = np.block([[T, cross.T], [cross, (corner + corner.T) / 2]])
    theta, Y = np.linalg.eigh(full)
    return theta, Y, np.zeros_like(theta), C


def thick_restart(rec: LanczosRecurrence, theta: np.ndarray, Y: np.ndarray, k: int, which: str,
                   capacity: int) -> np.ndarray:
    """Keep the wanted Ritz vectors and their neighbours; continue from the residual block."""
    b = rec.block
    size = theta.size
    keep_count = min(capacity - b, max(2 * k + b if which == "both" else k + b, capacity // 2))
    if which == "largest":
        keep = list(range(size - keep_count, size))
    elif which == "smallest":
        keep = list(range(keep_count))
    else:
        top = (keep_count + 1) // 2
        keep = sorted(set(range(keep_count - top)) | set(range(size - top, size)))
    coeffs = torch.from_numpy(np.ascontiguousarray(Y[:, keep])).to(rec.rows(0))
    locked = coeffs.T @ rec.rows(0)
    rec.restart(locked, rec.next_block()[0])
    kept: np.ndarray = theta[keep].copy()
    return kept

r"""Lanczos for the extremal eigenvalues of a symmetric operator, with a Ritz-residual stop.

After :math:`m` steps from a unit vector :math:`q_1`, Lanczos has an orthonormal basis
:math:`Q_m` of the Krylov space :math:`\mathcal K_m(A, q_1)` and the tridiagonal
:math:`T_m = Q_m^\top A Q_m` (diagonal :math:`\alpha`, off-diagonal :math:`\beta`). The eigenpairs
:math:`(\theta_i, s_i)` of :math:`T_m` give Ritz pairs :math:`(\theta_i, Q_m s_i)` whose residual
norm is exactly :math:`\|A Q_m s_i - \theta_i Q_m s_i\| = |\beta_m s_{m,i}|`, and an eigenvalue of
:math:`A` lies within that distance of :math:`\theta_i`. The run stops when every wanted Ritz value
satisfies

.. math:: |\beta_m s_{m,i}| \le \mathrm{tol}\cdot\max(|\theta_i|,\ 10^{-3}\max_j|\theta_j|),

i.e. a relative tolerance, floored at a thousandth of the spectral radius so that eigenvalues
near zero (the bulk of a Hessian) can converge at all.

Numerics: every new vector is orthogonalised against the whole basis twice (classical
Gram-Schmidt, "twice is enough"), so no spurious copies of converged eigenvalues appear; the
coefficients are accumulated in float64 and :math:`T_m` is solved with float64 ``eigh``. The
basis stays on the operator's device and dtype; the host only synchronises for the stopping test,
every ``check_every`` steps. An invariant subspace (:math:`\beta_j \approx 0`, e.g. a warm start
that is already an eigenvector) is continued with a fresh random vector orthogonal to the basis.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lr_batch_callback.operators import CurvatureOperator, NonFiniteCurvatureError

__all__ = ["LanczosResult", "lanczos", "default_max_iter", "tridiagonal_eigh", "WHICH"]

Which = Literal["largest", "smallest", "both"]
WHICH = ("largest", "smallest", "both")
_FLOOR = 1e-3  # fraction of the spectral radius below which tolerances become absolute


@dataclass(frozen=True)
class LanczosResult:
    """Extremal eigenvalues found by Lanczos.

    Attributes:
        eigenvalues: wanted Ritz values, float64 on CPU, largest algebraic first.
        eigenvectors: matching unit Ritz vectors as rows ``(len(eigenvalues), P)`` on the
            operator's device and dtype, or ``None`` unless asked for.
        residuals: Ritz residual norms :math:`|\\beta_m s_{m,i}|`, bounds on each eigenvalue's error.
        converged: whether every wanted Ritz value met the tolerance.
        num_iterations: Lanczos steps taken (the size of the Krylov space).
        num_products: operator-vector products used (equal to ``num_iterations`` here).
        ritz_values: every Ritz value of the final tridiagonal, largest first.
        alpha: the tridiagonal's diagonal (float64).
        beta: its off-diagonal (float64, ``num_iterations - 1`` entries).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    converged: bool
    num_iterations: int
    num_products: int
    ritz_values: Tensor
    alpha: Tensor
    beta: Tensor


def default_max_iter(dim: int, k: int) -> int:
    """Default step cap: enough for hard spectra, never the 2k-step trap, never above ``dim``."""
    return min(dim, max(100, 10 * k))


def _validate(k: int, which: str, tol: float, max_iter: int | None, dim: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    wanted = 2 * k if which == "both" else k
    if wanted > dim:
        raise ValueError(
            f"k={k} asks for {wanted} eigenvalues but the operator has only {dim} dimensions "
            f"(parameters). Use k <= {dim // 2 if which == 'both' else dim}."
        )
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}.")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}; e.g. tol=1e-4.")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int)
                                 or max_iter < wanted):
        raise ValueError(
            f"max_iter must be an integer >= the number of wanted eigenvalues ({wanted}), got "
            f"{max_iter!r}. Leave it as None for the default."
        )


def _wanted(n: int, k: int, which: str) -> list[int]:
    """Indices into ascending Ritz values for the wanted end(s), largest value first."""
    top = set(range(max(n - k, 0), n))
    bottom = set(range(min(k, n)))
    chosen = top if which == "largest" else bottom if which == "smallest" else top | bottom
    return sorted(chosen, reverse=True)


def tridiagonal_eigh(alpha: list[float], beta: list[float]) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the tridiagonal, ascending.

    Solved with NumPy's LAPACK: torch's CPU ``eigh`` on small matrices can spend milliseconds to
    seconds in thread start-up on a busy machine, and this runs at every stopping test.
    """
    m = len(alpha)
    T = np.diag(np.asarray(alpha, dtype=np.float64))
    if m > 1:
        off = np.asarray(beta[: m - 1], dtype=np.float64)
        T += np.diag(off, 1) + np.diag(off, -1)
    theta, s = np.linalg.eigh(T)
    return torch.from_numpy(theta), torch.from_numpy(s)


def _orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    """Remove from ``w`` its components along the rows of ``basis``, twice (CGS2)."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _random_unit(dim: int, generator: torch.Generator, like: Tensor) -> Tensor:
    # Drawn on the CPU so that the same seed gives the same vector on every device and rank.
    v = torch.randn(dim, generator=generator, dtype=torch.float64)
    return (v / v.norm()).to(device=like.device, dtype=like.dtype)


def lanczos(
    operator: CurvatureOperator,
    k: int = 1,
    *,
    which: Which = "largest",
    tol: float = 1e-4,
    max_iter: int | None = None,
    v0: Tensor | None = None,
    seed: int | None = None,
    check_every: int | None = None,
    return_eigenvectors: bool = False,
    warn_unconverged: bool = True,
) -> LanczosResult:
    """Extremal eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    Args:
        operator: a symmetric :class:`~lr_batch_callback.operators.CurvatureOperator` (anything with
            ``dim``, ``dtype``, ``device``, ``matvec`` and ``broadcast_``).
        k: how many eigenvalues at each wanted end.
        which: ``"largest"`` (algebraic), ``"smallest"`` (most negative) or ``"both"``.
        tol: relative Ritz-residual tolerance (see the module docstring).
        max_iter: hard cap on steps (products); default :func:`default_max_iter`.
        v0: start vector, e.g. the previous top Ritz vector (a warm start); random otherwise.
        seed: seed of the random start and restart vectors (``None``: fresh randomness; under
            ``torch.distributed`` rank 0's choice is broadcast).
        check_every: steps between stopping tests (host synchronisations); default 1 on CPU,
            4 on accelerators.
        return_eigenvectors: also return the wanted Ritz vectors.
        warn_unconverged: emit a ``RuntimeWarning`` when the cap is hit before ``tol``.

    Returns:
        A :class:`LanczosResult`; ``converged`` says whether ``tol`` was met.

    Example:
        >>> from lr_batch_callback.operators import CurvatureOperator
        >>> class Diag(CurvatureOperator):
        ...     def __init__(self, d):
        ...         super().__init__([d]); self.d = d
        ...     def _local_matmat(self, V):
        ...         return V * self.d
        >>> res = lanczos(Diag(torch.arange(1.0, 51.0, dtype=torch.float64)), k=2, tol=1e-10, seed=0)
        >>> [round(x, 6) for x in res.eigenvalues.tolist()]
        [50.0, 49.0]
    """
    dim = operator.dim
    _validate(k, which, tol, max_iter, dim)
    m_max = default_max_iter(dim, k) if max_iter is None else min(max_iter, dim)
    if check_every is None:
        check_every = 1 if operator.device.type == "cpu" else 4
    check_every = max(1, int(check_every))

    if seed is None:
        seed_tensor = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        seed = int(operator.broadcast_(seed_tensor.to(operator.device)).item())
    generator = torch.Generator().manual_seed(seed)
    like = torch.empty(0, device=operator.device, dtype=operator.dtype)

    if v0 is not None:
        if v0.numel() != dim:
            raise ValueError(f"v0 must have {dim} entries (one per parameter), got {v0.numel()}.")
        q = v0.detach().reshape(-1).to(device=operator.device, dtype=operator.dtype).clone()
        operator.broadcast_(q)
        norm = q.norm()
        if not bool(torch.isfinite(norm)) or norm.item() == 0.0:
            q = _random_unit(dim, generator, like)
        else:
            q = q / norm
    else:
        q = _random_unit(dim, generator, like)

    # The basis grows by doubling: preallocating max_iter rows would reserve gigabytes on an
    # accelerator for a large model even when the run stops after a few steps.
    basis = torch.empty((min(m_max, 16), dim), device=operator.device, dtype=operator.dtype)
    alpha_dev: list[Tensor] = []
    beta_dev: list[Tensor] = []
    norms_dev: list[Tensor] = []
    alpha: list[float] = []
    beta: list[float] = []
    products = 0
    converged = False
    theta = s = None
    m = 0
    checked = 0
    eps = torch.finfo(operator.dtype).eps

    while m < m_max:
        if m == basis.shape[0]:
            grown = torch.empty((min(2 * m, m_max), dim), device=basis.device, dtype=basis.dtype)
            grown[:m] = basis
            basis = grown
        basis[m] = q
        w = operator.matvec(q)
        products += 1
        # Coefficients accumulate in float64 without float64 copies of the vectors.
        alpha_dev.append((w * q).sum(dtype=torch.float64))
        norms_dev.append(torch.linalg.vector_norm(w, dtype=torch.float64))
        w = _orthogonalise(w, basis[: m + 1])
        b = torch.linalg.vector_norm(w, dtype=torch.float64)
        beta_dev.append(b)
        m += 1
        # Division by a device scalar keeps the loop free of host synchronisation.
        q = w / b.clamp_min(torch.finfo(torch.float64).tiny).to(operator.dtype)

        if m - checked < check_every and m < m_max:
            continue
        # -- host synchronisation: the stopping test ------------------------------------------
        new_alpha = torch.stack(alpha_dev[checked:m]).cpu().tolist()
        new_beta = torch.stack(beta_dev[checked:m]).cpu().tolist()
        new_norm = torch.stack(norms_dev[checked:m]).cpu().tolist()
        if not all(math.isfinite(x) for x in new_alpha + new_beta):
            raise NonFiniteCurvatureError("Lanczos produced a non-finite coefficient.")
        restart_at = None
        for j, (b_j, n_j) in enumerate(zip(new_beta, new_norm, strict=True)):
            # An invariant subspace: the next vector would be rounding noise.
            if b_j <= 100 * eps * max(n_j, abs(new_alpha[j]), 1e-300):
                restart_at = checked + j
                break
        if restart_at is not None:
            # Discard the steps after the breakdown and continue from a fresh direction.
            m = restart_at + 1
            alpha_dev = alpha_dev[:m]
            beta_dev = beta_dev[:m]
            norms_dev = norms_dev[:m]
            new_alpha = new_alpha[: m - checked]
            new_beta = new_beta[: m - checked]
            beta_dev[-1] = torch.zeros((), dtype=torch.float64, device=operator.device)
            new_beta[-1] = 0.0
        alpha += new_alpha
        beta += new_beta
        checked = m

        theta, s = tridiagonal_eigh(alpha, beta)
        wanted = _wanted(m, k, which)
        scale = float(theta.abs().max())
        residual = (abs(beta[m - 1]) * s[m - 1, wanted].abs())
        bound = tol * torch.clamp(theta[wanted].abs(), min=_FLOOR * scale)
        enough = len(wanted) >= (2 * k if which == "both" else k) or m >= dim
        if (enough and bool((residual <= bound).all())) or m >= dim:
            converged = True
            break
        if restart_at is not None and m < m_max:
            r = _random_unit(dim, generator, like)
            r = _orthogonalise(r, basis[:m])
            q = r / r.norm()

    assert theta is not None and s is not None
    wanted = _wanted(m, k, which)
    residuals = abs(beta[m - 1]) * s[m - 1, wanted].abs() if m < dim else torch.zeros(len(wanted),
                                                                                          dtype=torch.float64)
    if m >= dim:
        converged = True
    if not converged and warn_unconverged:
        warnings.warn(
            f"Lanczos stopped at max_iter={m_max} before reaching tol={tol:g}: largest relative "
            f"residual {float((residuals / theta[wanted].abs().clamp_min(1e-300)).max()):.2e}. "
            "Raise max_iter or tol; the result's `converged` is False.",
            RuntimeWarning,
            stacklevel=2,
        )
    vectors = None
    if return_eigenvectors:
        coeffs = s[:, wanted].to(device=operator.device, dtype=operator.dtype)
        vectors = coeffs.T @ basis[:m]
    return LanczosResult(
        eigenvalues=theta[wanted].clone(),
        eigenvectors=vectors,
        residuals=residuals.clone(),
        converged=converged,
        num_iterations=m,
        num_products=products,
        ritz_values=theta.flip(0).clone(),
        alpha=torch.tensor(alpha, dtype=torch.float64),
        beta=torch.tensor(beta[: m - 1], dtype=torch.float64),
    )

r"""Extremal eigenvalues of a symmetric operator: thick-restart block Lanczos with error bounds.

Runs the kernel of :mod:`~lr_batch_callback.engine.krylov` and reads Ritz pairs
:math:`(\theta_i, y_i)` of the projected matrix :math:`T` (block tridiagonal, bordered by the
Ritz values kept at restarts) with their residual norms :math:`r_i`.

**Stopping rule.** Some eigenvalue of :math:`A` lies within :math:`r_i` of :math:`\theta_i`, and
when the gap :math:`\delta_i` from :math:`\theta_i` to the rest of the spectrum is known the
error is at most :math:`r_i^2/\delta_i` (Kato–Temple), which shrinks quadratically as Lanczos
converges. The gap is estimated pessimistically from the other Ritz values,
:math:`\delta_i = \min_{j\ne i}(|\theta_i-\theta_j| - r_j)`, and trusted only once it exceeds
:math:`r_i`. No Krylov method can see an eigenvalue next to :math:`\theta_i` that no Ritz value
has resolved yet (a close pair early in the run): the Ritz value is then a mixture whose error
can reach :math:`r_i`. So the bound is :math:`\max(\min(r_i, r_i^2/\delta_i),\ r_i/5)` and the
run stops when every wanted value has

.. math:: \mathrm{bound}_i \le \mathrm{tol}\cdot\max(|\theta_i|,\ 10^{-3}\max_j|\theta_j|),

a relative tolerance floored at a thousandth of the spectral radius so that eigenvalues near zero
(the bulk of a Hessian) can converge at all. On built spectra (single outliers, pairs and
clusters with gaps from 10⁻¹ to 10⁻⁶, tolerances 10⁻² to 10⁻⁶) no converged value was off by more
than 5× the tolerance, and runs stopped 0–4 products after the first accurate step.

**Multiplicities.** A Krylov space grown from ``b`` start vectors holds at most ``b`` independent
directions of one eigenspace, so single-vector Lanczos returns one copy of a repeated
eigenvalue. The block size defaults to ``k``: the top-``k`` (and bottom-``k``) values come out
with their multiplicities. What can still be missed: multiplicities above the block size, and
eigenvectors almost orthogonal to the random start block (probability zero in exact arithmetic,
so a fixed seed that meets one is rare and reproducible).

**Memory.** With ``k = 1`` and no eigenvector asked for, the three-term recurrence keeps two
vectors whatever the number of steps (each end's extreme eigenvalue converges as with full
reorthogonalisation). Otherwise the basis holds at most ``max_basis`` rows: when it is full, the
wanted Ritz vectors and their neighbours are kept and Lanczos continues from the residual
(thick restart, Wu & Simon 2000), so memory never grows with the number of products.

**Symmetry probe.** The kernel compares every projection with its transpose computed one step
earlier; an operator that is not symmetric to rounding (a wrong double backward, an operator that
changes between products) stops the run with a warning and ``converged=False``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lr_batch_callback._checks import check_bool, check_choice, check_integer, check_positive_float
from lr_batch_callback.engine.krylov import LanczosRecurrence, random_rows
from lr_batch_callback.engine.linear_operator import CurvatureOperator, fresh_seed
from lr_batch_callback.engine.precision import autocast_off
from lr_batch_callback.engine.ritz import (
    complete,
    error_bounds,
    floor_bounds,
    ritz,
    thick_restart,
    tridiagonal_eigh,
    wanted_indices,
)

__all__ = [
    "DEFAULT_TOL",
    "WHICH",
    "LanczosOptions",
    "LanczosResult",
    "default_max_iter",
    "error_bounds",
    "lanczos",
    "tridiagonal_eigh",
]

Which = Literal["largest", "smallest", "both"]
WHICH = ("largest", "smallest", "both")
#: The relative eigenvalue tolerance used wherever none is given (functions and callbacks).
DEFAULT_TOL = 1e-3
FLOOR = 1e-3  # fraction of the spectral radius below which tolerances become absolute
_BASIS_BYTES = 64 * 2**20  # default basis budget: small models keep every vector
_SYMMETRY = 10.0  # × sqrt(eps): an asymmetry above this is no rounding error
_ASYMMETRY_CAUSES = (
    "an operation whose double backward is wrong or missing (a custom autograd.Function, one "
    "marked @once_differentiable, which PyTorch may silently treat as constant), or a loss that "
    "changes between products (randomness not fixed by the RNG state, data-dependent control "
    "flow)")



@dataclass(frozen=True)
class LanczosOptions:
    """The eigensolver's less common settings.

    Attributes:
        block_size: vectors per Lanczos block; the multiplicity it can resolve. Default ``k``.
        max_basis: basis vectors kept (memory ``max_basis × P``); default: no basis for
            ``k = 1`` without eigenvectors, else whatever fits in 64 MiB, at least
            ``4·wanted + 2·block_size`` and at most the product cap.
        check_every: steps between stopping tests (host synchronisations); default 1 on CPU,
            4 on accelerators.
        warn_unconverged: warn when the product cap is hit before the tolerance.
    """

    block_size: int | None = None
    max_basis: int | None = None
    check_every: int | None = None
    warn_unconverged: bool = True

    def __post_init__(self) -> None:
        check_integer(self.block_size, "block_size", allow_none=True)
        check_integer(self.max_basis, "max_basis", allow_none=True, minimum=2)
        check_integer(self.check_every, "check_every", allow_none=True)
        check_bool(self.warn_unconverged, "warn_unconverged")


@dataclass(frozen=True)
class LanczosResult:
    """Extremal eigenvalues found by Lanczos.

    Attributes:
        eigenvalues: wanted Ritz values, float64 on CPU, largest algebraic first.
        eigenvectors: matching unit Ritz vectors as rows ``(len(eigenvalues), P)`` on the
            operator's device and dtype, or ``None`` unless asked for.
        residuals: Ritz residual norms :math:`r_i` (an eigenvalue lies within :math:`r_i`).
        error_bounds: the eigenvalue error bounds of the stopping rule (module docstring).
        converged: whether every wanted value met the tolerance on a symmetric operator.
        num_iterations: block steps taken.
        num_products: operator-vector products used.
        ritz_values: every Ritz value of the final projected matrix, largest first.
        asymmetry: largest asymmetry seen, relative to the spectral radius (0 when symmetric up
            to rounding, about 1e-16 in float64).
        restarts: thick restarts performed.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    error_bounds: Tensor
    converged: bool
    num_iterations: int
    num_products: int
    ritz_values: Tensor
    asymmetry: float = 0.0
    restarts: int = 0


def default_max_iter(dim: int, k: int, block_size: int = 1) -> int:
    """Default product cap: ``max(100, 10k)`` steps' worth of blocks (enough for hard spectra,
    never the 2k-step trap), and never more than ``dim`` products."""
    return min(dim, max(100, 10 * k) * block_size)

def _validate(k: int, which: str, tol: float, max_iter: int | None, dim: int) -> int:
    check_integer(k, "k")
    check_choice(which, "which", WHICH)
    wanted = 2 * k if which == "both" else k
    if wanted > dim:
        raise ValueError(
            f"k={k} asks for {wanted} eigenvalues but the operator has only {dim} dimensions "
            f"(parameters). Use k <= {dim // 2 if which == 'both' else dim}."
        )
    check_positive_float(tol, "tol", example="1e-4")
    check_integer(max_iter, "max_iter", allow_none=True, minimum=wanted,
                  hint="at least the number of wanted eigenvalues; None for the default")
    return wanted


def _start_block(operator: CurvatureOperator, v0: Tensor | None, b: int,
                 generator: torch.Generator) -> Tensor:
    like = torch.empty(0, device=operator.device, dtype=operator.dtype)
    rows = random_rows(b, operator.dim, generator, like)
    if v0 is not None:
        given = v0.detach().reshape(-1, operator.dim) if v0.numel() % operator.dim == 0 else None
        if given is None:
            raise ValueError(f"v0 must have {operator.dim} entries (one per parameter), got "
                             f"{v0.numel()}.")
        given = operator.broadcast_(given.to(like).clone())
        norms = torch.linalg.vector_norm(given, dim=1)
        usable = given[torch.isfinite(norms) & (norms > 0)][:b]
        rows[: usable.shape[0]] = usable
    if b == 1:  # a norm, not a QR of a (P, 1) matrix in float64
        return (rows / torch.linalg.vector_norm(rows)).reshape(1, 1, -1)
    Q, _ = torch.linalg.qr(rows.T.to(torch.float64))
    return Q.T.to(like).reshape(1, b, -1)


def _capacity(opts: LanczosOptions, operator: CurvatureOperator, wanted: int, b: int,
              cap: int, local: bool) -> int | None:
    if local:
        return None
    least = 4 * wanted + 2 * b
    if opts.max_basis is not None:
        return min(operator.dim, max(opts.max_basis, wanted + b))
    itemsize = torch.empty(0, dtype=operator.dtype).element_size()
    by_memory = _BASIS_BYTES // (operator.dim * itemsize)
    return min(operator.dim, max(least, min(by_memory, cap + b)))


def lanczos(
    operator: CurvatureOperator,
    k: int = 1,
    *,
    which: Which = "largest",
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    v0: Tensor | None = None,
    seed: int | None = None,
    return_eigenvectors: bool = False,
    options: LanczosOptions | None = None,
) -> LanczosResult:
    """Extremal eigenvalues of a symmetric operator (see the module docstring for the method).

    Args:
        operator: a symmetric :class:`~lr_batch_callback.engine.operators.CurvatureOperator`.
        k: how many eigenvalues at each wanted end (with multiplicities up to the block size).
        which: ``"largest"`` (algebraic), ``"smallest"`` (most negative) or ``"both"``.
        tol: relative tolerance on each eigenvalue's error bound (and on each Ritz vector's
            residual when eigenvectors are returned).
        max_iter: cap on operator products; default :func:`default_max_iter`.
        v0: start vector(s), e.g. the previous top Ritz vector (a warm start); random otherwise.
        seed: seed of the random start and restart vectors (``None``: fresh randomness; under
            ``torch.distributed`` rank 0's choice is broadcast).
        return_eigenvectors: also return the wanted Ritz vectors.
        options: block size, basis memory, stopping-test cadence (:class:`LanczosOptions`).

    Returns:
        A :class:`LanczosResult`; ``converged`` says whether ``tol`` was met.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
        >>> res = lanczos(CurvatureOperator.from_matrix(A), k=2, tol=1e-10, seed=0)
        >>> [round(x, 6) for x in res.eigenvalues.tolist()]
        [50.0, 49.0]
    """
    # The caller's autocast must not lower the precision of the orthogonalisation.
    with autocast_off({operator.device.type, "cpu"}):
        return _lanczos(operator, k, which, tol, max_iter, v0, seed, return_eigenvectors,
                        options or LanczosOptions())


def _lanczos(operator: CurvatureOperator, k: int, which: str, tol: float, max_iter: int | None,
             v0: Tensor | None, seed: int | None, return_eigenvectors: bool,
             opts: LanczosOptions) -> LanczosResult:
    dim = operator.dim
    wanted = _validate(k, which, tol, max_iter, dim)
    check_bool(return_eigenvectors, "return_eigenvectors")
    b = min(opts.block_size or k, dim)
    cap = default_max_iter(dim, k, b) if max_iter is None else max_iter
    local = b == 1 and k == 1 and v0 is None and not return_eigenvectors and opts.max_basis is None
    capacity = _capacity(opts, operator, wanted, b, cap, local)
    check_every = opts.check_every or (1 if operator.device.type == "cpu" else 4)

    if seed is None:
        seed = fresh_seed(operator)
    generator = torch.Generator().manual_seed(seed)
    rec = LanczosRecurrence(operator, _start_block(operator, v0, b, generator),
                            capacity=capacity, generator=generator)
    kept = np.zeros(0)  # Ritz values kept by thick restarts
    products_before = steps_before = restarts = 0
    converged = exhausted = False
    asymmetry = 0.0
    rounding = math.sqrt(torch.finfo(operator.dtype).eps)  # of the radius, for lower_bound
    symmetry_tol = (_SYMMETRY * rounding if operator.symmetry_tolerance is None
                    else operator.symmetry_tolerance)
    theta = Y = residual = np.zeros(0)
    since_check = 0

    complement: Tensor | None = None
    while True:
        rec.step()
        since_check += 1
        products = products_before + rec.num_products
        if since_check < check_every and products + b <= cap and not rec.full:
            continue
        since_check = 0
        if rec.truncate_at_breakdown():
            # An invariant subspace. From a random start it holds every eigen-direction the
            # start touched: the Ritz values are exact. Otherwise (a warm start, a block) go on
            # from a fresh direction orthogonal to it, unless it is the whole space.
            exhausted = capacity is None or rec.num_locked + rec.steps * b >= dim
            if not exhausted:
                rec.continue_after_breakdown()
                continue
        exhausted = exhausted or (capacity is not None and rec.num_locked + rec.steps * b >= dim)
        theta, Y, residual = ritz(rec, kept)
        scale = float(np.abs(theta).max()) if theta.size else 0.0
        asymmetry = max(asymmetry, rec.asymmetry / max(scale, 1e-300))
        if asymmetry > symmetry_tol:
            break
        idx = wanted_indices(theta.size, k, which)
        # Eigenvectors asked for: their residuals must meet the tolerance too (an eigenvector's
        # error is its residual over the gap, not the residual squared).
        bounds = residual[idx] if return_eigenvectors else floor_bounds(
            theta, error_bounds(theta, residual, idx), idx, k, which, operator.lower_bound,
            rounding * scale)
        limit = tol * np.maximum(np.abs(theta[idx]), FLOOR * scale)
        if exhausted or (len(idx) >= wanted and bool((bounds <= limit).all())):
            converged = True
            break
        rows = rec.num_locked + rec.steps * b
        if capacity is not None and dim < rows + b:
            # A whole block no longer fits: finish with the exact complement instead.
            if products + dim - rows <= cap:
                theta, Y, residual, complement = complete(rec, kept, generator)
                converged = exhausted = True
            break
        if products + b > cap:
            break
        if rec.full:
            assert capacity is not None
            steps_before += rec.steps
            kept = thick_restart(rec, theta, Y, k, which, capacity)
            products_before += rec.num_products
            rec.num_products = 0
            restarts += 1

    products = products_before + rec.num_products + (0 if complement is None else len(complement))
    idx = wanted_indices(theta.size, k, which)
    bounds = np.zeros(len(idx)) if exhausted else floor_bounds(
        theta, error_bounds(theta, residual, idx), idx, k, which, operator.lower_bound,
        rounding * float(np.abs(theta).max(initial=0.0)))
    if asymmetry > symmetry_tol:
        converged = False
        warnings.warn(
            f"The curvature operator is not symmetric: products disagree with their transposes by "
            f"{asymmetry:.2e} of the spectral radius (more than the {symmetry_tol:.0e} its "
            "accuracy allows). Its eigenvalues are unreliable; converged=False. Likely causes: "
            + (operator.asymmetry_causes or _ASYMMETRY_CAUSES) + ".",
            RuntimeWarning, stacklevel=2,
        )
    elif not converged and opts.warn_unconverged:
        worst = float((bounds / np.maximum(np.abs(theta[idx]), 1e-300)).max())
        warnings.warn(
            f"Lanczos stopped at max_iter={cap} products before reaching tol={tol:g}: largest "
            f"relative error bound {worst:.2e}. Raise max_iter or tol; the result's `converged` "
            "is False.",
            RuntimeWarning, stacklevel=2,
        )
    vectors = None
    if return_eigenvectors:
        basis = rec.rows(0) if complement is None else torch.cat([rec.rows(0), complement])
        vectors = torch.from_numpy(np.ascontiguousarray(Y[:, idx])).to(basis).T @ basis
    return LanczosResult(
        eigenvalues=torch.from_numpy(theta[idx].copy()),
        eigenvectors=vectors,
        residuals=torch.from_numpy(residual[idx].copy()),
        error_bounds=torch.from_numpy(bounds.copy()),
        converged=converged,
        num_iterations=steps_before + rec.steps,
        num_products=products,
        ritz_values=torch.from_numpy(theta[::-1].copy()),
        asymmetry=asymmetry,
        restarts=restarts,
    )

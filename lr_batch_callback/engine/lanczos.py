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
from dataclasses import dataclass, field
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
    """Default product cap: ``max(100, 10k)`` steps' worth of blocks, at most ``dim`` products.

    That is enough for hard spectra, and never the 2k-step trap.
    """
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
        unit: Tensor = (rows / torch.linalg.vector_norm(rows)).reshape(1, 1, -1)
        return unit
    Q, _ = torch.linalg.qr(rows.T.to(torch.float64))
    block: Tensor = Q.T.to(like).reshape(1, b, -1)
    return block


def _capacity(opts: LanczosOptions, operator: CurvatureOperator, wanted: int, b: int,
              cap: int, local: bool) -> int | None:
    if local:
        return None
    dim = int(operator.dim)
    least = 4 * wanted + 2 * b
    if opts.max_basis is not None:
        return min(dim, max(opts.max_basis, wanted + b))
    itemsize = int(torch.empty(0, dtype=operator.dtype).element_size())
    by_memory = _BASIS_BYTES // (dim * itemsize)
    return min(dim, max(least, min(by_memory, cap + b)))


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


@dataclass(frozen=True)
class _Plan:
    """The fixed settings of one run, derived once from the arguments."""

    k: int
    which: str
    tol: float
    wanted: int  # eigenvalues asked for: k, or 2k for both ends
    block: int
    cap: int  # operator products allowed
    capacity: int | None  # basis rows; None: the three-term recurrence
    check_every: int  # steps between stopping tests
    rounding: float  # sqrt(eps) of the operator's dtype, relative to the radius
    symmetry_tol: float
    eigenvectors: bool
    warn_unconverged: bool


@dataclass
class _Run:
    """What changes during a run: the recurrence and the latest Ritz decomposition."""

    rec: LanczosRecurrence
    generator: torch.Generator
    kept: np.ndarray = field(default_factory=lambda: np.zeros(0))  # Ritz values kept at restarts
    theta: np.ndarray = field(default_factory=lambda: np.zeros(0))
    Y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    residual: np.ndarray = field(default_factory=lambda: np.zeros(0))
    asymmetry: float = 0.0
    converged: bool = False
    exhausted: bool = False  # the basis spans an invariant subspace: the Ritz values are exact
    complement: Tensor | None = None  # rows that completed the basis to the whole space

    @property
    def products(self) -> int:
        return self.rec.num_products + (0 if self.complement is None else len(self.complement))


def _plan(operator: CurvatureOperator, k: int, which: str, tol: float, max_iter: int | None,
          v0: Tensor | None, eigenvectors: bool, opts: LanczosOptions) -> _Plan:
    wanted = _validate(k, which, tol, max_iter, operator.dim)
    check_bool(eigenvectors, "return_eigenvectors")
    b = min(opts.block_size or k, operator.dim)
    cap = default_max_iter(operator.dim, k, b) if max_iter is None else max_iter
    # One extreme value and nothing else: two vectors suffice, whatever the number of steps.
    local = b == 1 and k == 1 and v0 is None and not eigenvectors and opts.max_basis is None
    rounding = math.sqrt(torch.finfo(operator.dtype).eps)
    return _Plan(
        k=k, which=which, tol=tol, wanted=wanted, block=b, cap=cap,
        capacity=_capacity(opts, operator, wanted, b, cap, local),
        check_every=opts.check_every or (1 if operator.device.type == "cpu" else 4),
        rounding=rounding,
        symmetry_tol=(_SYMMETRY * rounding if operator.symmetry_tolerance is None
                      else operator.symmetry_tolerance),
        eigenvectors=eigenvectors, warn_unconverged=opts.warn_unconverged)


def _lanczos(operator: CurvatureOperator, k: int, which: str, tol: float, max_iter: int | None,
             v0: Tensor | None, seed: int | None, return_eigenvectors: bool,
             opts: LanczosOptions) -> LanczosResult:
    plan = _plan(operator, k, which, tol, max_iter, v0, return_eigenvectors, opts)
    generator = torch.Generator().manual_seed(fresh_seed(operator) if seed is None else seed)
    rec = LanczosRecurrence(operator, _start_block(operator, v0, plan.block, generator),
                            capacity=plan.capacity, generator=generator)
    run = _Run(rec, generator)
    while True:
        _advance(run, plan)
        if _invariant_subspace(run, plan) == "continue":
            continue
        if _test(run, plan) == "stop":
            break
    return _result(run, plan)


def _advance(run: _Run, plan: _Plan) -> None:
    """Take steps up to the next stopping test.

    That is ``check_every`` steps, fewer when the product cap or the basis capacity would be
    reached first.
    """
    rec = run.rec
    for _ in range(plan.check_every):
        rec.step()
        if rec.num_products + plan.block > plan.cap or rec.full:
            return


def _invariant_subspace(run: _Run, plan: _Plan) -> str:
    """After a breakdown: ``"continue"`` from a fresh direction, or ``"test"`` the Ritz values.

    From a random start an invariant subspace holds every eigen-direction the start touched, so
    its Ritz values are exact. After a warm start or in a block it may not: go on from a fresh
    direction orthogonal to it, unless it is the whole space.
    """
    rec = run.rec
    if rec.truncate_at_breakdown():
        run.exhausted = plan.capacity is None or rec.basis_rows >= rec.operator.dim
        if not run.exhausted:
            rec.continue_after_breakdown()
            return "continue"
    return "test"


def _test(run: _Run, plan: _Plan) -> str:
    """The stopping test, or a thick restart: ``"stop"`` or ``"go"``."""
    rec, dim, b = run.rec, run.rec.operator.dim, plan.block
    run.exhausted = run.exhausted or (plan.capacity is not None and rec.basis_rows >= dim)
    run.theta, run.Y, run.residual = ritz(rec, run.kept)
    scale = float(np.abs(run.theta).max()) if run.theta.size else 0.0
    run.asymmetry = max(run.asymmetry, rec.asymmetry / max(scale, 1e-300))
    if run.asymmetry > plan.symmetry_tol:
        return "stop"
    idx = wanted_indices(run.theta.size, plan.k, plan.which)
    # Eigenvectors asked for: their residuals must meet the tolerance too (an eigenvector's
    # error is its residual over the gap, not the residual squared).
    bounds = run.residual[idx] if plan.eigenvectors else _bounds(run, plan, idx)
    limit = plan.tol * np.maximum(np.abs(run.theta[idx]), FLOOR * scale)
    if run.exhausted or (len(idx) >= plan.wanted and bool((bounds <= limit).all())):
        run.converged = True
        return "stop"
    if plan.capacity is not None and dim < rec.basis_rows + b:
        # A whole block no longer fits: finish with the exact complement instead.
        if rec.num_products + dim - rec.basis_rows <= plan.cap:
            run.theta, run.Y, run.residual, run.complement = complete(rec, run.kept, run.generator)
            run.converged = run.exhausted = True
        return "stop"
    if rec.num_products + b > plan.cap:
        return "stop"
    if rec.full:
        assert plan.capacity is not None
        run.kept = thick_restart(rec, run.theta, run.Y, plan.k, plan.which, plan.capacity)
    return "go"


def _bounds(run: _Run, plan: _Plan, idx: list[int]) -> np.ndarray:
    """Error bounds of the wanted Ritz values (module docstring), floored by rounding."""
    scale = float(np.abs(run.theta).max(initial=0.0))
    return floor_bounds(run.theta, error_bounds(run.theta, run.residual, idx), idx, plan.k,
                        plan.which, run.rec.operator.lower_bound, plan.rounding * scale)


def _result(run: _Run, plan: _Plan) -> LanczosResult:
    """The wanted Ritz pairs, with a warning when they are unreliable or unconverged."""
    idx = wanted_indices(run.theta.size, plan.k, plan.which)
    bounds = np.zeros(len(idx)) if run.exhausted else _bounds(run, plan, idx)
    if run.asymmetry > plan.symmetry_tol:
        run.converged = False
        warnings.warn(
            f"The curvature operator is not symmetric: products disagree with their transposes by "
            f"{run.asymmetry:.2e} of the spectral radius (more than the {plan.symmetry_tol:.0e} "
            "its accuracy allows). Its eigenvalues are unreliable; converged=False. Likely "
            "causes: " + (run.rec.operator.asymmetry_causes or _ASYMMETRY_CAUSES) + ".",
            RuntimeWarning, stacklevel=3,
        )
    elif not run.converged and plan.warn_unconverged:
        worst = float((bounds / np.maximum(np.abs(run.theta[idx]), 1e-300)).max())
        warnings.warn(
            f"Lanczos stopped at max_iter={plan.cap} products before reaching tol={plan.tol:g}: "
            f"largest relative error bound {worst:.2e}. Raise max_iter or tol; the result's "
            "`converged` is False.",
            RuntimeWarning, stacklevel=3,
        )
    vectors = None
    if plan.eigenvectors:
        rows = run.rec.rows(0)
        basis = rows if run.complement is None else torch.cat([rows, run.complement])
        vectors = torch.from_numpy(np.ascontiguousarray(run.Y[:, idx])).to(basis).T @ basis
    return LanczosResult(
        eigenvalues=torch.from_numpy(run.theta[idx].copy()),
        eigenvectors=vectors,
        residuals=torch.from_numpy(run.residual[idx].copy()),
        error_bounds=torch.from_numpy(bounds.copy()),
        converged=run.converged,
        num_iterations=run.rec.total_steps,
        num_products=run.products,
        ritz_values=torch.from_numpy(run.theta[::-1].copy()),
        asymmetry=run.asymmetry,
        restarts=run.rec.restarts,
    )

r"""The one Lanczos kernel: a block Lanczos recurrence on independent chains.

Vectors are rows. For each chain, from an orthonormal start block :math:`X_1` (``b`` rows of
length :math:`P`), step :math:`j` computes the products :math:`W_j = X_j A` and splits them as

.. math:: W_j = A_j X_j + G_{j-1}^\top X_{j-1} + G_j X_{j+1},

with :math:`A_j = W_j X_j^\top` (``b×b``, symmetric) and :math:`G_j` (``b×b``, lower triangular)
from a row-wise Gram–Schmidt of the remainder :math:`R_j = G_j X_{j+1}`. The basis
:math:`Q_m = [X_1; \dots; X_m]` is orthonormal and :math:`Q_m A Q_m^\top = T_m` is block
tridiagonal (tridiagonal for ``b = 1``: :math:`\alpha_j = A_j`, :math:`\beta_j = G_j`). Its
eigenpairs :math:`(\theta_i, y_i)` are Ritz pairs whose residual norm is exactly
:math:`\|G_m^\top y_{i,\text{last}}\|` (the rows of :math:`y_i` in the last block).

Two modes:

- ``capacity`` rows of basis kept per chain: every remainder is orthogonalised against the
  whole basis (and against ``locked`` rows, e.g. the Ritz vectors kept by a thick restart) twice
  (classical Gram–Schmidt, "twice is enough"), so no spurious copies of converged eigenvalues
  appear;
- ``capacity=None``: only the last two blocks are kept (the three-term recurrence, memory
  independent of the number of steps). Eigenvalues at the ends converge as with full
  reorthogonalisation; once one has converged, rounding may produce copies of it, so this mode
  suits the extreme eigenvalue of each end, not multiplicities.

Both modes measure the operator's symmetry for free: for a symmetric :math:`A` the projection
of :math:`W_j` on :math:`X_{j-1}` equals :math:`G_{j-1}^\top` computed one step earlier; the
largest difference is :attr:`LanczosRecurrence.asymmetry`.

A breakdown (a remainder that vanishes: the Krylov space is invariant) is recorded when the
coefficients are read (:meth:`LanczosRecurrence.coefficients`, the only host synchronisation
for ``b = 1``); the caller decides: stochastic quadrature truncates that chain there, the
eigensolver continues with a random row orthogonal to the basis
(:meth:`LanczosRecurrence.truncate_at_breakdown`,
:meth:`LanczosRecurrence.continue_after_breakdown`). In a block (``b > 1``) a vanished row is
replaced at once, because the later rows of the same block depend on it.

The extremal eigensolver (:func:`~lr_batch_callback.engine.lanczos.lanczos`) and stochastic
Lanczos quadrature (:mod:`~lr_batch_callback.engine.density`) both run on this kernel.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lr_batch_callback.engine.linear_operator import CurvatureOperator, NonFiniteCurvatureError

__all__ = ["LanczosRecurrence", "random_rows"]



def random_rows(num: int, dim: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """``num`` random Gaussian rows in ``like``'s precision, on its device and dtype.

    They are drawn on the CPU, so one seed gives the same rows on every device and rank.
    """
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    rows = torch.randn(num, dim, generator=generator, dtype=dtype)
    return rows.to(device=like.device, dtype=like.dtype)


def _project_out(R: Tensor, Q: Tensor) -> Tensor:
    """Classical Gram–Schmidt: project ``Q``'s rows out of ``R`` in place.

    Returns the coefficients ``R Qᵀ`` of ``R``'s rows on ``Q``'s rows.
    """
    C = R @ Q.T
    R.addmm_(C, Q, alpha=-1)  # in place: no temporary of R's size
    return C


class LanczosRecurrence:
    """Block Lanczos on ``n`` independent chains with block size ``b`` (see the module docstring).

    Args:
        operator: the symmetric operator; all chains' products are computed in one
            ``operator.matmat`` call per step.
        start: ``(n, b, P)`` start blocks, each with orthonormal rows (orthogonal to ``locked``).
        capacity: basis rows kept per chain, ``locked`` rows included; ``None`` keeps only the
            last two blocks (three-term recurrence).
        locked: ``(l, P)`` orthonormal rows every chain's basis is kept orthogonal to (only with
            a ``capacity``); their couplings to the start block are :attr:`coupling`.
        generator: CPU generator for the rows that replace a breakdown.

    Attributes:
        steps: block steps in the current basis (a breakdown can lower it).
        num_products: operator products used over the recurrence's life, restarts included
            (every step costs ``n·b``, discarded ones too).
        restarts: thick restarts performed.
        coupling: ``(n, l, b)`` float64 coefficients ``locked · A · X_1ᵀ`` (thick restart).
    """

    def __init__(self, operator: CurvatureOperator, start: Tensor, *, capacity: int | None,
                 locked: Tensor | None = None, generator: torch.Generator) -> None:
        if start.dim() != 3 or start.shape[2] != operator.dim:
            raise ValueError(f"start must have shape (chains, block, {operator.dim}), got "
                             f"{tuple(start.shape)}.")
        self.operator = operator
        self.chains, self.block, dim = start.shape
        self.generator = generator
        self.num_locked = 0 if locked is None else int(locked.shape[0])
        if capacity is not None and capacity < self.num_locked + self.block:
            raise ValueError(f"capacity {capacity} cannot hold {self.num_locked} locked rows and "
                             f"a block of {self.block}.")
        if capacity is None and locked is not None:
            raise ValueError("locked rows need a basis capacity (full reorthogonalisation).")
        self.capacity = capacity
        rows = capacity if capacity is not None else 2 * self.block
        # Preallocated once: the basis never grows past ``capacity`` rows, whatever the steps.
        self._basis = torch.empty((self.chains, rows, dim), device=operator.device,
                                  dtype=operator.dtype)
        if locked is not None:
            self._basis[:, : self.num_locked] = locked.to(self._basis)
        self._next = start.to(device=operator.device, dtype=operator.dtype).clone()
        self.steps = 0
        self.num_products = 0
        self.restarts = 0
        self._steps_before_restart = 0
        self._checked = 0
        self._diag: list[Tensor] = []  # A_j, (n, b, b)
        self._off: list[Tensor] = []  # G_j, (n, b, b)
        self._norms: list[Tensor] = []  # remainder row norms before normalisation, (n, b)
        self._scale: list[Tensor] = []  # product row norms, (n, b): the breakdown reference
        self._asymmetry: list[Tensor] = []  # kept across restarts
        self.coupling: Tensor | None = None
        #: Per chain, the first step whose remainder vanished (``b = 1``), or ``None``.
        self.breakdown: list[int | None] = [None] * self.chains

    def restart(self, locked: Tensor, start: Tensor) -> None:
        """Thick restart (one chain): keep ``locked`` rows, continue from the block ``start``.

        ``locked`` (``(l, P)``, orthonormal, e.g. Ritz vectors of the current basis) may be a
        combination of the current rows: it is computed before the buffer is overwritten.
        """
        if self.capacity is None or self.chains != 1:
            raise RuntimeError("restart needs one chain and a basis capacity.")
        count = int(locked.shape[0])
        if count + self.block > self.capacity:
            raise ValueError(f"capacity {self.capacity} cannot hold {count} locked rows and a "
                             "block.")
        self._basis[0, :count] = locked
        self.num_locked = count
        self._next = start.reshape(1, self.block, -1).clone()
        self._steps_before_restart += self.steps
        self.restarts += 1
        self.steps = self._checked = 0
        for values in (self._diag, self._off, self._norms, self._scale):
            values.clear()
        self.coupling = None
        self.breakdown = [None]

    @property
    def total_steps(self) -> int:
        """Block steps over the recurrence's life, those before thick restarts included."""
        return self._steps_before_restart + self.steps

    # -- the basis ------------------------------------------------------------------------------
    @property
    def basis_rows(self) -> int:
        """Rows of the current basis, locked rows included."""
        return self.num_locked + self.steps * self.block

    @property
    def full(self) -> bool:
        """Whether another step would exceed the basis capacity (never, without a capacity)."""
        if self.capacity is None:
            return False
        return self.num_locked + (self.steps + 1) * self.block > self.capacity

    def rows(self, chain: int = 0) -> Tensor:
        """Locked rows followed by the basis rows of one chain (capacity mode)."""
        if self.capacity is None:
            raise RuntimeError("The three-term recurrence keeps no basis.")
        return self._basis[chain, : self.num_locked + self.steps * self.block]

    def next_block(self) -> Tensor:
        """``(n, b, P)``: the normalised remainder, the block the next step expands."""
        return self._next

    def _rows(self, j: int) -> slice:
        """Buffer rows of block ``j`` (0-based)."""
        if self.capacity is None:
            start = (j % 2) * self.block
        else:
            start = self.num_locked + j * self.block
        return slice(start, start + self.block)

    # -- one step -------------------------------------------------------------------------------
    def _orthogonal_to(self, chain: int, j: int) -> tuple[Tensor, slice, slice | None]:
        """The rows that block ``j``'s products are orthogonalised against.

        Also returns where the current block and the previous block sit in them.
        """
        b = self.block
        if self.capacity is not None:
            top = self.num_locked + (j + 1) * b
            previous = slice(top - 2 * b, top - b) if j > 0 else None
            return self._basis[chain, :top], slice(top - b, top), previous
        if j == 0:
            return self._basis[chain, self._rows(0)], slice(0, b), None
        return self._basis[chain], self._rows(j), self._rows(j - 1)

    def step(self) -> None:
        """Expand the Krylov space by one block per chain.

        Costs ``n·b`` products; there is no host synchronisation for ``b = 1``.
        """
        n, b = self.chains, self.block
        j = self.steps
        self._basis[:, self._rows(j)] = self._next
        # The block's only copy is its basis row from now on (one vector less in memory).
        X = self._next = self._basis[:, self._rows(j)]
        W = self.operator.matmat(X.reshape(n * b, -1)).reshape(n, b, -1)
        self.num_products += n * b
        # Norms in the working dtype: a float64 cast would copy every vector (45 MB per vector
        # for ResNet-18) for a number that rounding in the products limits anyway.
        scale = torch.linalg.vector_norm(W, dim=2).to(torch.float64)
        diag = torch.empty((n, b, b), dtype=torch.float64, device=X.device)
        asym = torch.zeros((), dtype=torch.float64, device=X.device)
        for c in range(n):
            Q, own, previous = self._orthogonal_to(c, j)
            first = _project_out(W[c], Q)
            coeffs = first.to(torch.float64)
            if self.capacity is not None:
                # Full reorthogonalisation needs the second pass ("twice is enough"); the
                # three-term recurrence only keeps local orthogonality, which one pass gives,
                # and each pass reads every vector (200 ms a step at ResNet-18's 11M entries).
                coeffs = coeffs + _project_out(W[c], Q).to(torch.float64)
            diag[c] = (coeffs[:, own] + coeffs[:, own].T) / 2
            if previous is not None:
                # For a symmetric operator the projection on the previous block is G_{j-1}^T,
                # computed one step earlier from the other side; any difference is asymmetry.
                diff = first[:, previous].to(torch.float64) - self._off[-1][c].T
                asym = torch.maximum(asym, diff.abs().max())
            elif self.num_locked:
                if self.coupling is None:
                    self.coupling = torch.zeros((n, self.num_locked, b), dtype=torch.float64,
                                                device=X.device)
                self.coupling[c] = coeffs[:, : self.num_locked].T
        off, norms, self._next = self._orthonormalise(W, scale, diag, j)
        self._diag.append(diag)
        self._off.append(off)
        self._norms.append(norms)
        self._scale.append(scale)
        self._asymmetry.append(asym)
        self.steps += 1

    def _threshold(self, scale: Tensor, diag: Tensor) -> Tensor:
        """Remainders below ``sqrt(eps)`` of the product they came from are a breakdown.

        After two Gram–Schmidt passes the normalised remainder is orthogonal to the basis to
        about ``eps·|w|/|r|``; keeping it only while ``|r| ≥ sqrt(eps)|w|`` keeps the basis
        orthogonal to ``sqrt(eps)``, enough for exact Ritz values (Simon 1984). Dropping a smaller
        coupling perturbs ``T`` by at most ``sqrt(eps)`` of the operator's norm.
        """
        alpha = diag.diagonal(dim1=-2, dim2=-1).abs()
        eps = torch.finfo(self.operator.dtype).eps
        return math.sqrt(eps) * torch.maximum(torch.maximum(scale, alpha),
                                        torch.full_like(scale, 1e-300))

    def _orthonormalise(self, R: Tensor, scale: Tensor, diag: Tensor, j: int
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """``R = G X_next`` per chain: row-wise Gram–Schmidt (twice) of the remainder.

        With ``b = 1`` this is a division by a device scalar (no host synchronisation; a
        breakdown is found later by :meth:`coefficients`). With ``b > 1`` a vanished row is
        replaced at once by a random row, so that the later rows stay exact.
        """
        n, b, _ = R.shape
        tiny = torch.finfo(torch.float64).tiny
        if b == 1:
            norms = torch.linalg.vector_norm(R, dim=2).to(torch.float64)
            R.div_(norms.clamp_min(tiny).to(R.dtype).unsqueeze(2))  # in place: R becomes X_next
            return norms.unsqueeze(2), norms, R
        G = torch.zeros((n, b, b), dtype=torch.float64, device=R.device)
        norms = torch.empty((n, b), dtype=torch.float64, device=R.device)
        X = torch.empty_like(R)
        threshold = self._threshold(scale, diag).cpu()
        for c in range(n):
            Q = self._orthogonal_to(c, j)[0]
            for i in range(b):
                r = R[c, i]
                for _ in range(2):
                    coeff = X[c, :i] @ r
                    r = r - coeff @ X[c, :i]
                    G[c, i, :i] += coeff.to(torch.float64)
                nu = torch.linalg.vector_norm(r).to(torch.float64)
                norms[c, i] = nu
                if float(nu) <= float(threshold[c, i]):
                    r = random_rows(1, r.numel(), self.generator, r)[0]
                    for _ in range(2):
                        r = r - (Q @ r) @ Q
                        r = r - (X[c, :i] @ r) @ X[c, :i]
                    X[c, i] = self.operator.broadcast_(r / torch.linalg.vector_norm(r))
                else:
                    G[c, i, i] = nu
                    X[c, i] = r / nu.to(r.dtype)
        return G, norms, X

    # -- reading the coefficients -----------------------------------------------------------------
    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """``(diag, off)``, float64 NumPy arrays of shape ``(n, steps, b, b)``.

        Synchronises with the device, checks the new steps for non-finite values and records
        breakdowns in :attr:`breakdown`.
        """
        if self._checked < self.steps:
            self._check_new_steps()
        diag = torch.stack(self._diag, 1).cpu().numpy() if self._diag else np.zeros((
            self.chains, 0, self.block, self.block))
        off = torch.stack(self._off, 1).cpu().numpy() if self._off else np.zeros_like(diag)
        return diag, off

    @property
    def asymmetry(self) -> float:
        """Largest asymmetry ``|(X_{j-1} A X_jᵀ) − (X_j A X_{j-1}ᵀ)ᵀ|`` seen so far (host sync)."""
        if not self._asymmetry:
            return 0.0
        return float(torch.stack(self._asymmetry).max())

    def _check_new_steps(self) -> None:
        lo = self._checked
        diag = torch.stack(self._diag[lo:]).cpu()
        off = torch.stack(self._off[lo:]).cpu()
        if not (torch.isfinite(diag).all() and torch.isfinite(off).all()):
            raise NonFiniteCurvatureError("Lanczos produced a non-finite coefficient.")
        self._checked = self.steps
        if self.block > 1:
            return  # vanished rows were replaced at once in _orthonormalise
        norms = torch.stack(self._norms[lo:]).cpu()[..., 0]  # (steps, n)
        threshold = self._threshold(torch.stack(self._scale[lo:]).cpu(), diag)[..., 0]
        for c in range(self.chains):
            if self.breakdown[c] is None:
                hits = torch.nonzero(norms[:, c] <= threshold[:, c]).flatten()
                if hits.numel():
                    self.breakdown[c] = lo + int(hits[0])

    def truncate_at_breakdown(self) -> bool:
        """Drop the steps after a single chain's breakdown; return whether there was one.

        Those steps expanded rounding noise (their products stay counted); what is left makes
        ``T`` exact on the invariant subspace.
        """
        self.coefficients()
        if self.chains != 1 or self.breakdown[0] is None:
            return False
        keep = self.breakdown[0] + 1
        del self._diag[keep:], self._off[keep:], self._norms[keep:], self._scale[keep:]
        del self._asymmetry[keep:]
        self.steps = self._checked = keep
        self._off[keep - 1] = torch.zeros_like(self._off[keep - 1])
        return True

    def continue_after_breakdown(self) -> None:
        """After :meth:`truncate_at_breakdown`, continue from a random row orthogonal to the basis.

        The new row is a unit vector with zero coupling, so the tridiagonal splits into
        independent blocks. Needs a basis capacity and one chain of block size 1 (the
        eigensolver's setting).
        """
        if self.capacity is None or self.chains != 1 or self.block != 1:
            raise RuntimeError("continue_after_breakdown needs one chain, b = 1 and a capacity.")
        self.breakdown[0] = None
        Q = self.rows(0)
        r = random_rows(1, self.operator.dim, self.generator, Q)[0]
        for _ in range(2):
            r = r - (Q @ r) @ Q
        self._next = self.operator.broadcast_((r / torch.linalg.vector_norm(r)).reshape(1, 1, -1))

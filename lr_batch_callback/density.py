r"""Stochastic Lanczos quadrature (SLQ): the spectral density of a curvature operator.

For a symmetric :math:`A` with eigenpairs :math:`(\lambda_i, u_i)` the spectral density is
:math:`\phi(t) = \frac1P\sum_i \delta(t-\lambda_i)`. For a Rademacher probe
:math:`v\in\{\pm1\}^P/\sqrt P`, :math:`\mathbb E[v^\top f(A) v] = \frac1P \operatorname{tr} f(A) =
\int f\,d\phi`, and :math:`m` Lanczos steps from :math:`v` give the Gauss quadrature
:math:`v^\top f(A)v \approx \sum_j \tau_j f(\theta_j)` with nodes :math:`\theta_j` (Ritz values of
:math:`T_m`) and weights :math:`\tau_j = s_{1j}^2` (squared first components of its
eigenvectors, summing to 1). Averaging over probes and replacing each :math:`\delta` by a Gaussian
of width :math:`\sigma` gives a smooth density that integrates to 1:

.. math:: \hat\phi(t) = \frac1{n}\sum_{p=1}^{n}\sum_{j} \tau_{pj}\,
          \frac{1}{\sigma\sqrt{2\pi}} e^{-(t-\theta_{pj})^2 / (2\sigma^2)}.

Its mean :math:`\frac1n\sum_{pj}\tau_{pj}\theta_{pj}` is Hutchinson's estimate of
:math:`\operatorname{tr}(A)/P`.

All probes advance together: one batched operator product (``is_grads_batched``) per step serves
every probe, which is what makes SLQ cheap on top of graph reuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lr_batch_callback.lanczos import tridiagonal_eigh
from lr_batch_callback.operators import CurvatureOperator, NonFiniteCurvatureError

__all__ = ["SpectralDensity", "slq_quadrature", "broaden", "rademacher_probes"]

_MAX_GRID = 200_000


@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed spectral density and the quadrature it came from.

    Attributes:
        grid: points :math:`t` (float64, ascending).
        density: :math:`\\hat\\phi(t)` on the grid (float64), integrating to ≈ 1.
        nodes: Ritz values per probe, ``(num_probes, num_steps)``; padded with 0 where a probe's
            Krylov space was exhausted early (its weight there is 0).
        weights: the quadrature weights, same shape, each row summing to 1.
        sigma: the Gaussian broadening width, in eigenvalue units.
        num_products: operator-vector products used.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_products: int

    @property
    def num_probes(self) -> int:
        return int(self.nodes.shape[0])

    def integral(self) -> float:
        """Trapezoidal integral of the density over the grid (≈ 1)."""
        return float(torch.trapezoid(self.density, self.grid))

    def mean(self) -> float:
        """Quadrature estimate of :math:`\\operatorname{tr}(A)/P`."""
        return float((self.weights * self.nodes).sum() / self.num_probes)


def rademacher_probes(num_probes: int, dim: int, generator: torch.Generator) -> Tensor:
    """``num_probes`` Rademacher vectors scaled to unit norm, float64 on the CPU."""
    signs = torch.randint(0, 2, (num_probes, dim), generator=generator, dtype=torch.int8)
    return (signs.to(torch.float64) * 2 - 1) / math.sqrt(dim)


def _block_lanczos_steps(
    operator: CurvatureOperator, Q: Tensor, num_steps: int, reorthogonalize: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``num_steps`` Lanczos steps for each row of ``Q`` at once (independent Krylov spaces).

    Returns float64 ``alpha (n, m)``, ``beta (n, m)`` and the pre-orthogonalisation norms
    ``(n, m)`` used to detect breakdowns.
    """
    n, dim = Q.shape
    basis = torch.empty((n, num_steps, dim), device=Q.device, dtype=Q.dtype) if reorthogonalize else None
    alphas, betas, norms = [], [], []
    q_prev = torch.zeros_like(Q)
    b_prev = torch.zeros(n, dtype=Q.dtype, device=Q.device)
    tiny = torch.finfo(torch.float64).tiny
    for j in range(num_steps):
        if basis is not None:
            basis[:, j] = Q
        W = operator.matmat(Q)
        # Accumulate in float64 without float64 copies of the vectors.
        a = (W * Q).sum(dim=1, dtype=torch.float64)
        norms.append(torch.linalg.vector_norm(W, dim=1, dtype=torch.float64))
        alphas.append(a)
        if basis is not None:
            for _ in range(2):  # CGS2 against each probe's own basis
                for i in range(n):  # matrix-vector products: half the time of a bmm here
                    B = basis[i, : j + 1]
                    W[i] -= B.T @ (B @ W[i])
        else:
            W = W - a.to(Q.dtype).unsqueeze(1) * Q - b_prev.unsqueeze(1) * q_prev
        b = torch.linalg.vector_norm(W, dim=1, dtype=torch.float64)
        betas.append(b)
        q_prev, b_prev = Q, b.to(Q.dtype)
        Q = W / b.clamp_min(tiny).to(Q.dtype).unsqueeze(1)
    return torch.stack(alphas, 1), torch.stack(betas, 1), torch.stack(norms, 1)


def slq_quadrature(
    operator: CurvatureOperator,
    probes: Tensor,
    num_steps: int,
    *,
    batched: bool = True,
    reorthogonalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Gauss-quadrature nodes and weights for each probe (rows of ``probes``).

    Args:
        operator: the symmetric curvature operator.
        probes: ``(num_probes, P)`` unit start vectors (e.g. :func:`rademacher_probes`).
        num_steps: Lanczos steps per probe (capped at ``P``).
        batched: advance all probes with one batched product per step; ``False`` runs the probes
            one after another (same numbers, slower).
        reorthogonalize: full reorthogonalisation within each probe's Krylov space (memory
            ``num_probes × num_steps × P``); ``False`` uses the three-term recurrence only.

    Returns:
        ``(nodes, weights)``, float64 CPU tensors of shape ``(num_probes, num_steps)``.
    """
    num_steps = min(num_steps, operator.dim)
    Q = probes.to(device=operator.device, dtype=operator.dtype)
    if batched:
        alpha, beta, norm = _block_lanczos_steps(operator, Q, num_steps, reorthogonalize)
    else:
        parts = [_block_lanczos_steps(operator, Q[i : i + 1], num_steps, reorthogonalize)
                 for i in range(Q.shape[0])]
        alpha, beta, norm = (torch.cat([p[i] for p in parts]) for i in range(3))
    alpha, beta, norm = alpha.cpu(), beta.cpu(), norm.cpu()
    if not (torch.isfinite(alpha).all() and torch.isfinite(beta).all()):
        raise NonFiniteCurvatureError("Stochastic Lanczos quadrature produced non-finite values.")
    eps = torch.finfo(operator.dtype).eps
    nodes = torch.zeros_like(alpha)
    weights = torch.zeros_like(alpha)
    for p in range(alpha.shape[0]):
        m = num_steps
        for j in range(num_steps - 1):
            # Krylov space exhausted: later "steps" would be rounding noise.
            if beta[p, j] <= 100 * eps * max(float(norm[p, j]), abs(float(alpha[p, j])), 1e-300):
                m = j + 1
                break
        theta, S = tridiagonal_eigh(alpha[p, :m].tolist(), beta[p, : m - 1].tolist())
        nodes[p, :m] = theta
        weights[p, :m] = S[0] ** 2
    return nodes, weights


def default_sigma(nodes: Tensor, weights: Tensor) -> float:
    """1% of the spread of the weighted nodes (a fixed fraction, so densities compare across runs)."""
    live = nodes[weights > 0]
    spread = float(live.max() - live.min()) if live.numel() else 0.0
    if spread <= 0:
        spread = max(float(live.abs().max()) if live.numel() else 0.0, 1.0)
    return 0.01 * spread


def broaden(
    nodes: Tensor, weights: Tensor, sigma: float | None = None, grid_size: int = 1000,
    grid: Tensor | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Gaussian-broadened density on a grid from quadrature ``nodes`` and ``weights``.

    The default grid spans the nodes ±6σ with a step of at most σ/4, so that the trapezoidal
    integral of the density is 1 to better than 1e-6.

    Returns:
        ``(grid, density, sigma)``.
    """
    if sigma is None:
        sigma = default_sigma(nodes, weights)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma (the broadening width) must be positive and finite, got {sigma!r}.")
    live = weights > 0
    if grid is None:
        lo = float(nodes[live].min()) - 6 * sigma
        hi = float(nodes[live].max()) + 6 * sigma
        size = min(_MAX_GRID, max(grid_size, math.ceil((hi - lo) / (sigma / 4)) + 1))
        grid = torch.linspace(lo, hi, size, dtype=torch.float64)
    grid = grid.to(torch.float64)
    num_probes = nodes.shape[0]
    t = nodes[live].to(torch.float64)
    w = weights[live].to(torch.float64) / num_probes
    density = torch.zeros_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for start in range(0, t.numel(), 256):  # chunks bound memory at 256 × grid
        d = grid.unsqueeze(0) - t[start : start + 256].unsqueeze(1)
        density += (w[start : start + 256].unsqueeze(1) * torch.exp(-0.5 * (d / sigma) ** 2)).sum(0)
    return grid, density * norm, float(sigma)

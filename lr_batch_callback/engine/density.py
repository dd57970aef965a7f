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

The probes run on the package's one Lanczos kernel (:mod:`~lr_batch_callback.engine.krylov`);
on accelerators all probes advance together, one batched product (``is_grads_batched``) per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lr_batch_callback._checks import check_integer, check_positive_float
from lr_batch_callback.engine.krylov import LanczosRecurrence
from lr_batch_callback.engine.lanczos import tridiagonal_eigh
from lr_batch_callback.engine.linear_operator import CurvatureOperator, fresh_seed
from lr_batch_callback.engine.precision import autocast_off

__all__ = ["DEFAULT_PROBES", "DEFAULT_STEPS", "Quadrature", "SpectralDensity", "broaden",
           "rademacher_probes", "slq", "slq_quadrature"]

#: Probes and Lanczos steps per probe wherever none are given (functions and callbacks).
DEFAULT_PROBES = 4
DEFAULT_STEPS = 20

_MAX_GRID = 200_000


@dataclass(frozen=True)
class Quadrature:
    """Gauss-quadrature nodes and weights of stochastic Lanczos quadrature.

    Attributes:
        nodes: Ritz values per probe, ``(num_probes, num_steps)``; padded with 0 where a probe's
            Krylov space was exhausted early (its weight there is 0).
        weights: the quadrature weights, same shape, each row summing to 1.
        num_products: operator-vector products used.
    """

    nodes: Tensor
    weights: Tensor
    num_products: int

    def mean(self) -> float:
        r"""Quadrature estimate of :math:`\operatorname{tr}(A)/P`."""
        return float((self.weights * self.nodes).sum() / self.nodes.shape[0])

    def density(self, sigma: float | None = None, grid_size: int = 1000) -> SpectralDensity:
        """The Gaussian-broadened density (width ``sigma``, default :func:`default_sigma`)."""
        grid, values, used = broaden(self.nodes, self.weights, sigma, grid_size)
        return SpectralDensity(grid=grid, density=values, nodes=self.nodes, weights=self.weights,
                               sigma=used, num_products=self.num_products)


@dataclass(frozen=True)
class SpectralDensity:
    r"""A smoothed spectral density and the quadrature it came from.

    Attributes:
        grid: points :math:`t` (float64, ascending).
        density: :math:`\hat\phi(t)` on the grid (float64), integrating to ≈ 1.
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
        """The number of probe vectors (rows of ``nodes``)."""
        return int(self.nodes.shape[0])

    def integral(self) -> float:
        """Trapezoidal integral of the density over the grid (≈ 1)."""
        return float(torch.trapezoid(self.density, self.grid))

    def mean(self) -> float:
        r"""Quadrature estimate of :math:`\operatorname{tr}(A)/P`."""
        return float((self.weights * self.nodes).sum() / self.num_probes)


def rademacher_probes(num_probes: int, dim: int, generator: torch.Generator) -> Tensor:
    """``num_probes`` Rademacher vectors scaled to unit norm, float64 on the CPU."""
    signs = torch.randint(0, 2, (num_probes, dim), generator=generator, dtype=torch.int8)
    return (signs.to(torch.float64) * 2 - 1) / math.sqrt(dim)


def slq_quadrature(
    operator: CurvatureOperator,
    probes: Tensor,
    num_steps: int,
    *,
    batched: bool = True,
    reorthogonalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Gauss-quadrature nodes and weights for each probe (rows of ``probes``).

    Each probe is an independent chain of the Lanczos kernel
    (:class:`~lr_batch_callback.engine.krylov.LanczosRecurrence`, block size 1). A chain whose
    Krylov space is exhausted early (an invariant subspace) stops there: its later nodes get
    weight 0.

    Args:
        operator: the symmetric curvature operator.
        probes: ``(num_probes, P)`` unit start vectors (e.g. :func:`rademacher_probes`).
        num_steps: Lanczos steps per probe (capped at ``P``).
        batched: advance all probes with one batched product per step; ``False`` runs the probes
            one after another (same numbers).
        reorthogonalize: full reorthogonalisation within each probe's Krylov space (memory
            ``num_probes × num_steps × P``); ``False`` uses the three-term recurrence only.

    Returns:
        ``(nodes, weights)``, float64 CPU tensors of shape ``(num_probes, num_steps)``.
    """
    with autocast_off({operator.device.type, "cpu"}):
        return _quadrature(operator, probes, min(check_integer(num_steps, "num_steps"),
                                                 operator.dim), batched, reorthogonalize)


def _quadrature(operator: CurvatureOperator, probes: Tensor, num_steps: int, batched: bool,
                reorthogonalize: bool) -> tuple[Tensor, Tensor]:
    Q = probes.to(device=operator.device, dtype=operator.dtype)
    groups = [Q] if batched else [Q[i : i + 1] for i in range(Q.shape[0])]
    nodes = torch.zeros((Q.shape[0], num_steps), dtype=torch.float64)
    weights = torch.zeros_like(nodes)
    row = 0
    for group in groups:
        rec = LanczosRecurrence(operator, group.unsqueeze(1),
                                capacity=num_steps if reorthogonalize else None,
                                generator=torch.Generator().manual_seed(0))
        for _ in range(num_steps):
            rec.step()
        diag, off = rec.coefficients()
        for c in range(group.shape[0]):
            stop = rec.breakdown[c]
            m = num_steps if stop is None else stop + 1
            theta, S = tridiagonal_eigh(diag[c, :m, 0, 0].tolist(), off[c, : m - 1, 0, 0].tolist())
            nodes[row, :m] = theta
            weights[row, :m] = S[0] ** 2
            row += 1
    return nodes, weights


def slq(
    operator: CurvatureOperator,
    num_probes: int = DEFAULT_PROBES,
    num_steps: int = DEFAULT_STEPS,
    *,
    seed: int | None = None,
    batched: bool | None = None,
    reorthogonalize: bool = True,
) -> Quadrature:
    """Stochastic Lanczos quadrature of ``operator`` with Rademacher probes.

    Args:
        operator: the symmetric operator.
        num_probes: probe vectors (the variance of the estimate falls like 1/n).
        num_steps: Lanczos steps per probe (quadrature nodes per probe).
        seed: seed of the probes (``None``: fresh randomness, rank 0's under distribution).
        batched: advance all probes together, one (vmap-)batched product per step; ``False``
            runs the probes one after another. Default: together on accelerators; one after
            another on CPU, where products are looped anyway and the joint basis would only cost
            memory (``num_probes`` times more).
        reorthogonalize: full reorthogonalisation per probe.

    Returns:
        The :class:`Quadrature` (nodes, weights, products used); ``.density()`` broadens it.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> q = slq(CurvatureOperator.from_matrix(A), num_probes=2, num_steps=3, seed=0)
        >>> round(q.mean(), 6)  # tr(A)/P
        2.0
    """
    check_integer(num_probes, "num_probes")
    check_integer(num_steps, "num_steps")
    if seed is None:
        seed = fresh_seed(operator)
    probes = rademacher_probes(num_probes, operator.dim, torch.Generator().manual_seed(seed))
    if batched is None:
        batched = operator.device.type != "cpu"
    before = operator.num_products
    nodes, weights = slq_quadrature(operator, probes, num_steps, batched=batched,
                                    reorthogonalize=reorthogonalize)
    return Quadrature(nodes=nodes, weights=weights, num_products=operator.num_products - before)


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
    sigma = default_sigma(nodes, weights) if sigma is None else check_positive_float(sigma, "sigma")
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

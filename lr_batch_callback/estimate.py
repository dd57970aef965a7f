"""The public estimates: top eigenvalues and spectral density of a model's batch curvature.

Each call isolates the model (:func:`~lr_batch_callback.isolation.isolated`), builds the curvature
operator on the batch once (:mod:`~lr_batch_callback.operators`), and runs Lanczos
(:mod:`~lr_batch_callback.lanczos`) or stochastic Lanczos quadrature
(:mod:`~lr_batch_callback.density`) on it, on the model's own device and dtype.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lr_batch_callback.batching import BatchSizeFn, split_batch
from lr_batch_callback.density import SpectralDensity, broaden, rademacher_probes, slq_quadrature
from lr_batch_callback.isolation import isolated
from lr_batch_callback.lanczos import LanczosResult, Which, lanczos
from lr_batch_callback.operators import LossFn, make_operator

__all__ = ["EigenResult", "hessian_eigenvalues", "spectral_density"]


@dataclass(frozen=True)
class EigenResult(LanczosResult):
    """A :class:`~lr_batch_callback.lanczos.LanczosResult` plus what was measured.

    Attributes:
        curvature: ``"hessian"`` or ``"ggn"``.
        num_samples: samples the curvature was averaged over (this process's batches).
        seconds: wall time of the estimate, graph construction included.
    """

    curvature: str = "hessian"
    num_samples: int = 0
    seconds: float = 0.0


def _batches(batch: Any, batches: Sequence[Any] | None, micro_batch_size: int | None) -> list[Any]:
    if batches is not None:
        if batch is not None:
            raise ValueError("Pass either `batch` or `batches=`, not both.")
        items = list(batches)
    else:
        if batch is None:
            raise ValueError("No data: pass a `batch` (or a list of them as `batches=`).")
        items = [batch]
    if micro_batch_size is not None:
        items = [part for item in items for part in split_batch(item, micro_batch_size)]
    return items


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any = None,
    *,
    k: int = 1,
    curvature: str = "hessian",
    which: Which = "largest",
    tol: float = 1e-4,
    max_iter: int | None = None,
    seed: int | None = None,
    params: Sequence[Tensor] | None = None,
    v0: Tensor | None = None,
    return_eigenvectors: bool = False,
    batches: Sequence[Any] | None = None,
    micro_batch_size: int | None = None,
    keep_graphs: bool = True,
    batch_size_fn: BatchSizeFn | None = None,
    distributed: bool = False,
    check_every: int | None = None,
    warn_unconverged: bool = True,
) -> EigenResult:
    r"""Extremal eigenvalues of the batch Hessian (or GGN) of ``loss_fn`` at the model's weights.

    The model is called as it is (train mode: BatchNorm on batch statistics, one fixed dropout
    mask for the whole run) and left exactly as it was: mode, BatchNorm statistics, RNG states,
    ``requires_grad`` and ``.grad`` are restored, also on error.

    Args:
        model: the network, on any device.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss over the batch.
        batch: the batch (on the model's device), passed to ``loss_fn`` unchanged.
        k: how many eigenvalues at each wanted end of the spectrum.
        curvature: ``"hessian"`` or ``"ggn"`` (Generalised Gauss-Newton :math:`J^\top H_f J`).
        which: ``"largest"``, ``"smallest"`` (most negative) or ``"both"``.
        tol: relative Ritz-residual tolerance; an eigenvalue's error is at most its residual.
        max_iter: cap on Lanczos steps (products); default ``min(P, max(100, 10k))``.
        seed: seed of the random start vector.
        params: the parameters to differentiate (default: all trainable ones); e.g. one layer's.
        v0: a start vector of length P, e.g. the previous call's top eigenvector (warm start).
        return_eigenvectors: also return the Ritz vectors (rows).
        batches: several batches instead of ``batch``; the curvature is their sample-weighted mean.
        micro_batch_size: split each batch into micro-batches of at most this many samples
            (weighted by sample count; exact for losses that average over samples without
            cross-sample terms — not for BatchNorm in train mode).
        keep_graphs: reuse each batch's gradient graph for every product (fast); ``False``
            rebuilds it per product to save memory.
        batch_size_fn: counts the samples in a batch (default: leading tensor dimension).
        distributed: average the curvature over all ranks of ``torch.distributed``.
        check_every: Lanczos steps between stopping tests (host synchronisations).
        warn_unconverged: warn when ``max_iter`` is hit before ``tol``.

    Returns:
        An :class:`EigenResult`: ``eigenvalues`` (float64, largest first), ``converged``,
        ``residuals``, ``num_products``, ...

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> batch = (torch.randn(32, 4), torch.randn(32, 1))
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> res = hessian_eigenvalues(model, loss_fn, batch, k=2, seed=0)
        >>> res.eigenvalues.shape, res.converged
        (torch.Size([2]), True)
    """
    items = _batches(batch, batches, micro_batch_size)
    start = time.perf_counter()
    with isolated(model):
        operator = make_operator(
            curvature, model, loss_fn, items, params=params, keep_graphs=keep_graphs,
            batch_size_fn=batch_size_fn, distributed=distributed,
        )
        result = lanczos(
            operator, k, which=which, tol=tol, max_iter=max_iter, v0=v0, seed=seed,
            check_every=check_every, return_eigenvectors=return_eigenvectors,
            warn_unconverged=warn_unconverged,
        )
        num_samples = sum(operator.sample_counts)
        del operator
    fields = {f: getattr(result, f) for f in result.__dataclass_fields__}
    return EigenResult(**fields, curvature=curvature, num_samples=num_samples,
                       seconds=time.perf_counter() - start)


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any = None,
    *,
    curvature: str = "hessian",
    num_probes: int = 8,
    num_steps: int = 30,
    sigma: float | None = None,
    grid_size: int = 1000,
    seed: int | None = None,
    params: Sequence[Tensor] | None = None,
    batched: bool | None = None,
    reorthogonalize: bool = True,
    batches: Sequence[Any] | None = None,
    micro_batch_size: int | None = None,
    keep_graphs: bool = True,
    batch_size_fn: BatchSizeFn | None = None,
    distributed: bool = False,
) -> SpectralDensity:
    r"""Spectral density of the batch Hessian (or GGN) by stochastic Lanczos quadrature.

    Side effects are undone exactly as in :func:`hessian_eigenvalues`.

    Args:
        model, loss_fn, batch, curvature, params, batches, micro_batch_size, keep_graphs,
            batch_size_fn, distributed: as in :func:`hessian_eigenvalues`.
        num_probes: Rademacher probe vectors (the variance of the estimate falls like 1/n).
        num_steps: Lanczos steps per probe (quadrature nodes per probe).
        sigma: Gaussian broadening width in eigenvalue units; default 1% of the nodes' spread.
            The value used is stored on the result.
        grid_size: minimum number of grid points (more are used when ``sigma`` needs them).
        seed: seed of the probes.
        batched: advance all probes together, one (vmap-)batched product per step; ``False``
            runs the probes one after another. Default: together on accelerators; one after
            another on CPU, where products are looped anyway and the joint basis would only cost
            memory (``num_probes`` times more).
        reorthogonalize: full reorthogonalisation per probe (memory ``num_probes·num_steps·P``).

    Returns:
        A :class:`~lr_batch_callback.density.SpectralDensity`: ``grid``, ``density``
        (integrating to ≈1), ``nodes``, ``weights``, ``sigma``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> batch = (torch.randn(32, 4), torch.randn(32, 1))
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> sd = spectral_density(model, loss_fn, batch, num_probes=4, num_steps=10, seed=0)
        >>> abs(sd.integral() - 1) < 1e-3
        True
    """
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    items = _batches(batch, batches, micro_batch_size)
    with isolated(model):
        operator = make_operator(
            curvature, model, loss_fn, items, params=params, keep_graphs=keep_graphs,
            batch_size_fn=batch_size_fn, distributed=distributed,
        )
        if seed is None:
            seed_tensor = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(operator.device)
            seed = int(operator.broadcast_(seed_tensor).item())
        probes = rademacher_probes(num_probes, operator.dim, torch.Generator().manual_seed(seed))
        if batched is None:
            batched = operator.device.type != "cpu"
        nodes, weights = slq_quadrature(operator, probes, num_steps, batched=batched,
                                        reorthogonalize=reorthogonalize)
        products = operator.num_products
        del operator
    grid, density, used_sigma = broaden(nodes, weights, sigma, grid_size)
    return SpectralDensity(grid=grid, density=density, nodes=nodes, weights=weights,
                           sigma=used_sigma, num_products=products)

"""The convenience estimates: top eigenvalues and spectral density of a model's batch curvature.

Each call builds the curvature operator once on the batch
(:class:`~lr_batch_callback.engine.operators.HessianOperator` or
:class:`~lr_batch_callback.engine.operators.GGNOperator`, which isolate the model themselves) and
runs :func:`~lr_batch_callback.engine.lanczos.lanczos` or
:func:`~lr_batch_callback.engine.density.slq` on it, on the model's own device and dtype. For
several batches, warm starts, eigenvectors or one graph serving several algorithms, build the
operator yourself and call the algorithms directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor, nn

from lr_batch_callback._checks import check_bool, check_integer
from lr_batch_callback.engine.batching import BatchSizeFn
from lr_batch_callback.engine.density import DEFAULT_PROBES, DEFAULT_STEPS, SpectralDensity, slq
from lr_batch_callback.engine.lanczos import DEFAULT_TOL, LanczosResult, Which, lanczos
from lr_batch_callback.engine.operators import LossFn, OutputSelector, _ModelCurvature
from lr_batch_callback.engine.products import build_operator, check_product
from lr_batch_callback.engine.weights import WeightFn

__all__ = ["EigenResult", "OperatorOptions", "hessian_eigenvalues", "spectral_density"]


@dataclass(frozen=True)
class OperatorOptions:
    """How the curvature operator is built from the model and the batch.

    Attributes:
        params: the parameters to differentiate (default: all trainable ones), e.g. one layer's.
        micro_batch_size: split the batch into micro-batches of at most this many samples,
            weighted by sample count (exact for losses that average over samples without
            cross-sample terms — not for BatchNorm in train mode).
        keep_graphs: reuse the gradient graph for every product (fast); ``False`` rebuilds it
            per product to save memory.
        batch_size_fn: counts the samples in a batch (default: leading tensor dimension).
        weight_fn: counts what the loss averages over in a micro-batch, to weigh micro-batches
            (default: the valid ``labels`` tokens of mapping batches, else samples; a split
            batch with ``-100`` labels elsewhere is refused without it).
        distributed: average the curvature over all ranks of ``torch.distributed``.
        ggn_output: for ``curvature="ggn"`` on a model returning several tensors, the one the
            loss consumes (an index, a key or a function of the return value).
        product: how curvature products are computed (:mod:`~lr_batch_callback.engine.products`):
            ``"exact"`` (double backward), ``"finite_difference"`` (first-order gradients
            only; Hessian of smooth losses, about 1e-3 of the radius in float32), ``"auto"``
            (exact, else finite differences where double backward is unavailable) or
            ``"fastest"`` (finite differences where the loss is smooth and ``tol`` allows them,
            else as ``"auto"``).
        step: the finite-difference step (default
            :func:`~lr_batch_callback.engine.finite_difference.default_step`).
    """

    params: Sequence[Tensor] | None = None
    micro_batch_size: int | None = None
    keep_graphs: bool = True
    batch_size_fn: BatchSizeFn | None = None
    weight_fn: WeightFn | None = None
    distributed: bool = False
    ggn_output: OutputSelector = None
    product: str = "exact"
    step: float | None = None

    def __post_init__(self) -> None:
        check_product(self.product, step=self.step)
        check_integer(self.micro_batch_size, "micro_batch_size", allow_none=True)
        check_bool(self.keep_graphs, "keep_graphs")
        check_bool(self.distributed, "distributed")

    def build(self, curvature: str, model: nn.Module, loss_fn: LossFn, batches: Sequence[Any],
              tol: float | None = None) -> _ModelCurvature:
        """The operator of ``curvature`` on ``batches`` with these options.

        ``tol`` is the accuracy the eigenvalues will be asked for, which ``product="fastest"``
        decides by.
        """
        return build_operator(
            curvature, self.product, model, loss_fn, batches, step=self.step, tol=tol,
            params=self.params,
            micro_batch_size=self.micro_batch_size, keep_graphs=self.keep_graphs,
            batch_size_fn=self.batch_size_fn, weight_fn=self.weight_fn,
            distributed=self.distributed,
            ggn_output=self.ggn_output,
        )


@dataclass(frozen=True)
class EigenResult(LanczosResult):
    """A :class:`~lr_batch_callback.engine.lanczos.LanczosResult` plus what was measured.

    Attributes:
        curvature: ``"hessian"`` or ``"ggn"``.
        num_samples: samples the curvature was averaged over (this process's batches).
        num_tokens: label tokens it was averaged over, for token-averaged LM losses (batches
            with ``labels``, :mod:`~lr_batch_callback.engine.weights`); else ``None``.
        seconds: wall time of the estimate, graph construction included.
        product: how the products were computed: ``"exact"`` or ``"finite_difference"`` (what
            ``product="auto"`` chose).
    """

    curvature: str = "hessian"
    num_samples: int = 0
    num_tokens: int | None = None
    seconds: float = 0.0
    product: str = "exact"


def _data(batch: Any) -> list[Any]:
    if batch is None:
        raise ValueError("No data: pass a `batch` (for several batches build a HessianOperator "
                         "or GGNOperator on the list and call lanczos/slq on it).")
    return [batch]


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any = None,
    *,
    k: int = 1,
    curvature: str = "hessian",
    which: Which = "largest",
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    seed: int | None = None,
    options: OperatorOptions | None = None,
) -> EigenResult:
    r"""Extremal eigenvalues of the batch Hessian (or GGN) of ``loss_fn`` at the model's weights.

    The model is called as it is (train mode: BatchNorm on batch statistics, one fixed dropout
    mask for the whole run) and left exactly as it was: mode, BatchNorm statistics, RNG states,
    ``requires_grad`` and ``.grad`` are restored, also on error. Attention, Hardsigmoid,
    weight-norm and cuDNN RNNs run on twice-differentiable substitutes during the estimate.

    Args:
        model: the network, on any device.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss over the batch.
        batch: the batch (on the model's device), passed to ``loss_fn`` unchanged.
        k: how many eigenvalues at each wanted end of the spectrum (with multiplicities).
        curvature: ``"hessian"`` or ``"ggn"`` (Generalised Gauss-Newton :math:`J^\top H_f J`).
        which: ``"largest"``, ``"smallest"`` (most negative) or ``"both"``.
        tol: relative tolerance on each eigenvalue's error bound.
        max_iter: cap on curvature products; default ``min(P, max(100, 10k))``.
        seed: seed of the random start vectors.
        options: how the operator is built (:class:`OperatorOptions`: parameter subset,
            micro-batches, graph reuse, distribution, the GGN's output).

    Returns:
        An :class:`EigenResult`: ``eigenvalues`` (float64, largest first), ``converged``,
        ``error_bounds``, ``num_products``, ...

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> batch = (torch.randn(32, 4), torch.randn(32, 1))
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> res = hessian_eigenvalues(model, loss_fn, batch, k=2, seed=0)
        >>> res.eigenvalues.shape, res.converged
        (torch.Size([2]), True)
    """
    opts = options or OperatorOptions()
    start = time.perf_counter()
    with opts.build(curvature, model, loss_fn, _data(batch), tol=tol) as operator:
        result = lanczos(operator, k, which=which, tol=tol, max_iter=max_iter, seed=seed)
        num_samples, num_tokens = operator.local_samples, operator.total_tokens
        product = operator.product
    values = {f.name: getattr(result, f.name) for f in fields(result)}
    return EigenResult(**values, curvature=curvature, num_samples=num_samples,
                       num_tokens=num_tokens, seconds=time.perf_counter() - start,
                       product=product)


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any = None,
    *,
    curvature: str = "hessian",
    num_probes: int = DEFAULT_PROBES,
    num_steps: int = DEFAULT_STEPS,
    sigma: float | None = None,
    grid_size: int = 1000,
    seed: int | None = None,
    options: OperatorOptions | None = None,
) -> SpectralDensity:
    r"""Spectral density of the batch Hessian (or GGN) by stochastic Lanczos quadrature.

    Side effects are undone exactly as in :func:`hessian_eigenvalues`.

    Args:
        model: the network, on any device (as in :func:`hessian_eigenvalues`).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss over the batch.
        batch: the batch (on the model's device), passed to ``loss_fn`` unchanged.
        curvature: ``"hessian"`` or ``"ggn"`` (Generalised Gauss-Newton :math:`J^\top H_f J`).
        num_probes: Rademacher probe vectors (the variance of the estimate falls like 1/n).
        num_steps: Lanczos steps per probe (quadrature nodes per probe).
        sigma: Gaussian broadening width in eigenvalue units; default 1% of the nodes' spread.
            The value used is stored on the result.
        grid_size: minimum number of grid points (more are used when ``sigma`` needs them).
        seed: seed of the probes.
        options: how the operator is built (:class:`OperatorOptions`), as in
            :func:`hessian_eigenvalues`.

    Returns:
        A :class:`~lr_batch_callback.engine.density.SpectralDensity`: ``grid``, ``density``
        (integrating to ≈1), ``nodes``, ``weights``, ``sigma``.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> batch = (torch.randn(32, 4), torch.randn(32, 1))
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> sd = spectral_density(model, loss_fn, batch, num_probes=4, num_steps=10, seed=0)
        >>> abs(sd.integral() - 1) < 1e-3
        True
    """
    check_integer(num_probes, "num_probes")
    check_integer(num_steps, "num_steps")
    opts = options or OperatorOptions()
    with opts.build(curvature, model, loss_fn, _data(batch)) as operator:
        quadrature = slq(operator, num_probes, num_steps, seed=seed)
    return quadrature.density(sigma, grid_size)

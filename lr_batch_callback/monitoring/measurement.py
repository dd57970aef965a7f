"""One spectrum measurement during training: what it contains and how it is computed.

:class:`MonitorConfig` says what a measurement measures; :func:`measure_spectrum` builds the
curvature operator on the batch *once* and runs on it everything that is due — λ_max (every
time), λ_min (every ``lambda_min_every``-th), the density (every ``density_every``-th), the
critical sharpness and, when asked for Adam-family optimizers, the preconditioned sharpness —
returning a typed
:class:`~lr_batch_callback.monitoring.record.SpectrumRecord` and the measured costs. Nothing here knows
Lightning; the :class:`~lr_batch_callback.callbacks.SpectrumMonitor` callback decides when.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lr_batch_callback._checks import (
    check_bool,
    check_curvature,
    check_fraction,
    check_integer,
    check_positive_float,
)
from lr_batch_callback.engine.batching import BatchSizeFn
from lr_batch_callback.engine.critical import LineLoss
from lr_batch_callback.engine.density import DEFAULT_PROBES, DEFAULT_STEPS, slq
from lr_batch_callback.engine.lanczos import LanczosOptions, lanczos
from lr_batch_callback.engine.operators import CurvatureOperator, LossFn, _ModelCurvature
from lr_batch_callback.engine.products import base_gradient, build_operator, check_product
from lr_batch_callback.engine.sharded import ShardedLineLoss, is_sharded
from lr_batch_callback.monitoring.critical import critical_ratio, measure_critical
from lr_batch_callback.monitoring.directions import adam_preconditioner
from lr_batch_callback.monitoring.record import (
    DensityQuadrature,
    SpectrumEstimate,
    SpectrumRecord,
    TrainingContext,
)
from lr_batch_callback.monitoring.stability import stability
from lr_batch_callback.scaling.optimizers import is_adaptive

__all__ = ["MONITOR_TOL", "MeasurementCost", "MonitorConfig", "Parts", "TrainingState",
           "adam_preconditioner", "measure_spectrum"]

#: The monitor's eigenvalue tolerance: 1%, well inside the batch-to-batch scatter of λ_max
#: (tens of percent), and a few products fewer than the functions' 1e-3 needs.
MONITOR_TOL = 1e-2


@dataclass(frozen=True)
class MonitorConfig:
    """What each spectrum measurement of a training run contains, and its budget.

    Attributes:
        curvature: ``"hessian"`` or ``"ggn"``.
        k: number of top eigenvalues.
        tol: relative tolerance of each eigenvalue's error bound (1% by default, well inside
            the batch-to-batch scatter of λ_max; a looser tolerance takes fewer products).
        max_iter: cap on products per Lanczos run.
        lambda_min_every: include λ_min (the most negative eigenvalue) in every this many
            measurements; 0 (the default): never. λ_min sits at the edge of the bulk and needs
            many times the products of λ_max: raise ``max_iter`` (e.g. to 100) with it, or it
            stops at the cap with ``converged=False``.
        density_every: include the spectral density in every this many measurements (the
            default 20: every 5,000 steps at the default cadence); 0: never. A density costs
            ``density_probes × density_steps`` products, about 20 λ_max measurements.
        density_probes: SLQ probe vectors of a density.
        density_steps: Lanczos steps per probe of a density.
        max_overhead: fraction of training time measurements may take; over budget they are
            postponed (the cadence stretches). ``None``: no budget.
        save_spectra: write each measurement as a JSON file into the loggers' runs.
        critical_sharpness: also measure the critical sharpness along the (preconditioned)
            gradient and along the optimizer's actual update (forward passes only: one gradient,
            then about 3 forward passes per direction; :mod:`~lr_batch_callback.engine.critical`).
        preconditioned_sharpness: also measure Adam's preconditioned sharpness
            λ_max(P⁻¹H) (Adam-family optimizers; a second eigenproblem, about as dear as the
            first, with exact products; it feeds ``hessian/stability`` for Adam). Off by default:
            on a large model it alone costs many training steps, and the critical
            sharpness along −P⁻¹g ranks Adam's failed runs as well (README, Critical sharpness). With
            product='finite_difference' it is not measured (exact products only).
        guard: after a batch-size increase, cap the first optimizer's LR factor at the edge of
            stability measured right after the change (:mod:`~lr_batch_callback.monitoring.guard`;
            SGD family; Adam family only with ``preconditioned_sharpness=True``). Needs an LR
            scaling part and ``monitor_on_batch_size_change``; the cap holds until the next change.
        product: how curvature products are computed (:mod:`~lr_batch_callback.engine.products`):
            ``"fastest"`` (the default: forward differences of first-order gradients where the
            loss is smooth and ``tol`` allows them, about 1e-3 of the radius in float32, at one
            forward+backward per product; else the exact product; else differences where double
            backward is unavailable, FSDP2 shards included), ``"auto"`` (exact wherever double
            backward exists), ``"exact"`` or ``"finite_difference"``. Records say which ran.
    """

    curvature: str = "hessian"
    k: int = 1
    tol: float = MONITOR_TOL
    max_iter: int = 30
    lambda_min_every: int = 0
    density_every: int = 20
    density_probes: int = DEFAULT_PROBES
    density_steps: int = DEFAULT_STEPS
    max_overhead: float | None = 0.05
    save_spectra: bool = True
    critical_sharpness: bool = True
    preconditioned_sharpness: bool = False
    product: str = "fastest"
    guard: bool = True

    def __post_init__(self) -> None:
        check_curvature(self.curvature)
        check_product(self.product, self.curvature)
        check_integer(self.k, "k")
        check_positive_float(self.tol, "tol", example="1e-3")
        wanted = 2 * self.k if self.lambda_min_every else self.k
        check_integer(self.max_iter, "max_iter", minimum=wanted,
                      hint=f"at least the {wanted} eigenvalues a measurement may ask for")
        check_integer(self.lambda_min_every, "lambda_min_every", minimum=0, hint="0 never measures λ_min")
        check_integer(self.density_every, "density_every", minimum=0, hint="0 never measures it")
        check_integer(self.density_probes, "density_probes")
        check_integer(self.density_steps, "density_steps")
        check_fraction(self.max_overhead, "max_overhead", allow_none=True, meaning="no budget")
        check_bool(self.save_spectra, "save_spectra")
        check_bool(self.critical_sharpness, "critical_sharpness")
        check_bool(self.preconditioned_sharpness, "preconditioned_sharpness")
        check_bool(self.guard, "guard")


@dataclass(frozen=True)
class MeasurementCost:
    """Seconds spent building the operator and per curvature product (for the budget)."""

    build_seconds: float
    seconds_per_product: float


def _preconditioned(operator: CurvatureOperator, scale: Tensor) -> CurvatureOperator:
    """The operator :math:`S A S` for the diagonal ``scale`` :math:`S = P^{-1/2}`.

    It is symmetric, and similar to :math:`P^{-1}A`.
    """
    return CurvatureOperator.from_function(lambda V: operator.matmat(V * scale) * scale,
                                           operator.dim, dtype=operator.dtype,
                                           device=operator.device)


@dataclass(frozen=True)
class Parts:
    """The occasional parts a measurement includes besides λ_max."""

    lambda_min: bool = False
    density: bool = False


@dataclass(frozen=True)
class TrainingState:
    """What the run says about itself at a measurement (the record's step, epoch and context).

    Attributes:
        step: the optimizer step after which the measurement runs.
        epoch: the epoch.
        effective_batch_size: samples per optimizer step, when known.
        optimizer: the (first) optimizer (the update direction of the critical sharpness; Adam's
            preconditioner).
        lr: the learning rate its next step uses (first param group, batch-size factor included).
        lr_factor: the batch-size LR factor in force.
    """

    step: int = 0
    epoch: int = 0
    effective_batch_size: int | None = None
    optimizer: torch.optim.Optimizer | None = None
    lr: float | None = None
    lr_factor: float = 1.0


def measure_spectrum(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    config: MonitorConfig,
    *,
    state: TrainingState,
    parts: Parts,
    seed: int,
    distributed: bool = False,
    batch_size_fn: BatchSizeFn | None = None,
) -> tuple[SpectrumRecord, MeasurementCost]:
    """Measure the spectrum of ``model``'s batch curvature on ``batch`` (one graph build).

    Args:
        model: the network, as :func:`~lr_batch_callback.hessian_eigenvalues` takes it.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss over the batch.
        batch: the batch (on the model's device), passed to ``loss_fn`` unchanged.
        config: what to measure.
        state: the run at this point: the record's step, epoch and context; with an
            Adam-family optimizer the preconditioned sharpness is measured too.
        parts: which of the occasional parts this measurement has.
        seed: seeds the start vectors and the probes.
        distributed: average over the ranks of the default process group.
        batch_size_fn: counts the samples of a batch.

    Returns:
        ``(record, cost)``: the complete record, and the measured costs for the budget.
    """
    begin = time.perf_counter()
    preconditioned = (config.preconditioned_sharpness and state.optimizer is not None
                      and bool(is_adaptive(state.optimizer)))
    # The preconditioned eigenproblem needs exact products (see _preconditioned_sharpness): then
    # "fastest" gets no tolerance to trade, and chooses as "auto".
    operator = build_operator(config.curvature, config.product, model, loss_fn, [batch],
                              tol=None if preconditioned else config.tol,
                              batch_size_fn=batch_size_fn, distributed=distributed)
    built = time.perf_counter()
    with operator:
        quiet = LanczosOptions(warn_unconverged=False)
        result = lanczos(operator, config.k, which="both" if parts.lambda_min else "largest",
                         tol=config.tol, max_iter=config.max_iter, seed=seed, options=quiet)
        density = _density(operator, config, seed) if parts.density else None
        # Sharded (FSDP2) parameters have no exact product, which this eigenproblem needs.
        sharpness = (_preconditioned_sharpness(operator, config, state.optimizer, seed)
                     if preconditioned and operator.product == "exact" else None)
        products = operator.num_products
        samples, tokens = int(operator.total_samples), operator.total_tokens
        product = operator.product
        line = _line_loss(model, loss_fn, operator)
    spectral = time.perf_counter()
    critical = measure_critical(line, state) if config.critical_sharpness else None
    seconds = time.perf_counter() - begin
    values = result.eigenvalues.tolist()
    estimate = SpectrumEstimate(
        eigenvalues=values[: config.k], lambda_min=float(values[-1]) if parts.lambda_min else None,
        error_bounds=result.error_bounds.tolist(), converged=bool(result.converged),
        num_products=products, seconds=seconds, num_samples=samples, num_tokens=tokens,
        preconditioned_lambda_max=sharpness, critical=critical is not None,
        critical_sharpness=critical.gradient if critical else None,
        critical_sharpness_update=critical.update if critical else None,
        critical_passes=critical.passes if critical else 0, product=product,
    )
    record = SpectrumRecord(step=state.step, epoch=state.epoch, curvature=config.curvature,
                            estimate=estimate, context=_context(state, estimate), density=density)
    # The line searches are a fixed cost per measurement, like the graph build.
    fixed = (built - begin) + (seconds - (spectral - begin))
    cost = MeasurementCost(build_seconds=fixed,
                           seconds_per_product=(spectral - built) / max(products, 1))
    return record, cost


def _line_loss(model: nn.Module, loss_fn: LossFn, operator: _ModelCurvature) -> LineLoss:
    """The critical-sharpness line on the operator's (micro-)batches, weights and parameters.

    It reuses the gradient at θ0 that the operator holds; on FSDP2 shards it works on each
    rank's rows.
    """
    if is_sharded(operator.params):
        return ShardedLineLoss(model, loss_fn, operator.batches, operator.weights,
                               params=operator.params, gradient=base_gradient(operator))
    return LineLoss(model, loss_fn, operator.batches, operator.weights, params=operator.params,
                    distributed=operator.distributed, gradient=base_gradient(operator))


def _context(state: TrainingState, estimate: SpectrumEstimate) -> TrainingContext:
    """The run's context of a record: batch size, LR, factor and the stability ratios."""
    return TrainingContext(
        effective_batch_size=state.effective_batch_size, lr=state.lr, lr_factor=state.lr_factor,
        stability=stability(state.optimizer, state.lr, estimate),
        critical_ratio=critical_ratio(state.lr, estimate.critical_sharpness),
        critical_ratio_update=critical_ratio(state.lr, estimate.critical_sharpness_update))


def _density(operator: CurvatureOperator, config: MonitorConfig, seed: int) -> DensityQuadrature:
    quadrature = slq(operator, config.density_probes, config.density_steps, seed=10_000 + seed)
    return DensityQuadrature(nodes=quadrature.nodes.tolist(), weights=quadrature.weights.tolist(),
                             sigma=quadrature.density().sigma, num_products=quadrature.num_products)


def _preconditioned_sharpness(operator: _ModelCurvature, config: MonitorConfig,
                              optimizer: torch.optim.Optimizer | None, seed: int) -> float | None:
    r"""λ_max of :math:`P^{-1/2} H P^{-1/2}` for Adam-family optimizers; ``None`` otherwise.

    Exact products only: :math:`P^{-1/2}` reaches :math:`1/\sqrt{\epsilon}` on parameters with
    no second moment yet (embedding rows of unseen tokens), and it multiplies the rounding of a
    difference of gradients: on a GPT-like transformer the preconditioned difference operator
    was asymmetric by 0.2–0.4 of its radius.
    """
    if optimizer is None or not is_adaptive(optimizer):
        return None
    scale = adam_preconditioner(optimizer, list(operator.params))
    if scale is None:
        return None
    pre = lanczos(_preconditioned(operator, scale.to(operator.device, operator.dtype)),
                  tol=config.tol, max_iter=config.max_iter, seed=20_000 + seed,
                  options=LanczosOptions(warn_unconverged=False))
    return float(pre.eigenvalues[0])

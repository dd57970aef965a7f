"""Periodic spectrum measurements for a training run: what to measure, when, and at what cost.

:class:`SpectrumMonitor` knows nothing of Lightning's hooks; the callback asks it whether a
measurement is due (schedule and time budget), hands it the model, the batch and the loss, and
receives a flat dict of metrics plus a record for the spectra file. Any failure inside an
estimate becomes a warning and a skipped measurement: it never stops training.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lr_batch_callback.estimate import hessian_eigenvalues, spectral_density

__all__ = ["MonitorConfig", "SpectrumMonitor", "metric_keys", "PRODUCT_COST_IN_STEPS"]

# A curvature product costs 1.5-2.6 gradient steps (BENCHMARKS.md); a training step is a
# gradient step plus the optimizer and the loop's own work, so 2 training steps errs on the
# safe side. Only the first measurement is priced this way; later ones use measured costs.
PRODUCT_COST_IN_STEPS = 2.0

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class MonitorConfig:
    """Settings of the spectrum measurements (see :class:`BatchSizeLRCallback` for each)."""

    every_n_steps: int | None = 250
    curvature: str = "hessian"
    k: int = 1
    smallest: bool = True
    tol: float = 1e-3
    max_iter: int = 30
    density_every: int = 4
    density_probes: int = 4
    density_steps: int = 20
    max_overhead: float | None = 0.05


def metric_keys(curvature: str, k: int, smallest: bool) -> list[str]:
    """The fixed metric names one measurement logs (documented in the README)."""
    keys = [f"{curvature}/lambda_max"]
    keys += [f"{curvature}/top_{i}" for i in range(2, k + 1)]
    if smallest:
        keys.append(f"{curvature}/lambda_min")
    keys += [f"{curvature}/num_products", f"{curvature}/converged", f"{curvature}/seconds",
             f"{curvature}/batch_size", f"{curvature}/skipped"]
    return keys


@dataclass
class SpectrumMonitor:
    """Schedules, budgets and runs spectrum measurements.

    The time budget compares the time spent measuring with the training time since the start:
    a measurement is skipped (and counted in ``<curvature>/skipped``) when doing it would push
    the fraction above ``max_overhead``. Its cost is predicted as (products it may use) × (seconds
    per product): measured on the previous measurement, or before the first one taken as
    ``PRODUCT_COST_IN_STEPS`` training steps, so the first measurement is budgeted too.
    """

    config: MonitorConfig
    measurements: int = 0
    skipped: int = 0
    spent_seconds: float = 0.0
    _start: float | None = None
    _warm_start: Tensor | None = field(default=None, repr=False)
    _last_seconds: float = 0.0
    _seconds_per_product: float | None = None
    _last_eig_products: int | None = None
    _over_budget_warned: bool = False
    _predicted_seconds: float = 0.0
    disabled: str | None = None

    def start(self) -> None:
        """Mark the start of training time (training time excludes measurement time)."""
        if self._start is None:
            self._start = time.perf_counter()

    def is_due(self, step: int, forced: bool = False) -> bool:
        every = self.config.every_n_steps
        return forced or bool(every and step > 0 and step % every == 0)

    def density_due(self) -> bool:
        """Whether the next measurement includes a density: the ``density_every``-th, then every
        ``density_every`` (not the first, so the first measurement is cheap and prices the rest)."""
        every = self.config.density_every
        return bool(every) and self.measurements % every == every - 1

    def expected_products(self) -> int:
        """Upper estimate of the products the next measurement uses (warm-started Lanczos
        needs about as many as the previous run; a density adds probes × steps)."""
        cfg = self.config
        products = self._last_eig_products or cfg.max_iter
        if self.density_due():
            products += cfg.density_probes * cfg.density_steps
        return products

    def within_budget(self, steps: int) -> bool:
        """Whether the next measurement keeps the measured fraction of wall time in budget.

        Args:
            steps: optimizer steps trained so far in this run (to price the first measurement).
        """
        if self.config.max_overhead is None or self._start is None:
            return True
        elapsed = time.perf_counter() - self._start
        training = max(elapsed - self.spent_seconds, 1e-9)
        per_product = self._seconds_per_product
        if per_product is None:
            per_product = PRODUCT_COST_IN_STEPS * training / max(steps, 1)
        predicted = per_product * self.expected_products()
        self._predicted_seconds = predicted
        return (self.spent_seconds + predicted) / training <= self.config.max_overhead

    def skip_over_budget(self) -> None:
        self.skipped += 1
        if not self._over_budget_warned:
            self._over_budget_warned = True
            warnings.warn(
                f"Skipping Hessian spectrum measurements: they would exceed max_overhead="
                f"{self.config.max_overhead:.0%} of training time (the next one would take about "
                f"{self._predicted_seconds:.2f}s). Raise max_overhead, or lower max_iter or "
                "density_every. The count of "
                f"skipped measurements is logged as '{self.config.curvature}/skipped'.",
                UserWarning, stacklevel=2,
            )

    def measure(self, model: nn.Module, loss_fn: LossFn, batch: Any, *, distributed: bool = False,
                batch_size: int | None = None) -> tuple[dict[str, float], dict[str, Any]] | None:
        """One measurement; ``None`` (after a warning) when it failed.

        Returns:
            ``(metrics, record)``: the fixed-key scalar metrics and the full record for the file.
        """
        cfg = self.config
        begin = time.perf_counter()
        try:
            v0 = self._warm_start
            res = hessian_eigenvalues(
                model, loss_fn, batch, k=cfg.k, curvature=cfg.curvature,
                which="both" if cfg.smallest else "largest", tol=cfg.tol,
                max_iter=cfg.max_iter, v0=v0, return_eigenvectors=True, distributed=distributed,
                seed=self.measurements, warn_unconverged=False,
            )
            density: dict[str, Any] | None = None
            if self.density_due():
                sd = spectral_density(
                    model, loss_fn, batch, curvature=cfg.curvature, num_probes=cfg.density_probes,
                    num_steps=cfg.density_steps, distributed=distributed,
                    seed=10_000 + self.measurements,
                )
                density = {"nodes": sd.nodes, "weights": sd.weights, "sigma": sd.sigma,
                           "num_products": sd.num_products}
        except Exception as exc:  # a failed estimate is a warning, never a crashed run
            self.skipped += 1
            if isinstance(exc, (ValueError, TypeError)):
                # A configuration problem (k > P, no trainable parameters, a loss that is not a
                # scalar...): every later measurement would fail the same way, so say it once.
                self.disabled = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"Hessian spectrum monitoring turned off: {self.disabled}",
                              UserWarning, stacklevel=2)
            else:
                warnings.warn(
                    f"Hessian spectrum measurement skipped: {type(exc).__name__}: {exc}",
                    UserWarning, stacklevel=2,
                )
            return None
        finally:
            seconds = time.perf_counter() - begin
            self.spent_seconds += seconds
            self._last_seconds = seconds
        self.measurements += 1
        total_products = res.num_products + (int(density["num_products"]) if density else 0)
        self._seconds_per_product = seconds / max(total_products, 1)
        self._last_eig_products = res.num_products
        assert res.eigenvectors is not None
        self._warm_start = res.eigenvectors[0].detach()
        top = res.eigenvalues[: cfg.k].tolist()
        metrics: dict[str, float] = {f"{cfg.curvature}/lambda_max": top[0]}
        for i in range(2, cfg.k + 1):
            metrics[f"{cfg.curvature}/top_{i}"] = top[i - 1] if i - 1 < len(top) else math.nan
        lam_min = float(res.eigenvalues[-1]) if cfg.smallest else None
        if cfg.smallest:
            metrics[f"{cfg.curvature}/lambda_min"] = lam_min  # type: ignore[assignment]
        metrics.update({
            f"{cfg.curvature}/num_products": float(res.num_products),
            f"{cfg.curvature}/converged": float(res.converged),
            f"{cfg.curvature}/seconds": seconds,
            f"{cfg.curvature}/batch_size": float(batch_size if batch_size is not None
                                                 else res.num_samples),
            f"{cfg.curvature}/skipped": float(self.skipped),
        })
        record = {
            "curvature": cfg.curvature,
            "eigenvalues": res.eigenvalues,
            "lambda_max": top[0],
            "lambda_min": lam_min,
            "residuals": res.residuals,
            "converged": res.converged,
            "num_products": total_products,
            "seconds": seconds,
            "density": density,
        }
        return metrics, record

    def skipped_metrics(self) -> dict[str, float]:
        return {f"{self.config.curvature}/skipped": float(self.skipped)}

    def state_dict(self) -> dict[str, Any]:
        return {"measurements": self.measurements, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.measurements = int(state.get("measurements", 0))
        self.skipped = int(state.get("skipped", 0))


def loss_from_training_step(module: Any, batch: Any, batch_idx: int = 0) -> Tensor:
    """The loss returned by ``module.training_step`` with its ``self.log`` calls silenced."""
    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
    module.log = lambda *args, **kwargs: None
    module.log_dict = lambda *args, **kwargs: None
    try:
        out = module.training_step(batch, batch_idx)
    finally:
        for name, value in saved.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            "training_step did not return a loss tensor (or a dict with 'loss'), so the Hessian "
            "cannot be measured. Pass loss_fn= to BatchSizeLRCallback or define "
            "`curvature_loss(self, batch)` on the LightningModule."
        )
    return out

"""The λ(B) law of ``rule="curvature"`` during a Lightning run: samples, refits, the rules' law.

:class:`OnlineLaw` is the part of :class:`~lr_batch_callback.callbacks.BatchSizeLRScaling` that
only ``rule="curvature"`` needs: it keeps a pool of recent training samples, fits the law on them
at a batch-size change (rank 0 fits, every rank uses its law), gives the law to the curvature
rules when its fit is good enough, and logs the fit as ``law/*``.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning_utilities.core.rank_zero import WarningCache

from lr_batch_callback.callbacks.loggers import log_metrics
from lr_batch_callback.callbacks.loss import resolve_loss
from lr_batch_callback.engine.lanczos import DEFAULT_TOL
from lr_batch_callback.engine.operators import LossFn
from lr_batch_callback.law.model import BatchSizeLaw
from lr_batch_callback.law.online import LawConfig, SamplePool, fit_from_pool
from lr_batch_callback.scaling import CurvatureRule, ScalingRule

__all__ = ["OnlineLaw"]

#: Samples in the pool before a fit is tried (or ``LawConfig.samples`` if fewer).
MIN_SAMPLES = 64


class OnlineLaw:
    """The fitted law of a run and when to refit it.

    Args:
        config: how the law is measured (:class:`~lr_batch_callback.LawConfig`).
        loss_fn: ``loss_fn(module, batch) -> scalar`` for the measurements, or ``None`` for the
            module's own loss.
        warnings: where one-time warnings go (the callback's cache).
    """

    def __init__(self, config: LawConfig, loss_fn: LossFn | None, warnings: WarningCache) -> None:
        self.config = config
        self.loss_fn = loss_fn
        self.law: BatchSizeLaw | None = None
        self.due = False  # a fit is wanted once enough samples are pooled
        self._pool = SamplePool(config.samples)
        self._warnings = warnings

    @staticmethod
    def wanted(rules: Sequence[ScalingRule]) -> bool:
        """Whether any of ``rules`` follows the measured curvature."""
        return any(isinstance(r, CurvatureRule) for r in rules)

    @property
    def ready(self) -> bool:
        """Whether the pool holds enough samples for a fit."""
        return self._pool.size >= min(self.config.samples, MIN_SAMPLES)

    def add(self, batch: Any) -> None:
        """Pool a training batch's samples."""
        self._pool.add(batch)

    def give_to(self, rules: Sequence[ScalingRule]) -> bool:
        """Give the law to the curvature rules if it is good enough; say whether it was."""
        # Gate on the fit of the per-B means: single draws scatter too much at small B for the
        # per-draw R² to say whether λ(B) is captured.
        usable = self.law is not None and self.law.r_squared_of_means >= self.config.min_r_squared
        for rule in rules:
            if isinstance(rule, CurvatureRule):
                rule.law = self.law if usable else None
        return usable

    def refit(self, trainer: Trainer, pl_module: LightningModule,
              rules: Sequence[ScalingRule]) -> None:
        """Fit the law on the pool (rank 0), share it, give it to ``rules`` and log it."""
        self.due = False
        law = self._fit(trainer, pl_module) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            # Each rank holds other samples and would fit another law (and step with another LR).
            data = trainer.strategy.broadcast(law.to_dict() if law is not None else None, src=0)
            law = BatchSizeLaw.from_dict(data) if data is not None else None
        if law is None:
            return
        self.law = law
        if not self.give_to(rules):
            self._warnings.warn(
                f"rule='curvature': the λ(B) fit is too noisy to use (R² of the per-batch-size "
                f"means {law.r_squared_of_means:.2f} < min_r_squared="
                f"{self.config.min_r_squared}); using the fixed linear/√ rule until a "
                "better fit. Raise LawConfig.samples or .draws for a steadier fit."
            )
        if trainer.is_global_zero:
            log_metrics(trainer.loggers, {
                "law/lambda_emp": law.lambda_emp,
                "law/noise_coefficient": law.noise_coefficient,
                "law/critical_batch_size": law.critical_batch_size,
                "law/r_squared": law.r_squared,
                "law/r_squared_of_means": law.r_squared_of_means,
            }, trainer.global_step)

    def _fit(self, trainer: Trainer, pl_module: LightningModule) -> BatchSizeLaw | None:
        try:
            dataset = getattr(trainer.train_dataloader, "dataset", None)
            size = len(dataset) if isinstance(dataset, Sized) else None
            loss_fn = resolve_loss(pl_module, self.loss_fn, self._warnings)
            return fit_from_pool(pl_module, loss_fn, self._pool, self.config,
                                 curvature="hessian", dataset_size=size, seed=trainer.global_step,
                                 tol=DEFAULT_TOL, max_iter=50)
        except Exception as exc:
            self._warnings.warn(f"rule='curvature': fitting the λ(B) law failed ({exc}); "
                                "keeping the previous factor.")
            return None

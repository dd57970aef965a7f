"""What the monitor does after a batch-size increase: the calibrated warning and the guard.

:class:`IncreaseWatch` remembers that the effective batch size went up and the last record at
the old size; the first measurement after the change then logs ``hessian/change_risk`` (warned
once at 1 or more, :mod:`~lr_batch_callback.monitoring.warning`) and, with
``MonitorConfig(guard=True)``, tells the LR scaling part to cap its factor at the measured edge
(:mod:`~lr_batch_callback.monitoring.guard`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lr_batch_callback.callbacks.loggers import log_metrics
from lr_batch_callback.monitoring.guard import guard_factor
from lr_batch_callback.monitoring.record import SpectrumRecord
from lr_batch_callback.monitoring.warning import change_risk
from lr_batch_callback.scaling.optimizers import is_adaptive

if TYPE_CHECKING:  # scaling.py does not import this module; the annotation only
    from lr_batch_callback.callbacks.scaling import BatchSizeLRScaling

__all__ = ["IncreaseWatch"]


class IncreaseWatch:
    """The state between a batch-size increase and the measurement right after it."""

    def __init__(self) -> None:
        self.pending = False  # the next measurement is the first after an increase
        self._before: SpectrumRecord | None = None  # the last record at the old size
        self._said = False

    def changed(self, old: int, new: int, last: SpectrumRecord | None) -> None:
        """The effective batch size went from ``old`` to ``new``; ``last`` was measured at ``old``."""
        self.pending = new > old
        self._before = last if self.pending else None

    def measured(self, trainer: Trainer, record: SpectrumRecord, guard: bool,
                 scaling: BatchSizeLRScaling | None) -> None:
        """After the measurement right after an increase: warn, and cap the factor if asked."""
        if not self.pending:
            return
        self.pending = False
        self._warn(trainer, record)
        if not guard or scaling is None:
            return
        capped = guard_factor(record.context.lr_factor, record.context.stability)
        if capped is not None:
            scaling.cap_factor(trainer, capped, record.context.stability or 1.0)

    def _warn(self, trainer: Trainer, record: SpectrumRecord) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        adaptive = is_adaptive(optimizer) if optimizer is not None else None
        risk = change_risk(adaptive, record, self._before)
        self._before = None
        if risk is None or not math.isfinite(risk.ratio):
            return
        if trainer.is_global_zero:
            log_metrics(trainer.loggers, {"hessian/change_risk": risk.ratio}, trainer.global_step)
        if risk.ratio >= 1.0 and not self._said:
            self._said = True
            rank_zero_warn(
                f"Step {record.step}: after the batch-size increase to "
                f"{record.effective_batch_size}, {risk.signal} is {risk.value:.3g}, at or above "
                f"{risk.threshold:.3g}, the threshold that caught most failed continuations on the "
                "LR oracle (README, Stability). Expect the loss to rise; lower the LR factor if it "
                "does. (Said once per run.)")

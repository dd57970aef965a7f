r"""The warning after a batch-size increase, calibrated on the LR oracle's switch runs.

``benchmarks/lr_oracle/predictors.py`` scored every signal the monitor measures as a predictor of
a failed continuation (divergence, or a final loss above the loss at the switch) on 1,224 switch
runs to a larger batch (3 tasks × SGD/Adam × batch sizes × LRs × 3 seeds). Every signal ranks the
runs well (AUC 0.89–0.99 per task), and none has one threshold that catches ≥ 90 % of the failures
with ≤ 10 % false alarms on every task. The warning uses the best one, chosen by its worst task
(hits − false alarms), among the signals a measurement gives:

- **SGD family:** the LR × λ_max after the change over its value before it (the last
  measurement at the old size), warned at ≥ 5.24: hits 0.93 / 1.00 / 0.94 and false alarms
  0.16 / 0.18 / 0.14 on the digits CNN, the tiny LM and the noisy teacher;
- **Adam family:** the same relative change of LR × λ_c, the critical sharpness along −P⁻¹g,
  warned at ≥ 10.0: hits 0.92 / 1.00 / 0.85, false alarms 0.08 / 0.19 / 0.16.

Without a measurement before the change (a change before the first measurement) the absolute
forms stand in: SGD ``hessian/stability`` ≥ 0.604 (hits 0.76 / 1.00 / 0.96, false alarms
0.02 / 0.23 / 0.21); Adam LR × λ_max / 2 ≥ 0.629 (hits 0.85 / 0.72 / 0.82, false alarms
0.01 / 0.02 / 0.15). The table is ``benchmarks/results/lr_oracle_predictors.json``. The logged
``hessian/change_risk`` is the signal over its threshold: at 1 or more the warning is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lr_batch_callback.monitoring.record import SpectrumRecord

__all__ = ["CALIBRATION", "ChangeRisk", "change_risk"]

#: (signal, threshold) per optimizer family (adaptive?) and per form (relative, absolute).
CALIBRATION: dict[tuple[bool, bool], tuple[str, float]] = {
    (False, True): ("LR × λ_max after / before the change", 5.237),
    (False, False): ("hessian/stability", 0.604),
    (True, True): ("LR × λ_c(−P⁻¹g) after / before the change", 10.039),
    (True, False): ("LR × λ_max / 2", 0.629),
}


@dataclass(frozen=True)
class ChangeRisk:
    """A calibrated signal after a batch-size increase: its name, value and threshold."""

    signal: str
    value: float
    threshold: float

    @property
    def ratio(self) -> float:
        """The value over the threshold: the warning fires at 1 or more."""
        return self.value / self.threshold


def _relative(after: float | None, lr: float, before: float | None, lr_before: float | None
              ) -> float | None:
    if after is None or before is None or lr_before is None:
        return None
    if not (math.isfinite(after) and math.isfinite(before)) or before <= 0 or lr_before <= 0:
        return None
    return (lr * after) / (lr_before * before)


def change_risk(adaptive: bool | None, record: SpectrumRecord, before: SpectrumRecord | None
                ) -> ChangeRisk | None:
    """The calibrated signal for the measurement right after an increase (``None``: unknown).

    Args:
        adaptive: whether the optimizer is Adam-family (``None``: unknown family, no signal).
        record: the measurement right after the change.
        before: the last measurement at the old batch size, if any.

    Example:
        >>> from lr_batch_callback.monitoring.record import SpectrumEstimate, TrainingContext
        >>> def rec(lr, lam):
        ...     return SpectrumRecord(step=0, epoch=0, curvature="hessian",
        ...                           estimate=SpectrumEstimate(eigenvalues=[lam]),
        ...                           context=TrainingContext(lr=lr))
        >>> round(change_risk(False, rec(0.8, 5.0), rec(0.1, 4.0)).value, 6)  # 8 × 1.25
        10.0
    """
    lr = record.context.lr
    if adaptive is None or lr is None or not record.estimate.eigenvalues:
        return None
    lam = record.estimate.eigenvalues[0]
    if adaptive:
        after = record.estimate.critical_sharpness
        prior = before.estimate.critical_sharpness if before is not None else None
    else:
        after, prior = lam, before.estimate.eigenvalues[0] if before is not None else None
    relative = _relative(after, lr, prior, before.context.lr if before is not None else None)
    if relative is not None:
        signal, threshold = CALIBRATION[(adaptive, True)]
        return ChangeRisk(signal, relative, threshold)
    signal, threshold = CALIBRATION[(adaptive, False)]
    if adaptive:
        return ChangeRisk(signal, lr * lam / 2.0, threshold)
    stability = record.context.stability
    return ChangeRisk(signal, stability, threshold) if stability is not None else None

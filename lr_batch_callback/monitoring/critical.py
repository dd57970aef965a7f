r"""Critical sharpness in a measurement: along the (preconditioned) gradient and the next update.

Runs on the measurement's own batches and weights (micro-batches, token weights and DDP shares
as the curvature operator has them), after the eigenvalues, with one gradient and a bounded line
search per direction (:mod:`~lr_batch_callback.engine.critical`). The ratio
:math:`\eta/\eta_c = \eta\lambda_c/2` is the LR as a fraction of the step at which the batch loss
would rise back: above 1, the step raises the loss.

What :math:`\lambda_c` means:

- along :math:`-g` with plain gradient descent on a quadratic, :math:`g^\top H g/g^\top g`: a
  Rayleigh quotient of :math:`H`, at most :math:`\lambda_{max}`;
- along :math:`-P^{-1}g` (Adam family), the same quotient of the preconditioned Hessian
  :math:`(P^{-1}g)^\top H (P^{-1}g) / g^\top P^{-1} g`, in units of the LR;
- along the actual update (momentum, Adam's first moment, weight decay, bias corrections), the
  curvature the next step meets. Right after a batch-size change the update still carries the
  old batch's momentum, which may point away from the new batch's :math:`-g` (even uphill:
  ratio ``inf``);
- where the loss is not quadratic over the step, :math:`\eta_c` is where the *actual* loss rises,
  which is what a step at that LR would see; it then differs from the quadratic model's value.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lr_batch_callback.engine.critical import LineLoss, critical_sharpness
from lr_batch_callback.monitoring.directions import gradient_direction, update_direction

if TYPE_CHECKING:  # measurement imports this module
    from lr_batch_callback.monitoring.measurement import TrainingState

__all__ = ["CriticalMeasurement", "critical_ratio", "measure_critical"]


@dataclass(frozen=True)
class CriticalMeasurement:
    """Critical sharpness along the two directions (``None``: direction unknown) and the cost."""

    gradient: float | None
    update: float | None
    passes: int


def critical_ratio(lr: float | None, sharpness: float | None) -> float | None:
    r""":math:`\eta\lambda_c/2` (``None`` when either is unknown).

    Example:
        >>> critical_ratio(0.1, 30.0)
        1.5
    """
    if lr is None or sharpness is None or math.isnan(sharpness):
        return None
    return lr * sharpness / 2.0


def measure_critical(line: LineLoss, state: TrainingState) -> CriticalMeasurement:
    """Both critical sharpnesses along ``line`` (the measurement's batches, weights and parameters).

    ``state`` is the run's :class:`~lr_batch_callback.monitoring.measurement.TrainingState`
    (optimizer, LR, step).

    A failure (a loss that cannot be evaluated off the training point, say) is a warning and
    ``None`` values: the eigenvalues of the same measurement are kept.
    """
    first = state.lr if state.lr and state.lr > 0 else 1e-3
    values: dict[str, float | None] = {"gradient": None, "update": None}
    try:
        with line:
            grad = line.gradient()
            for name, build in (("gradient", gradient_direction), ("update", update_direction)):
                direction = build(state.optimizer, line.params, grad)
                if direction is not None:
                    values[name] = critical_sharpness(line, grad, direction, first).sharpness
    except Exception as exc:  # never lose the eigenvalues to the line search
        warnings.warn(f"Critical sharpness skipped at step {state.step}: "
                      f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
    return CriticalMeasurement(values["gradient"], values["update"], line.passes)

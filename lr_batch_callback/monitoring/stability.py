r"""How close a learning rate runs to the edge of stability of the local quadratic.

``lr × sharpness / threshold``, 1 at the edge (Cohen et al. 2022). SGD with heavy-ball momentum
:math:`\mu` diverges on the quadratic when :math:`\eta\lambda_{max} > 2(1+\mu)`; Adam with
:math:`\beta_1` when :math:`\eta\lambda_{max}(P^{-1}H) > (2+2\beta_1)/(1-\beta_1)`, with
:math:`P` its diagonal preconditioner.
"""

from __future__ import annotations

import math

import torch

from lr_batch_callback.monitoring.record import SpectrumEstimate
from lr_batch_callback.scaling.optimizers import is_adaptive

__all__ = ["stability"]


def stability(optimizer: torch.optim.Optimizer | None, lr: float | None,
              estimate: SpectrumEstimate) -> float | None:
    r"""``lr × sharpness / threshold`` for ``optimizer``'s first param group, or ``None``.

    ``None`` is when it cannot be said: no optimizer or LR, an Adam-family optimizer without a
    measured preconditioned sharpness, an optimizer of unknown family.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
        >>> round(stability(opt, 0.1, SpectrumEstimate(eigenvalues=[38.0])), 6)  # 0.1·38/(2·1.9)
        1.0
    """
    if optimizer is None or lr is None:
        return None
    group = optimizer.param_groups[0]
    adaptive = is_adaptive(optimizer)
    if adaptive is False:
        momentum = float(group.get("momentum", 0.0) or 0.0)
        return lr * estimate.eigenvalues[0] / (2.0 * (1.0 + momentum))
    sharpness = estimate.preconditioned_lambda_max
    if adaptive and sharpness is not None and math.isfinite(sharpness):
        beta1 = float(group.get("betas", (0.9, 0.999))[0])
        return lr * sharpness * (1.0 - beta1) / (2.0 + 2.0 * beta1)
    return None

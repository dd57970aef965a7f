r"""The guard on batch-size increases: cap the LR factor at the measured edge of stability.

After a batch-size increase the rule's new factor :math:`f` gives the LR :math:`\eta = f\,\eta_0`.
The measurement right after the change gives the stability ratio
:math:`s = \eta\,\lambda/T` (:mod:`~lr_batch_callback.monitoring.stability`: SGD
:math:`\lambda_{max}` with :math:`T = 2(1+\mu)`; Adam :math:`\lambda_{max}(P^{-1}H)` with
:math:`T = (2+2\beta_1)/(1-\beta_1)`). Past the edge (:math:`s > 1`) the factor is capped at the
edge, :math:`f/s`, which puts the LR at :math:`T/\lambda`. Scored on the LR oracle
(``benchmarks/lr_oracle``, README "Stability"): where it binds it was never farther from the oracle
LR and it removed every divergence of the linear rule.
"""

from __future__ import annotations

__all__ = ["guard_factor"]


def guard_factor(factor: float, ratio: float | None) -> float | None:
    """The capped factor when ``ratio`` (the stability ratio at ``factor``) is past 1, else ``None``.

    Example:
        >>> guard_factor(8.0, 2.0)  # twice past the edge: half the factor
        4.0
        >>> guard_factor(8.0, 0.7) is None
        True
    """
    if ratio is None or not ratio > 1.0 or not factor > 0:
        return None
    return factor / ratio

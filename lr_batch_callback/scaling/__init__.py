"""Batch-size learning-rate rules and the step-time factor that applies them.

Nothing here imports Lightning or the curvature engine.

- :mod:`~lr_batch_callback.scaling.rules`: ``scaling_factor``, the rule objects;
- :mod:`~lr_batch_callback.scaling.optimizers`: Adam-family or SGD-family;
- :mod:`~lr_batch_callback.scaling.scaler`: :class:`LRScaler`.
"""

from lr_batch_callback.scaling.optimizers import ADAPTIVE_OPTIMIZERS, is_adaptive
from lr_batch_callback.scaling.rules import (
    FIXED_RULES,
    RULES,
    CurvatureRule,
    ScalingRule,
    resolve_rule,
    scaling_factor,
)
from lr_batch_callback.scaling.scaler import LRScaler

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "FIXED_RULES",
    "RULES",
    "CurvatureRule",
    "LRScaler",
    "ScalingRule",
    "is_adaptive",
    "resolve_rule",
    "scaling_factor",
]

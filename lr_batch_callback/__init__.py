"""lr_batch_callback: batch-size-aware learning rates and batch-Hessian spectra for Lightning.

Public names:

- :func:`hessian_eigenvalues`, :func:`spectral_density` — the curvature engine's estimates, on
  top of :class:`HessianOperator`, :class:`GGNOperator` (or any :class:`CurvatureOperator`) and
  the algorithms :func:`lanczos` and :func:`slq`;
- :func:`scaling_factor`, :class:`LRScaler` — batch-size LR rules and the step-time LR factor;
- :class:`BatchSizeLRCallback` (LR scaling and spectrum monitoring), :class:`BatchSizeLRScaling`
  (LR only), :class:`SpectrumMonitor` (spectra only), :class:`BatchSizeSchedule` (by epoch),
  :class:`BatchSizeRamp` (by steps, samples or tokens) — the Lightning callbacks, with
  :class:`MonitorConfig` and :class:`LawConfig`;
- :class:`BatchSizeLaw`, :func:`fit_batch_size_law`, :func:`estimate_batch_size_law` — λ(B);
- :class:`SpectrumRecord`, :func:`load_spectra`, :func:`plot_spectra` — measurements, read back.

The engine and the LR rules never import Lightning: ``from lr_batch_callback import LRScaler``
works (and is fast) without it. The Lightning callbacks are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lr_batch_callback.engine.density import slq
from lr_batch_callback.engine.estimate import OperatorOptions, hessian_eigenvalues, spectral_density
from lr_batch_callback.engine.finite_difference import FiniteDifferenceHessian
from lr_batch_callback.engine.lanczos import LanczosOptions, lanczos
from lr_batch_callback.engine.operators import CurvatureOperator, GGNOperator, HessianOperator
from lr_batch_callback.law import BatchSizeLaw, estimate_batch_size_law, fit_batch_size_law
from lr_batch_callback.law.online import LawConfig
from lr_batch_callback.monitoring.measurement import MonitorConfig
from lr_batch_callback.monitoring.record import SpectrumRecord
from lr_batch_callback.monitoring.reporting import load_spectra, plot_spectra
from lr_batch_callback.scaling import LRScaler, scaling_factor

if TYPE_CHECKING:
    from lr_batch_callback.callbacks import (
        BatchSizeLRCallback,
        BatchSizeLRScaling,
        BatchSizeRamp,
        BatchSizeSchedule,
        SpectrumMonitor,
    )

# Names whose modules import Lightning: imported when first asked for (PEP 562).
_LIGHTNING = {"BatchSizeLRCallback", "BatchSizeLRScaling", "BatchSizeRamp", "BatchSizeSchedule",
              "SpectrumMonitor"}

__all__ = [
    "BatchSizeLRCallback",
    "BatchSizeLRScaling",
    "BatchSizeLaw",
    "BatchSizeRamp",
    "BatchSizeSchedule",
    "CurvatureOperator",
    "FiniteDifferenceHessian",
    "GGNOperator",
    "HessianOperator",
    "LRScaler",
    "LanczosOptions",
    "LawConfig",
    "MonitorConfig",
    "OperatorOptions",
    "SpectrumMonitor",
    "SpectrumRecord",
    "estimate_batch_size_law",
    "fit_batch_size_law",
    "hessian_eigenvalues",
    "lanczos",
    "load_spectra",
    "plot_spectra",
    "scaling_factor",
    "slq",
    "spectral_density",
]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        value = getattr(importlib.import_module("lr_batch_callback.callbacks"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lr_batch_callback' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LIGHTNING)

"""The Lightning layer: every Lightning import of the package lives under this folder.

- :class:`BatchSizeLRScaling` (``scaling.py``): the LR follows the effective batch size;
- :class:`SpectrumMonitor` (``monitor.py``): periodic batch-curvature spectra, logged;
- :class:`BatchSizeLRCallback` (``combined.py``): both in one;
- :class:`BatchSizeSchedule` (``schedule.py``): change the batch size at chosen epochs;
- :class:`BatchSizeRamp` (``ramp.py``): ramp it by optimizer steps, samples or tokens seen;
- ``base.py`` (stable state key, step detection), ``batch_size.py`` (where the batch size comes
  from), ``loggers.py`` (what reaches loggers).
"""

from lr_batch_callback.callbacks.combined import BatchSizeLRCallback
from lr_batch_callback.callbacks.monitor import SpectrumMonitor
from lr_batch_callback.callbacks.ramp import BatchSizeRamp
from lr_batch_callback.callbacks.scaling import BatchSizeLRScaling
from lr_batch_callback.callbacks.schedule import BatchSizeSchedule
from lr_batch_callback.law.online import LawConfig
from lr_batch_callback.monitoring.measurement import MonitorConfig

__all__ = [
    "BatchSizeLRCallback",
    "BatchSizeLRScaling",
    "BatchSizeRamp",
    "BatchSizeSchedule",
    "LawConfig",
    "MonitorConfig",
    "SpectrumMonitor",
]

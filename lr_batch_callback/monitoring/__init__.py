"""Spectrum monitoring without Lightning: what a measurement contains, its budget, its record.

The data flow of one measurement: a training batch → a curvature operator
(:mod:`~lr_batch_callback.engine.operators`) → the algorithms (Lanczos, SLQ) →
:func:`~lr_batch_callback.monitoring.measurement.measure_spectrum` builds one complete
:class:`~lr_batch_callback.monitoring.record.SpectrumRecord` → the Lightning layer sends it to
the loggers (:mod:`~lr_batch_callback.callbacks.loggers`) and
:mod:`~lr_batch_callback.monitoring.reporting` writes and reads its files. Nothing returns up.

Modules: ``measurement`` (MonitorConfig, measure_spectrum), ``budget`` (which due measurements
run), ``record`` (the one schema), ``stability`` (the edge-of-stability ratio), ``reporting``
(files, read-back, plots).
"""

from lr_batch_callback.monitoring.measurement import MonitorConfig, measure_spectrum
from lr_batch_callback.monitoring.record import SpectrumRecord
from lr_batch_callback.monitoring.reporting import load_spectra, plot_spectra

__all__ = ["MonitorConfig", "SpectrumRecord", "load_spectra", "measure_spectrum", "plot_spectra"]

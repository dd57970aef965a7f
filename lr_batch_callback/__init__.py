"""lr_batch_callback: batch-size-aware learning rates and batch-Hessian spectra for Lightning.

Public names (DESIGN §4 and the user-facing extras):

- :func:`hessian_eigenvalues`, :func:`spectral_density` — the curvature engine's estimates;
- :func:`scaling_factor`, :class:`LRScaler` — batch-size LR rules and the step-time LR factor;
- :class:`BatchSizeLRCallback`, :class:`BatchSizeSchedule` — the Lightning callbacks;
- :class:`BatchSizeLaw`, :func:`fit_batch_size_law`, :func:`estimate_batch_size_law` — λ(B);
- :func:`load_spectra`, :func:`plot_spectra` — reading back and plotting logged spectra.
"""

from lr_batch_callback.callback import BatchSizeLRCallback
from lr_batch_callback.estimate import hessian_eigenvalues, spectral_density
from lr_batch_callback.law import BatchSizeLaw, estimate_batch_size_law, fit_batch_size_law
from lr_batch_callback.reporting import load_spectra, plot_spectra
from lr_batch_callback.scaling import LRScaler, scaling_factor
from lr_batch_callback.schedule import BatchSizeSchedule

__all__ = [
    "BatchSizeLRCallback",
    "BatchSizeLaw",
    "BatchSizeSchedule",
    "LRScaler",
    "estimate_batch_size_law",
    "fit_batch_size_law",
    "hessian_eigenvalues",
    "load_spectra",
    "plot_spectra",
    "scaling_factor",
    "spectral_density",
]
__version__ = "0.1.0"

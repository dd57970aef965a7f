"""lr_batch_callback: batch-size-aware learning rates and batch-Hessian spectra for Lightning."""

from lr_batch_callback.estimate import hessian_eigenvalues, spectral_density

__all__ = ["hessian_eigenvalues", "spectral_density"]
__version__ = "0.1.0"

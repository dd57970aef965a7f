"""The batch-size law: how the batch curvature's top eigenvalue falls with the batch size.

- :mod:`~lr_batch_callback.law.model`: :class:`BatchSizeLaw`, its predictions and LR factors;
- :mod:`~lr_batch_callback.law.fit`: least-squares fit, noise scale from products;
- :mod:`~lr_batch_callback.law.measure`: the law measured on a model's sub-batches.
"""

from lr_batch_callback.law.fit import fit_batch_size_law, noise_scale_from_products
from lr_batch_callback.law.measure import estimate_batch_size_law
from lr_batch_callback.law.model import BatchSizeLaw, curvature_lr_factor

__all__ = [
    "BatchSizeLaw",
    "curvature_lr_factor",
    "estimate_batch_size_law",
    "fit_batch_size_law",
    "noise_scale_from_products",
]

r"""Fitting the batch-size law to measured top eigenvalues, and the noise scale from products.

:func:`fit_batch_size_law` fits :math:`\lambda(B) = a + c\,(1/B - 1/N)` by least squares with
heteroscedasticity-consistent standard errors; :func:`noise_scale_from_products` estimates the
noise scale :math:`P\sigma^2` from the scatter of sub-batch curvature-vector products. NumPy only.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from lr_batch_callback._checks import check_curvature
from lr_batch_callback.law.model import (
    BatchSizeLaw,
    _as_vector,
        _check_dataset_size,
    _excess_variance_factor,
)

__all__ = ["fit_batch_size_law", "noise_scale_from_products"]


def fit_batch_size_law(
    batch_sizes: ArrayLike,
    eigenvalues: ArrayLike,
    dataset_size: float | None = None,
    *,
    curvature: str = "hessian",
) -> BatchSizeLaw:
    r"""Least-squares fit of :math:`\lambda(B) = a + c\,x` with :math:`x = 1/B - 1/N`.

    Ordinary least squares on the centred regressor (exact for noiseless data):
    :math:`c = \sum (x_i-\bar x)(y_i-\bar y) / S_{xx}`, :math:`a = \bar y - c\bar x`, and
    :math:`R^2 = 1 - \mathrm{RSS}/\mathrm{TSS}` (1 when every eigenvalue is the same). Several draws
    at one batch size are several observations: pass each separately, so that their scatter
    enters the error estimates.

    Standard errors come from the residuals, but not through one pooled residual variance: the
    scatter of a batch's top eigenvalue grows with its noise (about like :math:`\sqrt{x}` in the
    BBP regime), so the small batches that determine :math:`c` are the noisiest, and the classical
    :math:`\sqrt{s^2/S_{xx}}` understates :math:`\mathrm{se}(c)` (by 2x on the spiked-Wigner test
    problem) while overstating :math:`\mathrm{se}(a)`. Both estimates are linear in the data,
    :math:`\hat\beta = \sum_i w_i y_i`, so the heteroscedasticity-consistent (HC3) variance
    :math:`\sum_i w_i^2 r_i^2/(1-h_i)^2` is used, with :math:`r_i` the residuals and
    :math:`h_i = 1/n + (x_i-\bar x)^2/S_{xx}` the leverages. When some observation has leverage 1
    (its residual is then zero whatever its noise, e.g. a single draw at one of only two batch
    sizes) HC3 says nothing and the classical :math:`s^2 = \mathrm{RSS}/(n-2)` is used instead.

    Args:
        batch_sizes: :math:`B_i \ge 1`, one per observation.
        eigenvalues: the top eigenvalue :math:`\lambda_i` measured at :math:`B_i`.
        dataset_size: :math:`N \ge \max B_i`, or ``None`` for an infinite data set.
        curvature: ``"hessian"`` or ``"ggn"``, recorded on the law.

    Returns:
        The fitted :class:`BatchSizeLaw`, observations included.

    Raises:
        ValueError: for mismatched lengths, fewer than 3 observations or 2 distinct batch sizes,
            non-finite values, a batch size below 1, or a data set smaller than a batch.

    Example:
        >>> law = fit_batch_size_law([8, 32, 128, 512], [10 + 40 / b for b in (8, 32, 128, 512)])
        >>> round(law.lambda_emp, 6), round(law.noise_coefficient, 6), law.r_squared
        (10.0, 40.0, 1.0)
    """
    check_curvature(curvature)
    sizes, values, population = _observations(batch_sizes, eigenvalues, dataset_size)
    x = _excess_variance_factor(sizes, population)
    n = x.size
    x_mean, y_mean = x.mean(), values.mean()
    dx, dy = x - x_mean, values - y_mean
    sxx = float(dx @ dx)
    slope = float(dx @ dy) / sxx
    intercept = float(y_mean - slope * x_mean)
    residuals = values - (intercept + slope * x)
    rss = float(residuals @ residuals)
    tss = float(dy @ dy)
    # a and c as weighted sums of the observations, for the sandwich variance below.
    slope_weights = dx / sxx
    intercept_weights = 1.0 / n - x_mean * slope_weights
    leverage = 1.0 / n + dx * slope_weights
    if np.all(leverage < 1.0 - 1e-9):
        observation_variance = residuals**2 / (1.0 - leverage) ** 2  # HC3
    else:
        observation_variance = np.full(n, rss / (n - 2))
    return BatchSizeLaw(
        lambda_emp=intercept,
        noise_coefficient=slope,
        dataset_size=population,
        lambda_emp_stderr=math.sqrt(float(intercept_weights**2 @ observation_variance)),
        noise_coefficient_stderr=math.sqrt(float(slope_weights**2 @ observation_variance)),
        r_squared=1.0 - rss / tss if tss > 0 else 1.0,
        batch_sizes=tuple(sizes.tolist()),
        eigenvalues=tuple(values.tolist()),
        curvature=curvature,
    )


# -- the noise scale from products -----------------------------------------------------------------

def _observations(batch_sizes: ArrayLike, eigenvalues: ArrayLike, dataset_size: float | None
                  ) -> tuple[np.ndarray, np.ndarray, float | None]:
    """The observations as float vectors and the data-set size, checked (see the Raises above)."""
    sizes = _as_vector(batch_sizes, "batch_sizes")
    values = _as_vector(eigenvalues, "eigenvalues")
    if sizes.size != values.size:
        raise ValueError(
            f"batch_sizes and eigenvalues must have one entry per observation, got {sizes.size} "
            f"batch sizes and {values.size} eigenvalues."
        )
    if sizes.size < 3:
        raise ValueError(
            f"The fit needs at least 3 observations (two constants and a residual variance), got "
            f"{sizes.size}. Measure more batch sizes or more draws per batch size."
        )
    for name, array in (("batch_sizes", sizes), ("eigenvalues", values)):
        bad = ~np.isfinite(array)
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{name} must be finite, got {float(array[index])!r} at position {index}. Drop "
                "that observation (a diverged loss or a failed eigenvalue run)."
            )
    if (sizes < 1).any():
        raise ValueError(
            f"batch sizes must be at least 1 sample, got {float(sizes[sizes < 1][0])!r}. Pass "
            "numbers of samples, not fractions of the data set."
        )
    distinct = np.unique(sizes)
    if distinct.size < 2:
        raise ValueError(
            f"The fit needs at least 2 distinct batch sizes to separate a from c, got only "
            f"{distinct[0]:g}. Measure at another batch size too."
        )
    return sizes, values, _check_dataset_size(dataset_size, float(sizes.max()))


def noise_scale_from_products(
    products: ArrayLike,
    batch_sizes: ArrayLike,
    reference: ArrayLike,
    reference_size: float | None = None,
) -> float:
    r"""Estimate the noise scale :math:`P\sigma^2` from curvature-vector products of sub-batches.

    For a fixed unit vector :math:`v` and batches of :math:`B_k` samples drawn without
    replacement from a reference set of :math:`n` samples (a large batch, or the data set), the
    finite-population identity gives

    .. math:: \mathbb E\,\|H_{B_k} v - H_n v\|^2 = S_v^2\,(1/B_k - 1/n),
              \qquad S_v^2 = \tfrac{1}{n-1}\textstyle\sum_i \|h_i v - H_n v\|^2,

    with :math:`h_i` the per-sample curvatures. Under the Wigner model of the batch noise
    :math:`S_v^2 = P\sigma^2` for every unit :math:`v`; for anisotropic noise, the top
    eigenvector is the direction to use, since :math:`\|(H_B - H)u_1\|^2/\lambda_1` is the
    second-order shift of :math:`\lambda_1`. The scatter of :math:`\|H_{B_k}v - H_n v\|^2` grows
    like its mean, so the efficient estimate is the plain mean of the ratios
    :math:`\|H_{B_k}v - H_n v\|^2 / (1/B_k - 1/n)`. Divide by :math:`\lambda_1` to get the law's
    :math:`c` (compare :attr:`BatchSizeLaw.noise_scale`).

    Args:
        products: :math:`H_{B_k} v`, one row per sub-batch (shape ``(m, P)``).
        batch_sizes: :math:`B_k`, one per row.
        reference: :math:`H_n v`, the product with the reference curvature (shape ``(P,)``).
        reference_size: :math:`n`, the samples behind ``reference``; ``None`` when it is the
            curvature of an infinite population.

    Returns:
        The estimate of :math:`P\sigma^2` (rows with :math:`B_k = n` carry no information and are
        skipped).

    Raises:
        ValueError: for mismatched shapes, non-finite values, batch sizes outside
            :math:`[1, n]`, or no row with :math:`B_k < n`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> sizes = np.repeat([16.0, 64.0], 200)
        >>> noise = rng.normal(size=(400, 50)) * np.sqrt(2.0 / 50 / sizes[:, None])
        >>> round(noise_scale_from_products(noise, sizes, np.zeros(50)), 1)  # P sigma^2 = 2
        2.0
    """
    if hasattr(products, "detach"):
        products = products.detach().cpu().numpy()
    rows = np.array(products, dtype=np.float64)
    sizes = _as_vector(batch_sizes, "batch_sizes")
    centre = _as_vector(reference, "reference")
    if rows.ndim != 2 or rows.shape[0] != sizes.size or rows.shape[1] != centre.size:
        raise ValueError(
            f"products must have one row of length {centre.size} (the reference's length) per "
            f"batch size ({sizes.size}), got shape {rows.shape}."
        )
    if not (np.isfinite(rows).all() and np.isfinite(sizes).all() and np.isfinite(centre).all()):
        raise ValueError("products, batch_sizes and reference must be finite; got NaN or inf.")
    if (sizes < 1).any():
        raise ValueError(
            f"batch sizes must be at least 1 sample, got {float(sizes[sizes < 1][0])!r}."
        )
    population = _check_dataset_size(reference_size, float(sizes.max()))
    x = _excess_variance_factor(sizes, population)
    informative = x > 0
    if not informative.any():
        raise ValueError(
            f"Every batch size equals reference_size={reference_size!r}: those products equal the "
            "reference and say nothing about the noise. Use smaller sub-batches."
        )
    squared_deviation = ((rows[informative] - centre) ** 2).sum(axis=1)
    return float(np.mean(squared_deviation / x[informative]))

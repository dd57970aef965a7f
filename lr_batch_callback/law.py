r"""How the batch curvature falls with the batch size, and what that means for the learning rate.

The batch Hessian :math:`H_B` is the empirical Hessian :math:`H` (whole data set of :math:`N`
samples) plus a zero-mean fluctuation whose entry variance is :math:`\sigma^2(1/B - 1/N)` when
:math:`B` samples are drawn without replacement. For a curvature outlier :math:`\lambda_1` of
:math:`H` that stays above the noise edge, the spiked random-matrix (BBP) result of Granziol,
Zohren & Roberts (arXiv 2006.09092) gives the top eigenvalue of the batch Hessian as

.. math:: \lambda(B) \approx a + c\,(1/B - 1/N), \qquad a = \lambda_1,\quad
          c = P\sigma^2/\lambda_1,

with :math:`P` the number of parameters. SGD with heavy-ball momentum :math:`\mu` is stable on the
local quadratic while :math:`\eta < 2(1+\mu)/\lambda(B)`, so the largest stable learning rate grows
:math:`\propto B` while the noise term dominates and saturates at :math:`2(1+\mu)/a` past the
*critical batch size* :math:`B^* = c/a = P\sigma^2/\lambda_1^2`.

This module fits that law to measured top eigenvalues (:func:`fit_batch_size_law`), measures them
on sub-batches of one large batch (:func:`estimate_batch_size_law`), estimates the noise scale
:math:`P\sigma^2` from Hessian-vector products (:func:`noise_scale_from_products`), and turns a
fitted :class:`BatchSizeLaw` into learning rates. Everything except
:func:`estimate_batch_size_law` is NumPy arithmetic; torch is imported only where a model is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lr_batch_callback.operators import LossFn

__all__ = [
    "BatchSizeLaw",
    "estimate_batch_size_law",
    "fit_batch_size_law",
    "noise_scale_from_products",
]

CURVATURES = ("hessian", "ggn")


# -- validation helpers ----------------------------------------------------------------------------
def _as_vector(values: Any, name: str) -> NDArray[np.float64]:
    """A 1-D float64 copy of a sequence, NumPy array or (CPU or GPU) tensor."""
    if hasattr(values, "detach"):  # a torch tensor, possibly on a GPU or requiring grad
        values = values.detach().cpu().numpy()
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}.") from exc
    if array.ndim != 1:
        raise ValueError(
            f"{name} must be one-dimensional (one entry per observation), got shape "
            f"{array.shape}. Flatten repeated draws into one observation each."
        )
    return array


def _check_curvature(curvature: str) -> None:
    if curvature not in CURVATURES:
        raise ValueError(
            f"curvature must be one of {CURVATURES}, got {curvature!r}. Use 'hessian' for the full "
            "Hessian or 'ggn' for the Generalised Gauss-Newton."
        )


def _check_dataset_size(dataset_size: float | None, largest_batch: float | None) -> float | None:
    """``dataset_size`` as a float, or ``None`` for an infinite data set (``math.inf`` too)."""
    if dataset_size is None:
        return None
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, (int, float, np.number)):
        raise ValueError(
            f"dataset_size must be a number of samples or None (infinite), got {dataset_size!r}."
        )
    size = float(dataset_size)
    if math.isnan(size) or size <= 0:
        raise ValueError(
            f"dataset_size must be a positive number of samples or None (infinite), got "
            f"{dataset_size!r}."
        )
    if math.isinf(size):
        return None
    if largest_batch is not None and size < largest_batch:
        raise ValueError(
            f"dataset_size={dataset_size!r} is smaller than the largest batch size "
            f"{largest_batch:g}: batches are drawn from the data set, so N >= B. Pass the number "
            "of training samples (or None for an effectively infinite data set)."
        )
    return size


def _excess_variance_factor(
    batch_sizes: NDArray[np.float64], population: float | None
) -> NDArray[np.float64]:
    r"""The finite-population factor :math:`x = 1/B - 1/N`, clamped at 0 (see ``predict``)."""
    inverse_population = 0.0 if population is None else 1.0 / population
    return np.maximum(1.0 / batch_sizes - inverse_population, 0.0)


# -- the law ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchSizeLaw:
    r"""The law :math:`\lambda(B) = a + c\,(1/B - 1/N)` for the batch curvature's top eigenvalue.

    Build one with :func:`fit_batch_size_law` or :func:`estimate_batch_size_law`, or state the
    constants by hand (the statistics then default to an exact law with no observations).

    Attributes:
        lambda_emp: :math:`a`, the top eigenvalue of the empirical (whole data set) curvature.
        noise_coefficient: :math:`c = P\sigma^2/\lambda_1`, the weight of the sampling noise.
        dataset_size: :math:`N`, the number of training samples; ``None`` for an infinite data
            set (:math:`1/N = 0`).
        lambda_emp_stderr: standard error of :math:`a`, from the fit's residuals
            (heteroscedasticity-consistent, see :func:`fit_batch_size_law`).
        noise_coefficient_stderr: standard error of :math:`c`, likewise.
        r_squared: coefficient of determination of the fit (1 for an exact law).
        batch_sizes: the batch size of each observation fitted.
        eigenvalues: the top eigenvalue measured at each of those batch sizes.
        curvature: ``"hessian"`` or ``"ggn"``, the curvature the eigenvalues are of.

    Example:
        >>> law = BatchSizeLaw(lambda_emp=35.0, noise_coefficient=354.0, dataset_size=1797)
        >>> round(law.predict(32), 2), round(law.critical_batch_size, 2)
        (45.87, 10.11)
    """

    lambda_emp: float
    noise_coefficient: float
    dataset_size: float | None = None
    lambda_emp_stderr: float = 0.0
    noise_coefficient_stderr: float = 0.0
    r_squared: float = 1.0
    batch_sizes: tuple[float, ...] = ()
    eigenvalues: tuple[float, ...] = ()
    curvature: str = "hessian"

    def __post_init__(self) -> None:
        # Normalise types: a law read from JSON (lists, ints) must equal the fitted one.
        for name in ("lambda_emp", "noise_coefficient"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}.")
            object.__setattr__(self, name, value)
        for name in ("lambda_emp_stderr", "noise_coefficient_stderr", "r_squared"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "dataset_size", _check_dataset_size(self.dataset_size, None))
        sizes = tuple(float(b) for b in self.batch_sizes)
        values = tuple(float(v) for v in self.eigenvalues)
        if len(sizes) != len(values):
            raise ValueError(
                f"batch_sizes and eigenvalues must have one entry per observation, got "
                f"{len(sizes)} batch sizes and {len(values)} eigenvalues."
            )
        object.__setattr__(self, "batch_sizes", sizes)
        object.__setattr__(self, "eigenvalues", values)
        _check_curvature(self.curvature)

    # -- predictions ---------------------------------------------------------------------------
    @overload
    def predict(self, batch_size: float) -> float: ...

    @overload
    def predict(self, batch_size: NDArray[Any]) -> NDArray[np.float64]: ...

    def predict(self, batch_size: float | NDArray[Any]) -> float | NDArray[np.float64]:
        r"""The predicted top eigenvalue :math:`\lambda(B) = a + c\,\max(1/B - 1/N, 0)`.

        Batch sizes beyond :math:`N` are allowed (extrapolation, e.g. an effective batch grown by
        gradient accumulation past one epoch's worth of samples) and predict :math:`a`: the
        :math:`-1/N` term is the finite-population correction of sampling *without* replacement,
        which cannot make a batch's fluctuation negative, so the noise term is clamped at zero
        instead of letting the prediction fall below the empirical curvature.

        Args:
            batch_size: :math:`B > 0`, a number or an array of them (``math.inf`` gives
                :math:`a`).

        Returns:
            A float for a scalar input, otherwise an array of the input's shape.

        Raises:
            ValueError: if any batch size is not positive, or is NaN.

        Example:
            >>> law = BatchSizeLaw(lambda_emp=2.0, noise_coefficient=64.0)
            >>> law.predict(32)
            4.0
            >>> law.predict(np.array([16, 64]))
            array([6., 3.])
        """
        sizes = np.asarray(batch_size, dtype=np.float64)
        bad = ~(sizes > 0)  # catches NaN too
        if bad.any():
            first_bad = float(sizes[bad].reshape(-1)[0])
            raise ValueError(
                f"batch_size must be positive, got {first_bad!r}. Pass the number of samples per "
                "optimizer step (the effective batch size)."
            )
        prediction = self.lambda_emp + self.noise_coefficient * _excess_variance_factor(
            sizes, self.dataset_size
        )
        if prediction.ndim == 0:
            return float(prediction)
        return prediction

    @property
    def critical_batch_size(self) -> float:
        r"""The critical batch size :math:`B^* = c/a = P\sigma^2/\lambda_1^2`.

        Where the noise term :math:`c/B` equals the empirical curvature :math:`a` (for an infinite
        data set; with finite :math:`N` the two terms cross at :math:`c/(a + c/N)`, which is the
        same as long as :math:`B^* \ll N`). Below it the largest stable learning rate grows
        linearly with :math:`B`; above it the rate saturates. Degenerate fits get limits rather
        than meaningless ratios:

        - :math:`c \le 0` (no decrease with :math:`B`: no noise regime): ``0.0``, every batch size
          is curvature-dominated;
        - :math:`c > 0,\ a \le 0` (no positive empirical curvature to saturate at): ``math.inf``,
          every batch size is noise-dominated.

        Example:
            >>> BatchSizeLaw(lambda_emp=10.0, noise_coefficient=40.0).critical_batch_size
            4.0
        """
        if self.noise_coefficient <= 0:
            return 0.0
        if self.lambda_emp <= 0:
            return math.inf
        return self.noise_coefficient / self.lambda_emp

    @property
    def noise_scale(self) -> float:
        r"""The implied noise scale :math:`P\sigma^2 = a\,c` (the BBP model's :math:`c\lambda_1`).

        Comparable with :func:`noise_scale_from_products`, which measures it directly.
        """
        return self.lambda_emp * self.noise_coefficient

    @property
    def r_squared_of_means(self) -> float:
        r"""R² of the law against the *mean* eigenvalue at each batch size.

        Single draws at small B scatter widely (a few hard samples dominate a small batch), which
        keeps the per-draw :attr:`r_squared` low even when the law describes the means well; this
        is the statistic that says whether :math:`\lambda(B)` is captured. ``nan`` with fewer
        than two distinct batch sizes or when the means do not vary.
        """
        sizes = np.asarray(self.batch_sizes, dtype=np.float64)
        values = np.asarray(self.eigenvalues, dtype=np.float64)
        distinct = np.unique(sizes)
        if distinct.size < 2:
            return math.nan
        means = np.array([values[sizes == b].mean() for b in distinct])
        spread = float(((means - means.mean()) ** 2).sum())
        if spread == 0.0:
            return math.nan
        residual = float(((means - self.predict(distinct)) ** 2).sum())
        return 1.0 - residual / spread

    @overload
    def max_learning_rate(self, batch_size: float, momentum: float = 0.0) -> float: ...

    @overload
    def max_learning_rate(
        self, batch_size: NDArray[Any], momentum: float = 0.0
    ) -> NDArray[np.float64]: ...

    def max_learning_rate(
        self, batch_size: float | NDArray[Any], momentum: float = 0.0
    ) -> float | NDArray[np.float64]:
        r"""The largest stable learning rate :math:`2(1+\mu)/\lambda(B)` of SGD with momentum.

        Gradient descent with heavy-ball momentum :math:`\mu` on a quadratic of curvature
        :math:`\lambda` iterates a linear map whose spectral radius stays below one exactly when
        :math:`0 < \eta\lambda < 2(1+\mu)`; the batch's top eigenvalue is the binding direction.
        The bound is about stability, not the best rate: a good rate is a fraction of it.

        Args:
            batch_size: :math:`B > 0`, a number or an array of them.
            momentum: :math:`\mu \in [0, 1)` (PyTorch SGD's ``momentum``; 0 for plain SGD).

        Returns:
            A float for a scalar input, otherwise an array of the input's shape.

        Raises:
            ValueError: for a momentum outside ``[0, 1)``, or where the law predicts a
                non-positive top eigenvalue (no curvature bound: the law is not usable there).

        Example:
            >>> law = BatchSizeLaw(lambda_emp=2.0, noise_coefficient=64.0)
            >>> law.max_learning_rate(32), law.max_learning_rate(32, momentum=0.9)
            (0.5, 0.95)
        """
        if isinstance(momentum, bool) or not (
            isinstance(momentum, (int, float, np.number)) and 0.0 <= float(momentum) < 1.0
        ):
            raise ValueError(
                f"momentum must be in [0, 1), got {momentum!r}. Pass the optimizer's heavy-ball "
                "momentum (e.g. 0.9), or 0.0 for plain SGD; momentum >= 1 is never stable."
            )
        curvature = self.predict(batch_size)
        self._require_positive(curvature, batch_size)
        return 2.0 * (1.0 + float(momentum)) / curvature

    def lr_factor(
        self, old_batch_size: float, new_batch_size: float, adaptive: bool = False
    ) -> float:
        r"""The factor to multiply the learning rate by when the batch size changes.

        SGD keeps the same fraction of its stability limit when the rate follows
        :math:`1/\lambda(B)`: the factor is :math:`\lambda(B_{old})/\lambda(B_{new})`. It equals
        :math:`B_{new}/B_{old}` (the linear rule) while the noise term dominates and tends to 1
        past :math:`B^*`. Adam-family optimizers (``adaptive=True``) divide by
        :math:`\sqrt{v} \sim \sqrt{\lambda(B)}`, so their factor is the square root (the
        square-root rule, saturating at the same :math:`B^*`).

        Args:
            old_batch_size: the batch size the current learning rate was tuned for.
            new_batch_size: the batch size about to be used.
            adaptive: ``True`` for Adam-family optimizers (square-root scaling).

        Raises:
            ValueError: for a non-positive batch size, or where the law predicts a non-positive
                top eigenvalue at either batch size.

        Example:
            >>> law = BatchSizeLaw(lambda_emp=1.0, noise_coefficient=1000.0)
            >>> round(law.lr_factor(8, 16), 3), round(law.lr_factor(8, 16, adaptive=True), 3)
            (1.984, 1.409)
        """
        old = self.predict(float(old_batch_size))
        new = self.predict(float(new_batch_size))
        self._require_positive(old, old_batch_size)
        self._require_positive(new, new_batch_size)
        ratio = old / new
        return math.sqrt(ratio) if adaptive else ratio

    def _require_positive(self, curvature: float | NDArray[np.float64], batch_size: Any) -> None:
        if np.any(np.asarray(curvature) <= 0):
            raise ValueError(
                f"The law {self.summary()} predicts a non-positive top eigenvalue at batch size "
                f"{batch_size!r}, so it bounds no learning rate there. Refit it on batches where "
                "the curvature is positive (e.g. later in training), or use the 'linear'/'sqrt' "
                "rules."
            )

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The law as a JSON-serialisable dict (for checkpoints and log files).

        Example:
            >>> import json
            >>> law = BatchSizeLaw(lambda_emp=2.0, noise_coefficient=64.0, dataset_size=1000)
            >>> BatchSizeLaw.from_dict(json.loads(json.dumps(law.to_dict()))) == law
            True
        """
        out: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchSizeLaw:
        """The law saved by :meth:`to_dict`.

        Raises:
            ValueError: if a field is missing or an unknown one is present (a file written by
                another version, or not a law at all).
        """
        names = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"Unknown BatchSizeLaw fields {unknown}; expected only {sorted(names)}. Was this "
                "dict written by BatchSizeLaw.to_dict?"
            )
        required = {"lambda_emp", "noise_coefficient"}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"A BatchSizeLaw dict needs the fields {missing}; got {sorted(data)}.")
        return cls(**dict(data))

    def summary(self) -> str:
        """One line with the constants, the critical batch size and the fit quality.

        Example:
            >>> BatchSizeLaw(lambda_emp=35.0, noise_coefficient=354.0, dataset_size=1797).summary()
            'hessian lambda(B) = a + c(1/B - 1/N): a = 35 +/- 0, c = 354 +/- 0, N = 1797, B* = c/a = 10.11, R^2 = 1.000 (0 observations)'
        """  # noqa: E501
        n = "inf" if self.dataset_size is None else f"{self.dataset_size:g}"
        return (
            f"{self.curvature} lambda(B) = a + c(1/B - 1/N): "
            f"a = {self.lambda_emp:.4g} +/- {self.lambda_emp_stderr:.2g}, "
            f"c = {self.noise_coefficient:.4g} +/- {self.noise_coefficient_stderr:.2g}, "
            f"N = {n}, B* = c/a = {self.critical_batch_size:.4g}, R^2 = {self.r_squared:.3f} "
            f"({len(self.eigenvalues)} observations)"
        )


# -- fitting ---------------------------------------------------------------------------------------
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
    _check_curvature(curvature)
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
    population = _check_dataset_size(dataset_size, float(sizes.max()))

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


# -- measuring the law on a model ------------------------------------------------------------------
def _default_batch_sizes(n: int, num: int = 5) -> list[int]:
    """A geometric ladder of about ``num`` sizes from ``max(2, n/64)`` to ``n``."""
    sizes = np.geomspace(max(2.0, n / 64), n, num)
    return sorted({int(math.floor(s + 0.5)) for s in sizes} | {n})


def _check_batch_sizes(batch_sizes: Sequence[int] | None, n: int) -> list[int]:
    if batch_sizes is None:
        if n < 3:
            raise ValueError(
                f"The batch has {n} samples; the default ladder of sub-batch sizes needs at least "
                "3. Pass a larger batch."
            )
        return _default_batch_sizes(n)
    out = set()
    for size in batch_sizes:
        try:
            whole = not isinstance(size, bool) and float(size).is_integer()
        except (TypeError, ValueError):
            whole = False
        if not whole or not 1 <= size <= n:
            raise ValueError(
                f"Every sub-batch size must be an integer in [1, {n}] (the batch's size), got "
                f"{size!r}. Sub-batches are drawn from the batch passed in; pass a larger batch "
                "to measure larger sizes."
            )
        out.add(int(size))
    return sorted(out)


def _sub_batch_plan(
    n: int, batch_sizes: Sequence[int], draws: int, seed: int | None
) -> list[tuple[int, torch.Tensor | None, int]]:
    """``(size, sample indices or None for the whole batch, Lanczos seed)`` for each run.

    A private generator, so that the caller's global RNG streams are untouched and a seed
    reproduces both the sub-batches and the Lanczos start vectors.
    """
    import torch

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    plan: list[tuple[int, torch.Tensor | None, int]] = []
    for size in batch_sizes:
        # Every draw of the full size is the same batch: one Lanczos run is enough.
        repeats = 1 if size == n else draws
        for _ in range(repeats):
            index = None
            if size < n:
                index = torch.randperm(n, generator=generator)[:size].sort().values
            lanczos_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            plan.append((size, index, lanczos_seed))
    return plan


def estimate_batch_size_law(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    batch_sizes: Sequence[int] | None = None,
    draws: int = 4,
    dataset_size: float | None = None,
    curvature: str = "hessian",
    seed: int | None = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    params: Sequence[torch.Tensor] | None = None,
) -> BatchSizeLaw:
    r"""Measure the top eigenvalue on sub-batches of several sizes and fit :math:`\lambda(B)`.

    Sub-batches of each size are drawn without replacement from ``batch`` (``draws`` times each;
    once at the full size, where every draw is the whole batch), the top eigenvalue of each
    sub-batch's curvature is found by Lanczos
    (:func:`~lr_batch_callback.estimate.hessian_eigenvalues`, random start, model state
    restored), and :func:`fit_batch_size_law` fits :math:`a + c(1/B - 1/N)` to all of them. The
    cost is one Lanczos run per sub-batch, each on a batch no larger than ``batch``.

    Args:
        model: the network; used as it is (train mode stays train mode) and left unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss over the batch.
        batch: a large batch; its size :math:`n` bounds the sub-batch sizes.
        batch_sizes: sub-batch sizes in ``[1, n]``; default about 5 sizes in a geometric ladder
            from ``max(2, n/64)`` to ``n``.
        draws: random sub-batches per size (the scatter between draws is part of the fit's error).
        dataset_size: :math:`N`, the training set size; ``None`` for an infinite data set.
        curvature: ``"hessian"`` or ``"ggn"``.
        seed: seeds the sub-batch draws and the Lanczos start vectors (``None``: fresh randomness).
        tol: Lanczos relative Ritz-residual tolerance.
        max_iter: Lanczos step cap per run.
        params: the parameters to differentiate (default: all trainable ones).

    Returns:
        The fitted :class:`BatchSizeLaw`; its observations are in run order (sizes ascending).

    Warns:
        RuntimeWarning: when Lanczos runs hit ``max_iter`` before ``tol``; their eigenvalues are
            then lower bounds.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> batch = (torch.randn(128, 4), torch.randn(128, 1))
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> law = estimate_batch_size_law(model, loss_fn, batch, draws=2, seed=0)
        >>> sorted(set(law.batch_sizes))
        [2.0, 6.0, 16.0, 45.0, 128.0]
    """  # noqa: E501
    from lr_batch_callback.batching import batch_size_of, index_batch
    from lr_batch_callback.estimate import hessian_eigenvalues

    _check_curvature(curvature)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}; e.g. draws=4.")
    n = batch_size_of(batch)
    sizes = _check_batch_sizes(batch_sizes, n)
    _check_dataset_size(dataset_size, float(n))
    # Fail before any Lanczos run rather than in the fit after all of them.
    num_runs = sum(1 if size == n else draws for size in sizes)
    if len(sizes) < 2 or num_runs < 3:
        raise ValueError(
            f"Sub-batch sizes {sizes} with draws={draws} give {num_runs} observations at "
            f"{len(sizes)} distinct sizes; the fit needs at least 3 at 2 distinct sizes. Add "
            "sizes or draws."
        )

    observed_sizes: list[float] = []
    observed: list[float] = []
    unconverged: list[int] = []
    for size, index, lanczos_seed in _sub_batch_plan(n, sizes, draws, seed):
        sub_batch = batch if index is None else index_batch(batch, index)
        result = hessian_eigenvalues(
            model, loss_fn, sub_batch, k=1, curvature=curvature, tol=tol, max_iter=max_iter,
            seed=lanczos_seed, params=params, warn_unconverged=False,
        )
        observed_sizes.append(float(size))
        observed.append(float(result.eigenvalues[0]))
        if not result.converged:
            unconverged.append(size)
    if unconverged:
        warnings.warn(
            f"{len(unconverged)} of {len(observed)} Lanczos runs (sub-batch sizes "
            f"{sorted(set(unconverged))}) hit max_iter={max_iter} before tol={tol}; their top "
            "eigenvalues are lower bounds and bias the fit. Raise max_iter or loosen tol.",
            RuntimeWarning,
            stacklevel=2,
        )
    return fit_batch_size_law(observed_sizes, observed, dataset_size, curvature=curvature)

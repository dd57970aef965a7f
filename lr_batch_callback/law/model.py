r"""The batch-size law of the batch curvature's top eigenvalue, and what it means for the LR.

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

:class:`BatchSizeLaw` holds a fitted law (constants, fit statistics, observations) and turns it
into predictions, critical batch sizes and learning-rate factors. Fits live in
:mod:`~lr_batch_callback.law.fit`, measurements on a model in :mod:`~lr_batch_callback.law.measure`.
NumPy arithmetic only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, overload

import numpy as np
from numpy.typing import NDArray

from lr_batch_callback._checks import check_curvature

__all__ = ["BatchSizeLaw", "curvature_lr_factor"]


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



def curvature_lr_factor(lambda_old: float, lambda_new: float, adaptive: bool) -> float:
    r"""The LR factor that keeps the same fraction of the stability limit as the top eigenvalue moves.

    When it moves from ``lambda_old`` to ``lambda_new``, the factor is
    :math:`\lambda_{old}/\lambda_{new}` for SGD, and its square root for Adam-family optimizers
    (``adaptive``), which divide by :math:`\sqrt{v}\sim\sqrt{\lambda}`.

    Raises:
        ValueError: unless both eigenvalues are finite and > 0.

    Example:
        >>> curvature_lr_factor(8.0, 2.0, adaptive=False), curvature_lr_factor(8.0, 2.0, adaptive=True)
        (4.0, 2.0)
    """
    if not all(math.isfinite(lam) and lam > 0.0 for lam in (lambda_old, lambda_new)):
        raise ValueError(
            f"Eigenvalue ratios need finite top eigenvalues > 0, got {lambda_old!r} and "
            f"{lambda_new!r}."
        )
    ratio = lambda_old / lambda_new
    return math.sqrt(ratio) if adaptive else ratio


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
        check_curvature(self.curvature)

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
        return curvature_lr_factor(old, new, adaptive)

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

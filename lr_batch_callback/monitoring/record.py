"""``SpectrumRecord``: one spectrum measurement, the single schema of every output.

A measurement travels from the engine to the outputs as this typed record, and every output is
derived from it: the scalar metrics sent to loggers (:meth:`SpectrumRecord.metrics`), the JSON
file of the measurement (:meth:`SpectrumRecord.to_json`, read back by
:meth:`SpectrumRecord.from_json`) and the density drawn in TensorBoard
(:meth:`SpectrumRecord.density_curve`).

Metric keys (``<c>`` is ``hessian`` or ``ggn``); each group always has the same keys:

=============================== ==============================================================
``<c>/lambda_max``               top eigenvalue of the batch curvature
``<c>/top_<i>``                  i-th largest eigenvalue, i = 2..k
``<c>/lambda_min``               most negative eigenvalue (measurements that include it)
``<c>/num_products``             curvature-vector products of the measurement
``<c>/converged``                1.0 when every eigenvalue met its tolerance
``<c>/seconds``                  wall time of the measurement
``<c>/batch_size``               samples the curvature was computed on (all ranks, one micro-batch)
``<c>/tokens``                   label tokens it was averaged over (token-averaged LM losses only)
``<c>/effective_batch_size``     samples per optimizer step (× accumulation × devices)
``<c>/stability``                LR × sharpness / threshold: 1 is the edge of stability (see
                                 :class:`TrainingContext`)
``<c>/preconditioned_lambda_max`` top eigenvalue of P⁻¹H for Adam-family optimizers
``hessian/critical_sharpness``    2/η_c along -g (SGD family) or -P⁻¹g (Adam family): η_c is the
                                 step at which the batch loss rises back (forward passes only)
``hessian/critical_sharpness_update`` the same along the optimizer's actual next update
``hessian/critical_ratio``        LR / η_c along -g or -P⁻¹g: above 1 that step raises the loss
``hessian/critical_ratio_update`` LR / η_c along the actual update (``inf``: it points uphill)
=============================== ==============================================================

The critical keys are always ``hessian/``: a line search measures the loss itself, whatever
curvature the eigenvalues are of. They are NaN where a direction is unknown (another optimizer's
update, Adam before its first step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lr_batch_callback.engine.density import broaden

__all__ = ["DensityQuadrature", "SpectrumEstimate", "SpectrumRecord", "TrainingContext"]


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _float_or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class DensityQuadrature:
    """The quadrature behind a spectral density: nodes and weights per probe and the width."""

    nodes: list[list[float]]
    weights: list[list[float]]
    sigma: float
    num_products: int = 0


@dataclass(frozen=True)
class SpectrumEstimate:
    r"""What the engine measured.

    Attributes:
        eigenvalues: the top-k eigenvalues, largest first.
        lambda_min: the most negative eigenvalue, when this measurement included it.
        error_bounds: the error bound of each value Lanczos was asked for: the top k, then, with
            λ_min, the bottom k (largest first, so that the last one is λ_min's).
        converged: whether every eigenvalue met the tolerance.
        num_products: curvature-vector products (density included).
        seconds: wall time.
        num_samples: samples the curvature was computed on (all ranks).
        num_tokens: label tokens it was averaged over (all ranks), when the loss is a
            token-averaged LM loss on batches with ``labels``; else ``None``.
        preconditioned_lambda_max: top eigenvalue of :math:`P^{-1/2} H P^{-1/2}` with Adam's
            preconditioner :math:`P = \mathrm{diag}(\sqrt{\hat v}) + \epsilon`, when measured.
        critical: whether critical sharpness was measured.
        critical_sharpness: :math:`2/\eta_c` along :math:`-g` or :math:`-P^{-1}g`
            (:mod:`~lr_batch_callback.engine.critical`); ``inf`` when that direction is uphill.
        critical_sharpness_update: the same along the optimizer's actual next update.
        critical_passes: forward passes the line searches took.
        product: how the curvature products were computed, ``"exact"`` or
            ``"finite_difference"`` (:mod:`~lr_batch_callback.engine.products`).
    """

    eigenvalues: list[float]
    lambda_min: float | None = None
    error_bounds: list[float] = field(default_factory=list)
    converged: bool = True
    num_products: int = 0
    seconds: float = 0.0
    num_samples: int | None = None
    num_tokens: int | None = None
    preconditioned_lambda_max: float | None = None
    critical: bool = False
    critical_sharpness: float | None = None
    critical_sharpness_update: float | None = None
    critical_passes: int = 0
    product: str = "exact"


@dataclass(frozen=True)
class TrainingContext:
    r"""The training run around a measurement.

    Attributes:
        effective_batch_size: samples per optimizer step.
        lr: the learning rate the next optimizer step uses (first param group, factor included).
        lr_factor: the batch-size LR factor in force (1.0 without LR scaling).
        stability: LR × sharpness / threshold, the edge of stability at 1. SGD with heavy-ball
            momentum :math:`\mu` diverges on the local quadratic when
            :math:`\eta\lambda_{max} > 2(1+\mu)`; Adam with :math:`\beta_1` when
            :math:`\eta\lambda_{max}(P^{-1}H) > (2+2\beta_1)/(1-\beta_1)` (Cohen et al. 2022).
        critical_ratio: LR / :math:`\eta_c` along :math:`-g` or :math:`-P^{-1}g`
            (:math:`= \eta\lambda_c/2`): above 1 a step of that LR along it raises the batch loss.
        critical_ratio_update: the same along the optimizer's actual next update.
    """

    effective_batch_size: int | None = None
    lr: float | None = None
    lr_factor: float = 1.0
    stability: float | None = None
    critical_ratio: float | None = None
    critical_ratio_update: float | None = None


# Non-finite scalars are strings in the (strict) JSON files: how they are read back.
_NON_FINITE_IN = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


@dataclass(frozen=True)
class SpectrumRecord:
    """One measurement of the batch curvature's spectrum during training.

    Attributes:
        step: the optimizer step (``trainer.global_step``) after which it was measured.
        epoch: the epoch.
        curvature: ``"hessian"`` or ``"ggn"``.
        estimate: the engine's numbers (:class:`SpectrumEstimate`).
        context: the run around it (:class:`TrainingContext`).
        density: the spectral density's quadrature, when this measurement included one.
    """

    step: int
    epoch: int
    curvature: str
    estimate: SpectrumEstimate
    context: TrainingContext = field(default_factory=TrainingContext)
    density: DensityQuadrature | None = None

    # -- the numbers users look for first -------------------------------------------------------
    @property
    def lambda_max(self) -> float:
        """The top eigenvalue."""
        return self.estimate.eigenvalues[0]

    @property
    def lambda_min(self) -> float | None:
        """The most negative eigenvalue, when this measurement included it."""
        return self.estimate.lambda_min

    @property
    def eigenvalues(self) -> list[float]:
        """The top-k eigenvalues, largest first."""
        return self.estimate.eigenvalues

    @property
    def effective_batch_size(self) -> int | None:
        """Samples per optimizer step, when known."""
        return self.context.effective_batch_size

    # -- outputs --------------------------------------------------------------------------------
    def metrics(self, k: int | None = None) -> dict[str, float]:
        """The scalar metrics of the module docstring.

        ``k`` fixes the number of ``top_i`` keys, NaN-padded when fewer eigenvalues were found.
        """
        c, e, ctx = self.curvature, self.estimate, self.context
        k = len(e.eigenvalues) if k is None else k
        out = {f"{c}/lambda_max": self.lambda_max}
        for i in range(2, k + 1):
            out[f"{c}/top_{i}"] = e.eigenvalues[i - 1] if i <= len(e.eigenvalues) else math.nan
        if e.lambda_min is not None:
            out[f"{c}/lambda_min"] = e.lambda_min
        out.update({
            f"{c}/num_products": float(e.num_products),
            f"{c}/converged": float(e.converged),
            f"{c}/seconds": e.seconds,
            f"{c}/batch_size": _float_or_nan(e.num_samples),
            f"{c}/effective_batch_size": _float_or_nan(ctx.effective_batch_size),
        })
        if e.num_tokens is not None:
            out[f"{c}/tokens"] = float(e.num_tokens)
        if e.product != "exact":
            out[f"{c}/finite_difference"] = 1.0
        if ctx.stability is not None:
            out[f"{c}/stability"] = ctx.stability
        if e.preconditioned_lambda_max is not None:
            out[f"{c}/preconditioned_lambda_max"] = e.preconditioned_lambda_max
        if e.critical:
            out.update({
                "hessian/critical_sharpness": _float_or_nan(e.critical_sharpness),
                "hessian/critical_sharpness_update": _float_or_nan(e.critical_sharpness_update),
                "hessian/critical_ratio": _float_or_nan(ctx.critical_ratio),
                "hessian/critical_ratio_update": _float_or_nan(ctx.critical_ratio_update),
            })
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite numbers become ``None``)."""
        data = asdict(self)
        estimate = data["estimate"]
        estimate["eigenvalues"] = [_finite_or_none(v) for v in self.estimate.eigenvalues]
        estimate["error_bounds"] = [_finite_or_none(v) for v in self.estimate.error_bounds]
        for key, value in (*estimate.items(), *data["context"].items()):
            if isinstance(value, float) and not math.isfinite(value):  # strict JSON: no inf, NaN
                text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
                (estimate if key in estimate else data["context"])[key] = text
        data["lambda_max"] = _finite_or_none(self.lambda_max)  # for readers of the raw file
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SpectrumRecord:
        """The record written by :meth:`to_json`.

        Raises:
            ValueError: when a required field is missing (not a spectrum record).
        """
        missing = sorted({"step", "epoch", "curvature", "estimate"} - set(data))
        if missing:
            raise ValueError(f"Not a spectrum record: fields {missing} are missing (got "
                             f"{sorted(data)}).")
        estimate = dict(data["estimate"])
        estimate["eigenvalues"] = [_float_or_nan(v) for v in estimate["eigenvalues"]]
        estimate["error_bounds"] = [_float_or_nan(v) for v in estimate.get("error_bounds", [])]
        context: dict[str, Any] = {key: _NON_FINITE_IN.get(value, value) if isinstance(value, str)
                                   else value
                                   for key, value in data.get("context", {}).items()}
        estimate = {key: _NON_FINITE_IN.get(value, value) if isinstance(value, str) else value
                    for key, value in estimate.items()}
        density = data.get("density")
        return cls(
            step=int(data["step"]), epoch=int(data["epoch"]), curvature=str(data["curvature"]),
            estimate=SpectrumEstimate(**estimate),
            context=TrainingContext(**context),
            density=DensityQuadrature(**density) if density else None,
        )

    def density_curve(self, grid_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(grid, density)`` rebuilt from the quadrature, or ``None`` without a density."""
        if self.density is None:
            return None
        nodes = torch.as_tensor(self.density.nodes, dtype=torch.float64)
        weights = torch.as_tensor(self.density.weights, dtype=torch.float64)
        grid, values, _ = broaden(nodes, weights, float(self.density.sigma), grid_size)
        return grid, values

    # -- flat lookups (``record["lambda_max"]``), for code that reads records as plain dicts ----
    def __getitem__(self, key: str) -> Any:
        for part in (self, self.estimate, self.context):
            if key in type(part).__dataclass_fields__ or isinstance(
                    getattr(type(part), key, None), property):
                value = getattr(part, key)
                return asdict(value) if isinstance(value, DensityQuadrature) else value
        if key == "batch_size":
            return self.estimate.num_samples
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        """``record[key]``, or ``default`` for an unknown key."""
        try:
            return self[key]
        except KeyError:
            return default

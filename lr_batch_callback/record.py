"""``SpectrumRecord``: one spectrum measurement, the single schema of every output.

A measurement travels from the engine to the outputs as this typed record, and every output is
derived from it: the scalar metrics sent to loggers (:meth:`SpectrumRecord.metrics`), the JSON
file of the measurement (:meth:`SpectrumRecord.to_json`, read back by
:meth:`SpectrumRecord.from_json`) and the density drawn in TensorBoard
(:meth:`SpectrumRecord.density_curve`).

Metric keys (``<c>`` is ``hessian`` or ``ggn``), each group always with the same keys:

========================== ===================================================================
``<c>/lambda_max``          top eigenvalue of the batch curvature
``<c>/top_<i>``             i-th largest eigenvalue, i = 2..k
``<c>/lambda_min``          most negative eigenvalue, on the measurements that include it
``<c>/num_products``        curvature-vector products of the measurement
``<c>/converged``           1.0 when every eigenvalue met its tolerance
``<c>/seconds``             wall time of the measurement
``<c>/batch_size``          samples the curvature was computed on (all ranks, one micro-batch)
``<c>/effective_batch_size`` samples per optimizer step (× accumulation × devices)
``<c>/stability``           LR × λ_max / (2(1+μ)) for SGD-family optimizers (instability at 1)
========================== ===================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from lr_batch_callback.engine.density import broaden

__all__ = ["DensityQuadrature", "SpectrumRecord"]


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class DensityQuadrature:
    """The quadrature behind a spectral density: nodes and weights per probe and the width."""

    nodes: list[list[float]]
    weights: list[list[float]]
    sigma: float
    num_products: int = 0


@dataclass(frozen=True)
class SpectrumRecord:
    """One measurement of the batch curvature's spectrum during training.

    Attributes:
        step: the optimizer step (``trainer.global_step``) after which it was measured.
        epoch: the epoch.
        curvature: ``"hessian"`` or ``"ggn"``.
        eigenvalues: the top-k eigenvalues, largest first.
        lambda_min: the most negative eigenvalue, when this measurement included it.
        error_bounds: the error bound of each eigenvalue (``eigenvalues`` then ``lambda_min``).
        converged: whether every eigenvalue met the tolerance.
        num_products: curvature-vector products of the measurement (density included).
        seconds: its wall time.
        batch_size: samples the curvature was computed on.
        effective_batch_size: samples per optimizer step.
        lr_factor: the LR factor in force (1.0 without LR scaling).
        stability: ``LR × λ_max / (2(1+μ))`` of the first param group for SGD-family optimizers
            (``None`` otherwise): heavy-ball SGD is unstable on the local quadratic above 1.
        density: the spectral density's quadrature, when this measurement included one.
    """

    step: int
    epoch: int
    curvature: str
    eigenvalues: list[float]
    lambda_min: float | None = None
    error_bounds: list[float] = field(default_factory=list)
    converged: bool = True
    num_products: int = 0
    seconds: float = 0.0
    batch_size: int | None = None
    effective_batch_size: int | None = None
    lr_factor: float = 1.0
    stability: float | None = None
    density: DensityQuadrature | None = None

    @property
    def lambda_max(self) -> float:
        """The top eigenvalue."""
        return self.eigenvalues[0]

    # -- outputs --------------------------------------------------------------------------------
    def metrics(self, k: int | None = None) -> dict[str, float]:
        """The scalar metrics of the module docstring (``k`` fixes the number of ``top_i`` keys,
        NaN-padded when fewer eigenvalues were found)."""
        c = self.curvature
        k = len(self.eigenvalues) if k is None else k
        out = {f"{c}/lambda_max": self.lambda_max}
        for i in range(2, k + 1):
            out[f"{c}/top_{i}"] = self.eigenvalues[i - 1] if i <= len(self.eigenvalues) else math.nan
        if self.lambda_min is not None:
            out[f"{c}/lambda_min"] = self.lambda_min
        out.update({
            f"{c}/num_products": float(self.num_products),
            f"{c}/converged": float(self.converged),
            f"{c}/seconds": self.seconds,
            f"{c}/batch_size": float(self.batch_size) if self.batch_size else math.nan,
            f"{c}/effective_batch_size": (float(self.effective_batch_size)
                                          if self.effective_batch_size else math.nan),
        })
        if self.stability is not None:
            out[f"{c}/stability"] = self.stability
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite numbers become ``None``)."""
        data = asdict(self)
        data["eigenvalues"] = [_finite_or_none(v) for v in self.eigenvalues]
        data["error_bounds"] = [_finite_or_none(v) for v in self.error_bounds]
        data["lambda_max"] = _finite_or_none(self.lambda_max)  # for readers of the raw file
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SpectrumRecord:
        """The record written by :meth:`to_json`.

        Raises:
            ValueError: when a required field is missing (not a spectrum record).
        """
        names = {f.name for f in fields(cls)}
        missing = sorted({"step", "epoch", "curvature", "eigenvalues"} - set(data))
        if missing:
            raise ValueError(f"Not a spectrum record: fields {missing} are missing (got "
                             f"{sorted(data)}).")
        values = {k: v for k, v in data.items() if k in names}
        values["eigenvalues"] = [math.nan if v is None else float(v) for v in values["eigenvalues"]]
        values["error_bounds"] = [math.nan if v is None else float(v)
                                  for v in values.get("error_bounds", [])]
        if values.get("density"):
            values["density"] = DensityQuadrature(**values["density"])
        return cls(**values)

    def density_curve(self, grid_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(grid, density)`` rebuilt from the quadrature, or ``None`` without a density."""
        if self.density is None:
            return None
        nodes = torch.as_tensor(self.density.nodes, dtype=torch.float64)
        weights = torch.as_tensor(self.density.weights, dtype=torch.float64)
        grid, values, _ = broaden(nodes, weights, float(self.density.sigma), grid_size)
        return grid, values

    # -- mapping access, so that code written for the dict records of 0.1 keeps working --------
    def __getitem__(self, key: str) -> Any:
        if key == "lambda_max" or key in {f.name for f in fields(self)}:
            value = getattr(self, key)
            return asdict(value) if isinstance(value, DensityQuadrature) else value
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        """``record[key]``, or ``default`` for an unknown key."""
        try:
            return self[key]
        except KeyError:
            return default

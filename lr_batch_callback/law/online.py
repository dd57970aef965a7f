r"""The batch-size law during training: a pool of recent samples and the fit made from it.

``rule="curvature"`` needs :math:`\lambda(B)` at the current weights. :class:`SamplePool` keeps the
most recent training samples (detached, on their device); at each batch-size change
:func:`fit_from_pool` measures the law on sub-batches of that pool
(:func:`~lr_batch_callback.law.measure.estimate_batch_size_law`). :class:`LawConfig` holds the
knobs. No Lightning here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lr_batch_callback._checks import check_fraction, check_integer
from lr_batch_callback.engine.batching import batch_size_of, concat_batches
from lr_batch_callback.engine.operators import LossFn
from lr_batch_callback.law.measure import estimate_batch_size_law
from lr_batch_callback.law.model import BatchSizeLaw

__all__ = ["LawConfig", "SamplePool", "fit_from_pool"]


@dataclass(frozen=True)
class LawConfig:
    r"""How ``rule="curvature"`` measures :math:`\lambda(B)` during training.

    Attributes:
        samples: recent training samples the law is fitted on (sub-batches are drawn from them).
        draws: random sub-batches per sub-batch size.
        min_r_squared: a fit whose R² on the per-batch-size mean eigenvalues is lower is logged
            but not used: the linear/√ rule applies until a better fit.
    """

    samples: int = 512
    draws: int = 3
    min_r_squared: float = 0.5

    def __post_init__(self) -> None:
        check_integer(self.samples, "samples", minimum=16)
        check_integer(self.draws, "draws")
        check_fraction(self.min_r_squared, "min_r_squared", closed_low=True)


class SamplePool:
    """The most recent ``capacity`` training samples (whole batches, oldest dropped first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.batches: list[Any] = []
        self.size = 0

    def add(self, batch: Any) -> None:
        """Keep a detached reference to ``batch`` (ignored when its size cannot be told)."""
        try:
            size = batch_size_of(batch)
        except ValueError:
            return
        detached = _detach(batch)
        self.batches.append(detached)
        self.size += size
        while self.batches and self.size - batch_size_of(self.batches[0]) >= self.capacity:
            self.size -= batch_size_of(self.batches.pop(0))

    def sample(self) -> Any:
        """All pooled samples as one batch."""
        return concat_batches(self.batches)


def _detach(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.detach()
    if isinstance(batch, dict):
        return {k: _detach(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_detach(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_detach(v) for v in batch)
    return batch


def fit_from_pool(model: nn.Module, loss_fn: LossFn, pool: SamplePool, config: LawConfig, *,
                  curvature: str, dataset_size: int | None, seed: int, tol: float,
                  max_iter: int) -> BatchSizeLaw:
    """The law measured on sub-batches of the pooled samples at the model's current weights."""
    return estimate_batch_size_law(
        model, loss_fn, pool.sample(), draws=config.draws, dataset_size=dataset_size,
        curvature=curvature, seed=seed, tol=tol, max_iter=max_iter,
    )

"""Which loss a curvature measurement differentiates: the user's, the module's, or training_step's."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule
from lightning_utilities.core.rank_zero import WarningCache

from lr_batch_callback.engine.operators import LossFn

__all__ = ["loss_from_training_step", "resolve_loss"]


def loss_from_training_step(module: Any, batch: Any, batch_idx: int = 0) -> torch.Tensor:
    """The loss returned by ``module.training_step`` with its ``self.log`` calls silenced."""
    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
    # The stand-ins take whatever ``self.log`` / ``self.log_dict`` take, and drop it.
    module.log = lambda *args, **kwargs: None  # noqa: ARG005
    module.log_dict = lambda *args, **kwargs: None  # noqa: ARG005
    try:
        out = module.training_step(batch, batch_idx)
    finally:
        for name, value in saved.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            "training_step did not return a loss tensor (or a dict with 'loss'), so the Hessian "
            "cannot be measured. Pass loss_fn= or define `curvature_loss(self, batch)` on the "
            "LightningModule."
        )
    return out


def resolve_loss(pl_module: LightningModule, loss_fn: LossFn | None,
                 warnings_: WarningCache) -> LossFn:
    """The loss whose curvature is measured: ``loss_fn``, or one the module defines.

    That is ``loss_fn``, else the module's ``curvature_loss(batch)``, else ``training_step``'s
    loss (said once through ``warnings_``).

    Args:
        pl_module: the LightningModule being trained.
        loss_fn: the user's ``loss_fn(model, batch)``, or ``None``.
        warnings_: where the fallback to ``training_step`` is said, once.

    Raises:
        MisconfigurationException: under manual optimization without either, where
            ``training_step`` steps the optimizers itself.
    """
    if loss_fn is not None:
        return loss_fn
    if callable(getattr(pl_module, "curvature_loss", None)):
        return lambda module, batch: module.curvature_loss(batch)  # type: ignore[operator]
    if not pl_module.automatic_optimization:
        raise MisconfigurationException(
            "Manual optimization: training_step steps the optimizers itself, so it cannot serve "
            "as the loss for Hessian measurements. Pass loss_fn= to the callback or define "
            "`curvature_loss(self, batch)` on your LightningModule."
        )
    warnings_.warn(
        "Spectrum monitoring measures the Hessian of `training_step`'s loss (logging "
        "silenced). Define `curvature_loss(self, batch) -> Tensor` on the LightningModule or "
        "pass loss_fn= to make it explicit."
    )
    return loss_from_training_step

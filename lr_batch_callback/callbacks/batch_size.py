"""Where the batch size comes from in a Lightning run, and the effective batch size.

Effective batch size = per-device batch × ``accumulate_grad_batches`` × world size. The
per-device batch is read, in order, from the train dataloader (``batch_size`` or
``batch_sampler.batch_size``), from ``batch_size_attr`` on the LightningModule, its ``hparams``
or the DataModule (what BatchSizeFinder and BatchSizeSchedule set), and from the batches
themselves (``batch_size_fn``, default: the leading dimension of their first tensor), followed
batch by batch: a new size counts from the second batch in a row that has it.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr

from lr_batch_callback._checks import check_callable
from lr_batch_callback.engine.batching import BatchSizeFn, batch_size_of

__all__ = ["BatchSizeReader", "effective_batch_size", "loader_batch_size"]


def effective_batch_size(per_device: int, accumulate_grad_batches: int, world_size: int) -> int:
    """Samples per optimizer step: per-device batch × gradient accumulation × devices."""
    return int(per_device) * int(accumulate_grad_batches) * int(world_size)


def loader_batch_size(loader: Any) -> int | None:
    """The per-device batch size a dataloader (or a structure of them) was built with."""
    if isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if loader is None:
        return None
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return int(size) if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


class BatchSizeReader:
    """Reads the per-device and effective batch size of a run (see the module docstring).

    Args:
        attr: the batch-size attribute of the module, its hparams or the DataModule.
        fn: counts the samples of a batch, for batches whose size the dataloader does not
            state (custom batch objects, iterable datasets yielding ready-made batches).
    """

    def __init__(self, attr: str = "batch_size", fn: BatchSizeFn | None = None) -> None:
        if not isinstance(attr, str) or not attr.isidentifier():
            raise TypeError(f"batch_size_attr must be an attribute name (a string), got {attr!r}.")
        self.attr = attr
        self.fn = check_callable(fn, "batch_size_fn", "(batch) -> number of samples")
        self.from_batches: int | None = None  # the batches' size, when it can be told
        self._pending: int | None = None  # a new size seen on one batch, not yet on two

    def attribute(self, pl_module: LightningModule) -> int | None:
        """The per-device batch size held by ``attr``, if any."""
        try:
            if lightning_hasattr(pl_module, self.attr):
                value = lightning_getattr(pl_module, self.attr)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        except Exception:  # a datamodule-less module raises from lightning_hasattr in some setups
            return None
        return None

    @staticmethod
    def loader(trainer: Trainer) -> int | None:
        """The train dataloader's per-device batch size, if it says."""
        try:
            return loader_batch_size(trainer.train_dataloader)
        except Exception:  # no dataloader yet
            return None

    def count(self, batch: Any) -> int | None:
        """Samples in ``batch`` (``batch_size_fn`` or the leading tensor dimension), or ``None``."""
        try:
            value = self.fn(batch) if self.fn is not None else batch_size_of(batch)
        except (ValueError, TypeError):
            return None
        return int(value) if isinstance(value, int) and value > 0 else None

    def observe(self, batch: Any) -> None:
        """Follow the size of the training batches (the last resort of :meth:`per_device`).

        The first batch sets it; later, a new size counts once two batches in a row have it, so
        one odd batch (the short last batch of an epoch) does not move the LR back and forth.
        """
        size = self.count(batch)
        if size is None:
            return
        if self.from_batches is None or size == self.from_batches or size == self._pending:
            self.from_batches, self._pending = size, None
        else:
            self._pending = size

    def follow(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """Observe ``batch`` when the batches are what tells the size.

        That is always before the first size is known, and while neither the loader nor ``attr``
        says it.
        """
        if (self.from_batches is None
                or (self.loader(trainer) is None and self.attribute(pl_module) is None)):
            self.observe(batch)

    def per_device(self, trainer: Trainer, pl_module: LightningModule) -> int | None:
        """The per-device batch size: the loader's, else ``attr``'s, else the batches' (or ``None``)."""
        return self.loader(trainer) or self.attribute(pl_module) or self.from_batches

    def effective(self, trainer: Trainer, pl_module: LightningModule) -> int | None:
        """The effective batch size (:meth:`per_device` × accumulation × devices), if known."""
        per_device = self.per_device(trainer, pl_module)
        if per_device is None:
            return None
        return effective_batch_size(per_device, trainer.accumulate_grad_batches,
                                    trainer.world_size)

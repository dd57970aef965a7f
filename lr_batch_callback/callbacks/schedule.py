"""``BatchSizeSchedule``: change the per-device batch size at chosen epochs.

The batch-size counterpart of Lightning's ``GradientAccumulationScheduler``: "increase the batch
size instead of decaying the learning rate" (Smith et al., 2018). It sets the batch-size attribute
of the LightningModule or DataModule (as BatchSizeFinder does, through ``lightning_setattr``) and
has the train dataloader rebuilt before the scheduled epoch starts, so your ``train_dataloader``
must read that attribute. Pair it with :class:`~lr_batch_callback.BatchSizeLRCallback` to rescale
the learning rate at each change.
"""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr
from typing_extensions import override

from lr_batch_callback._checks import check_size_schedule

__all__ = ["BatchSizeSchedule", "scheduled"]


def scheduled(schedule: dict[int, int], point: int) -> int | None:
    """The value in force at ``point`` of a sorted ``{start: value}`` schedule.

    ``None`` before its first start.
    """
    value = None
    for start, size in schedule.items():
        if point >= start:
            value = size
    return value


class BatchSizeSchedule(Callback):
    """Set the per-device batch size from a schedule ``{epoch: batch_size}``.

    Args:
        scheduling: maps the first epoch (0-based) of each phase to its per-device batch size;
            epochs before the first key keep the configured batch size.
        batch_size_attr: the attribute holding the batch size on the LightningModule, its
            ``hparams``, or the DataModule.

    Example::

        trainer = Trainer(callbacks=[BatchSizeSchedule({0: 32, 5: 128, 10: 512}),
                                     BatchSizeLRCallback()])
    """

    def __init__(self, scheduling: dict[int, int], batch_size_attr: str = "batch_size") -> None:
        super().__init__()
        checked = check_size_schedule(scheduling, "scheduling", "epoch")
        if not isinstance(batch_size_attr, str) or not batch_size_attr.isidentifier():
            raise TypeError(f"batch_size_attr must be an attribute name, got {batch_size_attr!r}.")
        self.scheduling = checked
        self.batch_size_attr = batch_size_attr

    def batch_size_for(self, epoch: int) -> int | None:
        """The scheduled batch size of ``epoch`` (``None`` before the first scheduled epoch)."""
        return scheduled(self.scheduling, epoch)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and not lightning_hasattr(pl_module, self.batch_size_attr):
            raise MisconfigurationException(
                f"BatchSizeSchedule needs a `{self.batch_size_attr}` attribute on the "
                "LightningModule, its hparams or the DataModule, read by train_dataloader(). Add "
                f"one, or pass batch_size_attr= naming yours."
            )

    def _set(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        size = self.batch_size_for(epoch)
        if size is None or lightning_getattr(pl_module, self.batch_size_attr) == size:
            return
        lightning_setattr(pl_module, self.batch_size_attr, size)
        # The loop rebuilds the train dataloader before the next epoch when it has none: the same
        # mechanism BatchSizeFinder uses after changing the batch size.
        trainer.fit_loop._combined_loader = None
        rank_zero_info(f"BatchSizeSchedule: per-device batch size {size} from epoch {epoch}.")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A fresh run, or a resume into a later phase of the schedule.
        self._set(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        upcoming = trainer.current_epoch + 1
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= upcoming:
            return  # that epoch never runs: nothing to change or announce
        self._set(trainer, pl_module, upcoming)

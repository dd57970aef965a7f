"""``BatchSizeRamp``: ramp the effective batch size by optimizer steps, samples or tokens seen.

Large-model pretraining ramps the global batch up over the first steps or tokens, inside one
epoch. Lightning can only change the per-device batch size between epochs (the loader is built
once per epoch), so the ramp is applied through gradient accumulation, which Lightning reads at
every batch: with a per-device batch ``b`` on ``W`` devices, an effective batch ``B`` is
``B / (b·W)`` accumulated batches per optimizer step, and the learning rate follows through
:class:`~lr_batch_callback.BatchSizeLRScaling` (which reads ``accumulate_grad_batches``).

**When a change lands.** Lightning closes an accumulation window when the epoch's batch count is a
multiple of ``accumulate_grad_batches``, and zeroes the gradients when the batch index is. So a
new accumulation ``a`` starts at the first optimizer-step boundary at or after the scheduled
point where the epoch's batch count is a multiple of ``a`` (always at an epoch start). For sizes
that double, that is at most one step at the old size later; a decrease lands at once. Each change
is announced with the step where it landed, and that is the step from which the LR follows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils._pytree import tree_leaves
from typing_extensions import override

from lr_batch_callback._checks import check_callable, check_choice, check_size_schedule
from lr_batch_callback.callbacks.base import StableCallback
from lr_batch_callback.callbacks.batch_size import BatchSizeReader
from lr_batch_callback.callbacks.schedule import scheduled

__all__ = ["BatchSizeRamp", "count_tokens"]

UNITS = ("step", "sample", "token")


def count_tokens(batch: Any) -> int:
    """Tokens in a batch: the elements of ``input_ids`` (a mapping's) or of its first tensor.

    Example:
        >>> count_tokens({"input_ids": torch.zeros(4, 128, dtype=torch.long)})
        512
    """
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        return int(batch["input_ids"].numel())
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor):
            return int(leaf.numel())
    raise ValueError(f"Cannot count the tokens of a batch of type {type(batch).__name__}: it holds "
                     "no tensor. Pass tokens_fn=(batch -> number of tokens).")


class BatchSizeRamp(StableCallback):
    """Change the effective batch size at chosen optimizer steps, samples or tokens seen.

    Args:
        schedule: maps a point of training (``unit`` s seen, counted over all devices) to the
            effective batch size (samples per optimizer step, over all devices) from there on.
            Before the first key the Trainer's own ``accumulate_grad_batches`` holds. Each size
            must be a multiple of per-device batch × devices.
        unit: what the keys count: ``"step"`` (optimizer steps, ``trainer.global_step``),
            ``"sample"`` or ``"token"``.
        tokens_fn: ``(batch) -> number of tokens`` for ``unit="token"`` (default
            :func:`count_tokens`: the elements of ``input_ids`` or of the first tensor).
        batch_size_attr: the per-device batch-size attribute, read when the train dataloader does
            not state its ``batch_size``.

    Example::

        # 64 sequences per step, 128 after 1M tokens, 256 after 4M: per-device batch 16, 2 GPUs
        trainer = Trainer(devices=2, callbacks=[
            BatchSizeRamp({0: 64, 1_000_000: 128, 4_000_000: 256}, unit="token"),
            BatchSizeLRCallback()])
    """

    def __init__(self, schedule: dict[int, int], unit: str = "step",
                 tokens_fn: Callable[[Any], int] | None = None,
                 batch_size_attr: str = "batch_size") -> None:
        super().__init__()
        self.unit = check_choice(unit, "unit", UNITS,
                                 hint="For a schedule by epoch use BatchSizeSchedule.")
        self.schedule = check_size_schedule(schedule, "schedule", self.unit)
        self.tokens_fn = check_callable(tokens_fn, "tokens_fn", "(batch) -> number of tokens")
        self.reader = BatchSizeReader(batch_size_attr)
        self.seen = 0  # samples or tokens seen, over all devices (steps are trainer.global_step)
        self.accumulation: int | None = None  # what this ramp last set
        self._per_step = 0  # samples or tokens of the current accumulation window, this device
        self._configured = 1

    # -- state -----------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "accumulation": self.accumulation, "unit": self.unit}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("unit", self.unit) != self.unit:
            raise MisconfigurationException(
                f"BatchSizeRamp: the checkpoint counted {state_dict['unit']}s, this run counts "
                f"{self.unit}s; resume with unit={state_dict['unit']!r}.")
        self.seen = int(state_dict.get("seen", 0))
        self.accumulation = state_dict.get("accumulation")

    # -- hooks -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "BatchSizeRamp applies the ramp through gradient accumulation, which Lightning "
                "does only under automatic optimization; with manual optimization change the "
                "batch size yourself.")
        if any(isinstance(cb, GradientAccumulationScheduler)
               for cb in getattr(trainer, "callbacks", [])):
            raise MisconfigurationException(
                "BatchSizeRamp and GradientAccumulationScheduler both set accumulate_grad_batches;"
                " use one of them.")
        if trainer.strategy.handles_gradient_accumulation:
            raise MisconfigurationException(
                f"BatchSizeRamp cannot change gradient accumulation under "
                f"{type(trainer.strategy).__name__}, which fixes it at setup.")
        self._configured = trainer.accumulate_grad_batches

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start_steps(trainer)
        self._check_sizes(trainer, pl_module)
        if self.accumulation is not None:  # a resume: the ramp goes on where it was
            trainer.accumulate_grad_batches = self.accumulation
        self._advance(trainer, pl_module, self._ready(trainer))

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The epoch's batch count restarts at 0 (Lightning resets it just after this hook), so the
        # epoch's first window may take any size.
        self._advance(trainer, pl_module, 0)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.unit != "step":
            self._per_step += self._count(batch)
        if not self.stepped(trainer):
            return
        if self.unit != "step":
            self.seen += self._global(trainer, self._per_step)
            self._per_step = 0
        self._advance(trainer, pl_module, self._ready(trainer))

    # -- the ramp --------------------------------------------------------------------------------
    def size_at(self, point: int) -> int | None:
        """The scheduled effective batch size once ``point`` units are seen (``None`` before)."""
        return scheduled(self.schedule, point)

    def progress(self, trainer: Trainer) -> int:
        """How far training is, in ``unit`` s: optimizer steps taken, or samples or tokens seen."""
        return trainer.global_step if self.unit == "step" else self.seen

    @staticmethod
    def _ready(trainer: Trainer) -> int:
        """Batches of this epoch so far.

        Lightning closes an accumulation window when this count is a multiple of the accumulation.
        """
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def _devices_batch(self, trainer: Trainer, pl_module: LightningModule) -> int:
        per_device = self.reader.loader(trainer) or self.reader.attribute(pl_module)
        if per_device is None:
            raise MisconfigurationException(
                "BatchSizeRamp needs the per-device batch size before training: give the train "
                f"dataloader a batch_size, or the module a `{self.reader.attr}` attribute (or "
                "name yours with batch_size_attr=).")
        return per_device * trainer.world_size

    def _check_sizes(self, trainer: Trainer, pl_module: LightningModule) -> None:
        unit = self._devices_batch(trainer, pl_module)
        bad = [size for size in self.schedule.values() if size % unit]
        if bad:
            raise MisconfigurationException(
                f"BatchSizeRamp: effective batch sizes {bad} are not multiples of per-device batch "
                f"× devices = {unit}, so no gradient accumulation gives them. Use multiples of "
                f"{unit} (for example {sorted({max(unit, round(s / unit) * unit) for s in bad})}).")

    def _advance(self, trainer: Trainer, pl_module: LightningModule, ready: int) -> None:
        """Start the scheduled accumulation if a window of that size may start here.

        Called at a step boundary, ``ready`` batches into the epoch.
        """
        size = self.size_at(self.progress(trainer))
        devices_batch = self._devices_batch(trainer, pl_module)
        target = self._configured if size is None else size // devices_batch
        if target == trainer.accumulate_grad_batches or ready % target:
            return  # nothing to change, or not a window boundary of the new size yet
        trainer.accumulate_grad_batches = self.accumulation = target
        rank_zero_info(f"BatchSizeRamp: effective batch size {target * devices_batch} ({target} "
                       f"accumulated batches) from step {trainer.global_step}.")

    def _count(self, batch: Any) -> int:
        if self.unit == "token":
            return int((self.tokens_fn or count_tokens)(batch))
        size = self.reader.count(batch)
        if size is None:
            raise MisconfigurationException(
                f"BatchSizeRamp cannot count the samples of a batch of type "
                f"{type(batch).__name__}; use unit='step' or unit='token' with tokens_fn=.")
        return size

    @staticmethod
    def _global(trainer: Trainer, count: int) -> int:
        """``count`` summed over the devices, so every rank takes the same decision."""
        if trainer.world_size == 1:
            return count
        local = torch.tensor(float(count), device=trainer.strategy.root_device)
        total = trainer.strategy.reduce(local, reduce_op="sum")
        return int(round(float(total)))

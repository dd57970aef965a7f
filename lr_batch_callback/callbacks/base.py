"""What the package's callbacks share: a stable state key and "did an optimizer step happen?".

The state key is the class name alone, whatever the constructor arguments: a resumed run whose
callback is configured differently (the rule spelled another way) still finds its state.
``on_train_batch_end`` also runs for batches that only accumulate gradients; :meth:`stepped` says
whether ``trainer.global_step`` advanced since the last call.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["StableCallback"]


class StableCallback(Callback):
    """A Callback with an argument-independent state key and optimizer-step detection."""

    _last_step: int = -1

    @property
    @override
    def state_key(self) -> str:
        return type(self).__qualname__

    def start_steps(self, trainer: Trainer) -> None:
        """Remember the current step (call in ``on_train_start``)."""
        self._last_step = trainer.global_step

    def stepped(self, trainer: Trainer) -> bool:
        """Whether an optimizer step happened since the last call (not during accumulation)."""
        if trainer.global_step == self._last_step:
            return False
        self._last_step = trainer.global_step
        return True

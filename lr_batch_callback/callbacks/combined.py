"""``BatchSizeLRCallback``: LR scaling and spectrum monitoring in one callback.

The one-line way to get both parts: it builds a
:class:`~lr_batch_callback.callbacks.BatchSizeLRScaling` (``.scaling``) and a
:class:`~lr_batch_callback.callbacks.SpectrumMonitor` (``.monitor``) and forwards every hook to
them (every ``Callback`` hook, by construction), the LR part first so that a measurement sees the
LR the next step uses and the batch size the LR part read. Use either part alone when that is
all you need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lr_batch_callback._checks import check_integer
from lr_batch_callback.callbacks.base import StableCallback
from lr_batch_callback.callbacks.monitor import SpectrumMonitor
from lr_batch_callback.callbacks.scaling import BatchSizeLRScaling, RuleArg
from lr_batch_callback.engine.batching import BatchSizeFn
from lr_batch_callback.engine.operators import LossFn
from lr_batch_callback.law.model import BatchSizeLaw
from lr_batch_callback.law.online import LawConfig
from lr_batch_callback.monitoring.measurement import MonitorConfig

__all__ = ["BatchSizeLRCallback"]

class BatchSizeLRCallback(StableCallback):
    """Rescale the learning rate when the effective batch size changes; log batch-Hessian spectra.

    Args:
        rule: ``"auto"`` (√ for Adam-family optimizers, linear for SGD-family), ``"linear"``,
            ``"sqrt"``, ``"none"``, ``"curvature"`` (experimental), a callable
            ``(old_batch_size, new_batch_size) -> float``, or a list with one per optimizer.
        reference_batch_size: the effective batch size the configured LRs were tuned for
            (default: the one configured when ``fit`` starts). Kept in checkpoints.
        batch_size_attr: attribute (module, hparams or DataModule) holding the per-device batch.
        batch_size_fn: counts the samples of a batch when the dataloader does not say.
        loss_fn: ``loss_fn(module, batch) -> scalar`` for the measurements (default: the
            module's ``curvature_loss(batch)``, else ``training_step``'s loss).
        monitor_every_n_steps: measure the spectrum every this many optimizer steps; ``None``
            turns monitoring off.
        monitor: what each measurement contains and its time budget (:class:`MonitorConfig`).
        monitor_on_batch_size_change: also measure right after each batch-size change.
        law: how ``rule="curvature"`` measures λ(B) (:class:`LawConfig`).
        verbose: print a line when the factor changes.

    Example::

        trainer = Trainer(callbacks=[BatchSizeLRCallback(rule="auto")])
    """

    def __init__(
        self,
        rule: RuleArg = "auto",
        reference_batch_size: int | None = None,
        batch_size_attr: str = "batch_size",
        batch_size_fn: BatchSizeFn | None = None,
        loss_fn: LossFn | None = None,
        monitor_every_n_steps: int | None = 250,
        monitor: MonitorConfig | None = None,
        monitor_on_batch_size_change: bool = True,
        law: LawConfig | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        check_integer(monitor_every_n_steps, "monitor_every_n_steps", allow_none=True,
                      hint="None turns monitoring off")
        if monitor is not None and not isinstance(monitor, MonitorConfig):
            raise TypeError(f"monitor must be a MonitorConfig (or None for the defaults), got "
                            f"{monitor!r}.")
        self.scaling = BatchSizeLRScaling(rule, reference_batch_size, batch_size_attr,
                                          batch_size_fn, loss_fn, law, verbose)
        self.monitor = SpectrumMonitor(monitor_every_n_steps, monitor,
                                       monitor_on_batch_size_change, loss_fn, batch_size_attr,
                                       batch_size_fn)
        self.monitor.use_scaling(self.scaling)  # one batch-size reader, the LR from its scalers
        self._parts: tuple[Callback, ...] = (self.scaling, self.monitor)

    # -- the LR part's results, for convenience ----------------------------------------------------
    @property
    def factors(self) -> list[float]:
        """The LR factor of each optimizer (``[]`` before the first one is set)."""
        return self.scaling.factors

    @property
    def reference_batch_size(self) -> int | None:
        """The effective batch size the configured LRs are for."""
        size: int | None = self.scaling.reference_batch_size
        return size

    @property
    def effective_batch_size(self) -> int | None:
        """The effective batch size now (samples per optimizer step over all devices)."""
        size: int | None = self.scaling.effective_batch_size
        return size

    @property
    def law(self) -> BatchSizeLaw | None:
        """The fitted λ(B) law of ``rule="curvature"``, or ``None``."""
        return self.scaling.law

    @property
    def rule_names(self) -> list[str]:
        """The rule in force for each optimizer."""
        return self.scaling.rule_names

    def scaling_metrics(self) -> dict[str, float]:
        """The LR part's ``lr_batch/*`` metrics."""
        return self.scaling.scaling_metrics()

    # -- state -------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.scaling.state_dict(), "monitor": self.monitor.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scaling.load_state_dict(state_dict)
        self.monitor.load_state_dict(state_dict.get("monitor", {}))



def _hook_names() -> tuple[str, ...]:
    """Every hook a Lightning ``Callback`` defines (``setup``, ``teardown`` and ``on_*``)."""
    return tuple(name for name, member in vars(Callback).items()
                 if callable(member) and (name.startswith("on_") or name in ("setup", "teardown")))


def _forwarder(name: str) -> Callable[..., None]:
    def hook(self: BatchSizeLRCallback, *args: Any, **kwargs: Any) -> None:
        for part in self._parts:
            getattr(part, name)(*args, **kwargs)

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = f"``{name}`` of each part, the LR part first."
    return hook


# Every hook is forwarded by construction: a hook that a part implements (now or later) is never
# silently dropped. The parts' no-op hooks cost a Python call each.
for _name in _hook_names():
    setattr(BatchSizeLRCallback, _name, _forwarder(_name))
del _name

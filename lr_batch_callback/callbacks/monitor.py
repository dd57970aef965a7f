"""``SpectrumMonitor``: periodic batch-curvature spectra of a Lightning run, logged everywhere.

The hook glue only: the measurement itself is
:func:`~lr_batch_callback.monitoring.measurement.measure_spectrum`, the time budget
:class:`~lr_batch_callback.monitoring.budget.Budget`, the outputs
:mod:`~lr_batch_callback.callbacks.loggers`. It observes and never acts: the learning rate is
the business of :class:`~lr_batch_callback.callbacks.BatchSizeLRScaling`.

Under DDP every rank measures (products are averaged across ranks, so the eigenvalues are those
of the global batch) and takes the same decisions, which rank 0 broadcasts at the same point on
every rank; only rank 0 writes. A failed measurement is a warning and a logged skip, never a
crashed run.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.rank_zero import WarningCache
from torch import nn
from typing_extensions import override

from lr_batch_callback._checks import check_bool, check_callable, check_integer
from lr_batch_callback.callbacks.base import StableCallback
from lr_batch_callback.callbacks.batch_size import BatchSizeReader
from lr_batch_callback.callbacks.increase import IncreaseWatch
from lr_batch_callback.callbacks.loggers import log_metrics, publish_record, spectra_directories
from lr_batch_callback.callbacks.loss import resolve_loss
from lr_batch_callback.callbacks.scaling import BatchSizeLRScaling
from lr_batch_callback.engine.batching import BatchSizeFn
from lr_batch_callback.engine.operators import LossFn
from lr_batch_callback.monitoring.budget import Budget, Plan
from lr_batch_callback.monitoring.measurement import (
    MonitorConfig,
    Parts,
    TrainingState,
    measure_spectrum,
)
from lr_batch_callback.monitoring.record import SpectrumRecord
from lr_batch_callback.scaling.optimizers import is_adaptive

__all__ = ["SpectrumMonitor"]



def _scaling_among(callbacks: list[Any]) -> BatchSizeLRScaling | None:
    """The first LR scaling part among the Trainer's callbacks (alone or inside a combined one)."""
    for callback in callbacks:
        part = callback if isinstance(callback, BatchSizeLRScaling) else getattr(
            callback, "scaling", None)
        if isinstance(part, BatchSizeLRScaling):
            return part
    return None


def _unsupported(strategy: Any, config: MonitorConfig) -> str | None:
    """Why monitoring cannot run under ``strategy`` with ``config``, or ``None``."""
    if isinstance(strategy, ModelParallelStrategy):
        # FSDP2: first-order gradients of the shards (engine/sharded.py), no double backward.
        if config.product == "exact" or config.curvature != "hessian":
            return (f"its FSDP2 shards have no exact product (double backward cannot reach them), "
                    f"and MonitorConfig has product={config.product!r}, curvature="
                    f"{config.curvature!r}. Use MonitorConfig(curvature='hessian', "
                    "product='auto') (the default) or product='finite_difference'.")
        return None
    if isinstance(strategy, FSDPStrategy):
        return ("FSDP1 flattens the parameters into FlatParameters that no curvature product "
                "can address. Use ModelParallelStrategy (FSDP2, fully_shard in configure_model), "
                "where monitoring works.")
    if isinstance(strategy, DeepSpeedStrategy):
        return ("DeepSpeed partitions parameters and wraps the optimizer and the backward pass "
                "outside PyTorch's autograd, so no curvature product can be computed.")
    if type(strategy).__name__.startswith("XLA"):
        return "XLA compiles the graph lazily; double backward and in-place moves are not supported."
    return None


class SpectrumMonitor(StableCallback):
    """Measure the top eigenvalues (and now and then λ_min and the density) of the batch Hessian.

    Args:
        every_n_steps: measure every this many optimizer steps, on the current training batch;
            ``None`` turns monitoring off.
        config: what each measurement contains, and the time budget (:class:`MonitorConfig`).
        on_batch_size_change: also measure at the first optimizer step after the effective batch
            size changed.
        loss_fn: ``loss_fn(module, batch) -> scalar``. Default: the module's
            ``curvature_loss(batch)`` if it has one, else ``training_step``'s loss with logging
            silenced (said once).
        batch_size_attr: attribute holding the per-device batch size (module, hparams or
            DataModule), for the effective batch size in the records.
        batch_size_fn: counts the samples of a batch when the dataloader does not say.

    Example::

        trainer = Trainer(callbacks=[SpectrumMonitor(every_n_steps=100)])
    """

    def __init__(
        self,
        every_n_steps: int | None = 250,
        config: MonitorConfig | None = None,
        on_batch_size_change: bool = True,
        loss_fn: LossFn | None = None,
        batch_size_attr: str = "batch_size",
        batch_size_fn: BatchSizeFn | None = None,
    ) -> None:
        super().__init__()
        self.every_n_steps = check_integer(every_n_steps, "every_n_steps", allow_none=True,
                                           hint="None turns monitoring off")
        if config is not None and not isinstance(config, MonitorConfig):
            raise TypeError(f"config must be a MonitorConfig, got {config!r}.")
        self.config = config or MonitorConfig()
        self.on_batch_size_change = check_bool(on_batch_size_change, "on_batch_size_change")
        self.loss_fn = check_callable(loss_fn, "loss_fn", "(module, batch) -> scalar tensor")
        self.reader = BatchSizeReader(batch_size_attr, batch_size_fn)
        cfg = self.config
        self.budget = Budget(cfg.max_overhead, first_guess={
            "lambda_min": cfg.max_iter, "density": cfg.density_probes * cfg.density_steps})
        self.measurements = 0
        self.skipped = 0
        self.disabled: str | None = None
        self.last: SpectrumRecord | None = None
        self._since = {"lambda_min": 0, "density": 0}
        self._effective: int | None = None
        self._scaling: BatchSizeLRScaling | None = None  # where the LR (and batch size) come from
        self._told = False  # the scaling part was given by use_scaling, not found at fit
        self._measure_next = False
        self._increase = IncreaseWatch()
        self._destinations: list[Any] = []
        self._warnings = WarningCache()
        self._stretch_said = False

    # -- state ------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"measurements": self.measurements, "skipped": self.skipped,
                "since": dict(self._since)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measurements = int(state_dict.get("measurements", 0))
        self.skipped = int(state_dict.get("skipped", 0))
        self._since.update(state_dict.get("since", {}))

    @property
    def enabled(self) -> bool:
        """Whether measurements run: a cadence is set and nothing turned them off."""
        return self.every_n_steps is not None and self.disabled is None

    # -- hooks ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.every_n_steps is None:
            return
        reason = _unsupported(trainer.strategy, self.config)
        if reason:
            raise MisconfigurationException(
                f"Spectrum monitoring cannot run under {type(trainer.strategy).__name__}: {reason} "
                "Pass monitor_every_n_steps=None (every_n_steps=None) to keep only the LR scaling."
            )

    def use_scaling(self, scaling: BatchSizeLRScaling) -> None:
        """Read the effective batch size and the LR from this scaling part.

        :class:`~lr_batch_callback.callbacks.BatchSizeLRCallback` calls it for its two parts, so
        the batch size is read once (by the scaling part, whose hooks run first). A monitor that
        was not told finds a :class:`~lr_batch_callback.callbacks.BatchSizeLRScaling` among the
        Trainer's callbacks for the LR, and reads the batch size itself.
        """
        if not isinstance(scaling, BatchSizeLRScaling):
            raise TypeError(f"scaling must be a BatchSizeLRScaling, got {scaling!r}.")
        self._scaling, self._told = scaling, True

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start_steps(trainer)
        if not self._told:
            self._scaling = _scaling_among(trainer.callbacks)  # type: ignore[attr-defined]
        if self._scaling is not None and (not self.config.guard or self.every_n_steps is None):
            self._scaling.drop_cap(trainer)  # a cap restored from a checkpoint, now unwanted
        self._effective = self._read_batch_size(trainer, pl_module)
        self.budget.start(trainer.global_step)
        # Files and artifacts are for real runs with a logger (logger=False: no files), written by
        # rank 0 only; this reads each logger's own folder and calls no collective.
        self._destinations = []
        if (self.config.save_spectra and trainer.loggers and trainer.is_global_zero
                and not getattr(trainer, "fast_dev_run", False)):
            self._destinations = spectra_directories(trainer)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._told:
            self.reader.follow(trainer, pl_module, batch)
        current = self._read_batch_size(trainer, pl_module)
        if current is not None and self._effective is not None and current != self._effective:
            self._measure_next = self.on_batch_size_change
            if self.on_batch_size_change:  # the warning and guard need the measurement right after
                self._increase.changed(self._effective, current, self.last)
        self._effective = current

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self.stepped(trainer):
            return  # no optimizer step (gradient accumulation): nothing changed
        if not self.enabled:
            return
        assert self.every_n_steps is not None  # enabled
        due = self._measure_next or trainer.global_step % self.every_n_steps == 0
        if not due:
            return
        self._measure_next = False
        wanted = (self._part_due("lambda_min", self.config.lambda_min_every),
                  self._part_due("density", self.config.density_every))
        plan = self.budget.plan(*wanted)
        if self._increase.pending and self._guard_can_bind(trainer) and not plan.run:
            # The guard needs the curvature at the new size: λ_max alone, whatever the budget.
            plan = Plan(run=True)
        if trainer.world_size > 1:
            # Every rank must take the same decision: a measurement runs collectives.
            plan = trainer.strategy.broadcast(plan, src=0)
        if not plan.run:
            self._skip(trainer, over_budget=True)
            return
        self._measure(trainer, pl_module, batch, plan.parts)

    def _guard_can_bind(self, trainer: Trainer) -> bool:
        """Whether the guard can act on the coming measurement (it needs a stability ratio)."""
        if not (self.config.guard and self._scaling is not None and trainer.optimizers):
            return False
        adaptive = is_adaptive(trainer.optimizers[0])
        return adaptive is False or (bool(adaptive) and self.config.preconditioned_sharpness)

    # -- measuring --------------------------------------------------------------------------------
    def _part_due(self, part: str, every: int) -> bool:
        return bool(every) and self._since[part] + 1 >= every

    @staticmethod
    def _blocker(pl_module: LightningModule) -> str | None:
        if any(isinstance(m, nn.SyncBatchNorm) for m in pl_module.modules()):
            return "SyncBatchNorm has no double backward; convert it or turn monitoring off"
        low = {p.dtype for p in pl_module.parameters() if p.requires_grad} & {torch.float16,
                                                                            torch.bfloat16}
        if low:
            return (f"parameters are {sorted(str(d) for d in low)}: curvature estimates need "
                    "float32/float64 parameters (use precision='16-mixed' or 'bf16-mixed')")
        return None

    def _turn_off(self, reason: str) -> None:
        self.disabled = reason
        rank_zero_warn(f"Hessian monitoring turned off: {reason}")

    def _measure(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                 parts: Parts) -> None:
        blocker = self._blocker(pl_module)
        if blocker:
            self._turn_off(blocker + ".")
            return
        try:
            loss_fn = resolve_loss(pl_module, self.loss_fn, self._warnings)
        except MisconfigurationException as exc:
            self._turn_off(str(exc))
            return
        try:
            with warnings.catch_warnings():
                if not trainer.is_global_zero:
                    warnings.simplefilter("ignore")
                record, cost = measure_spectrum(
                    pl_module, loss_fn, batch, self.config, state=self._state(trainer),
                    parts=parts, seed=self.measurements, distributed=trainer.world_size > 1,
                    batch_size_fn=self.reader.fn)
        except Exception as exc:  # a failed estimate is a warning, never a crashed run
            if isinstance(exc, (ValueError, TypeError)):
                # A configuration problem (k > P, no trainable parameters, a loss that is not a
                # scalar...): every later measurement would fail the same way, so say it once.
                self._turn_off(f"{type(exc).__name__}: {exc}")
            else:
                rank_zero_warn(f"Hessian spectrum measurement skipped: {type(exc).__name__}: {exc}")
            self._skip(trainer, over_budget=False)
            return
        self._account(record, cost, parts)
        self.last = record
        self._increase.measured(trainer, record, self.config.guard, self._scaling)
        self._show(pl_module, record)
        ratio = record.context.stability
        if ratio is not None and ratio > 1.0:
            self._warnings.warn(
                f"Step {record.step}: LR × sharpness is {ratio:.2f} times the stability threshold "
                "(logged as '<curvature>/stability'): on the local quadratic this learning rate "
                "diverges. Expect loss spikes; lower the LR or the batch-size factor if they "
                "appear. (Said once per run.)"
            )
        if trainer.is_global_zero:
            log_metrics(trainer.loggers, {**record.metrics(self.config.k),
                                          f"{self.config.curvature}/skipped": float(self.skipped)},
                        trainer.global_step)
            if self._destinations:
                dim = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
                publish_record(trainer, record, self._destinations, dim)
            self._say_cadence(trainer)

    def _account(self, record: SpectrumRecord, cost: Any, parts: Parts) -> None:
        self.measurements += 1
        density_products = record.density.num_products if record.density else 0
        eig_products = record.estimate.num_products - density_products
        products = {"lambda_max": 0 if parts.lambda_min else eig_products,
                    "lambda_min": max(eig_products - self.budget.last_products["lambda_max"], 0)
                    if parts.lambda_min else 0,
                    "density": density_products}
        self.budget.record(record.estimate.seconds, cost, products)
        for part, included in (("lambda_min", parts.lambda_min), ("density", parts.density)):
            self._since[part] = 0 if included else self._since[part] + 1

    def _state(self, trainer: Trainer) -> TrainingState:
        state = TrainingState(step=trainer.global_step, epoch=trainer.current_epoch,
                              effective_batch_size=self._effective)
        if not trainer.optimizers:
            return state
        optimizer = trainer.optimizers[0]
        lrs = self._scaling.effective_lrs(0) if self._scaling is not None else None
        factors = self._scaling.factors if self._scaling is not None else []
        lr = lrs[0] if lrs else float(optimizer.param_groups[0]["lr"])
        return dataclasses.replace(state, optimizer=optimizer, lr=lr,
                                   lr_factor=factors[0] if factors else 1.0)

    def _read_batch_size(self, trainer: Trainer, pl_module: LightningModule) -> int | None:
        if self._told and self._scaling is not None:
            return self._scaling.effective_batch_size
        return self.reader.effective(trainer, pl_module)

    def _skip(self, trainer: Trainer, over_budget: bool) -> None:
        self.skipped += 1
        if over_budget:
            self._warnings.warn(
                "Postponing a Hessian spectrum measurement: it would exceed max_overhead="
                f"{self.config.max_overhead:.0%} of training time (next one about "
                f"{self.budget.predict(False, False):.2f}s). The cadence stretches; raise "
                "max_overhead, or lower max_iter, lambda_min_every or density_every. Postponed "
                f"measurements are counted in '{self.config.curvature}/skipped'."
            )
        if trainer.is_global_zero:
            log_metrics(trainer.loggers, {f"{self.config.curvature}/skipped": float(self.skipped)},
                        trainer.global_step)

    def _say_cadence(self, trainer: Trainer) -> None:
        if self._stretch_said or self.every_n_steps is None:
            return
        every = self.budget.sustainable_every(trainer.global_step)
        if every is not None and every > self.every_n_steps:
            self._stretch_said = True
            rank_zero_info(
                f"SpectrumMonitor: at the measured cost ({self.budget.predict(False, False):.2f}s "
                f"per measurement) max_overhead={self.config.max_overhead:.0%} allows about one "
                f"measurement every {every} steps (requested every {self.every_n_steps})."
            )

    @staticmethod
    def _show(pl_module: LightningModule, record: SpectrumRecord) -> None:
        try:  # the progress bar; logger=False: the loggers got the record already
            pl_module.log("lambda_max", record.lambda_max, prog_bar=True, logger=False, on_step=True,
                          on_epoch=False)
        except Exception:  # a hook without logging support (e.g. outside a fit loop)
            pass

"""``BatchSizeLRCallback``: the learning rate follows the effective batch size; spectra are logged.

The only module that knows Lightning's hooks. It composes
:mod:`~lr_batch_callback.scaling` (rules and the step-time :class:`LRScaler`),
:mod:`~lr_batch_callback.monitor` (periodic Hessian/GGN spectra), :mod:`~lr_batch_callback.law`
(the measured λ(B) law behind ``rule="curvature"``) and :mod:`~lr_batch_callback.reporting`.

Hook timing (Lightning 2.x): ``setup`` records the batch size the LR was tuned for before
BatchSizeFinder changes it in ``on_fit_start``; checkpointed optimizer/scheduler state is restored
before ``on_train_start``, where the factors are first applied; ``on_train_batch_start`` notices
later changes (a batch-size schedule reloading the dataloader, GradientAccumulationScheduler,
...) before the first optimizer step that they affect; ``on_train_batch_end`` measures spectra
after an optimizer step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lr_batch_callback.batching import batch_size_of, concat_batches
from lr_batch_callback.monitor import MonitorConfig, SpectrumMonitor, loss_from_training_step
from lr_batch_callback.operators import CURVATURES
from lr_batch_callback.reporting import (
    SPECTRA_DIRNAME,
    log_to_loggers,
    tensorboard_density,
    write_spectrum_record,
)
from lr_batch_callback.scaling import CurvatureRule, LRScaler, ScalingRule, resolve_rule

__all__ = ["BatchSizeLRCallback", "effective_batch_size"]

RuleSpec = str | Callable[[int, int], float]
_UNSUPPORTED_STRATEGIES = ("DeepSpeedStrategy",)
_NO_MONITOR_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "XLAStrategy",
                          "XLAFSDPStrategy")


def _positive_int_or_none(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")


def _loader_batch_size(loader: Any) -> int | None:
    """The per-device batch size a dataloader (or a structure of them) was built with."""
    if loader is None:
        return None
    if isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if loader is None:
        return None
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def _rule_name(rule: Any) -> str:
    if isinstance(rule, list):
        return "[" + ",".join(_rule_name(r) for r in rule) + "]"
    if isinstance(rule, str):
        return rule
    return str(getattr(rule, "__qualname__", type(rule).__qualname__))


def effective_batch_size(per_device: int, accumulate_grad_batches: int, world_size: int) -> int:
    """Samples per optimizer step: per-device batch × gradient accumulation × devices."""
    return int(per_device) * int(accumulate_grad_batches) * int(world_size)


class BatchSizeLRCallback(Callback):
    r"""Rescale the learning rate when the effective batch size changes; log batch-Hessian spectra.

    The factor applied to each optimizer is ``rule(reference_batch_size, effective_batch_size)``,
    always relative to the reference (never compounded), applied at step time so that every LR
    scheduler keeps working in reference units. Effective batch size = per-device batch ×
    ``accumulate_grad_batches`` × world size.

    Args:
        rule: ``"auto"`` (√ for Adam-family optimizers, linear for SGD-family), ``"linear"``,
            ``"sqrt"``, ``"none"``, ``"curvature"`` (the measured λ(B) law: SGD scales by
            λ(B_ref)/λ(B), Adam by its square root; saturates past the critical batch size), a
            callable ``(old_batch_size, new_batch_size) -> float``, or a list with one of these
            per optimizer.
        reference_batch_size: the effective batch size the configured learning rates were tuned
            for. ``None``: the one configured when ``fit`` starts (before BatchSizeFinder runs).
            Kept in checkpoints, so a resume rescales relative to the original reference.
        batch_size_attr: attribute of the LightningModule/DataModule (or their ``hparams``) that
            holds the per-device batch size; used when the dataloader does not say it.
        monitor_every_n_steps: measure the batch-curvature spectrum every this many optimizer
            steps on the current training batch; ``None`` turns monitoring off.
        monitor_on_batch_size_change: also measure at the first step after a batch-size change.
        curvature: ``"hessian"`` or ``"ggn"``.
        k: number of top eigenvalues to log.
        smallest: also estimate the most negative eigenvalue (λ_min).
        tol: relative Ritz-residual tolerance of each Lanczos run.
        max_iter: cap on products per Lanczos run (warm-started runs usually need far fewer).
        density_every: estimate the spectral density every this many measurements (0: never).
        density_probes: probe vectors of each density estimate.
        density_steps: Lanczos steps per probe of each density estimate.
        max_overhead: skip measurements that would take more than this fraction of training
            wall time (skips are logged); ``None``: no budget.
        loss_fn: ``loss_fn(module, batch) -> scalar`` for the measurements. Default: the
            module's ``curvature_loss(batch)`` method if it has one, else its ``training_step``
            output with logging silenced (with a one-time warning).
        law_samples: samples (from recent training batches) used to fit the λ(B) law for
            ``rule="curvature"``.
        law_draws: random sub-batches per batch size in that fit.
        law_min_r_squared: a fit whose R² on the per-batch-size mean eigenvalues is below this is
            logged but not used: the factor falls back to the linear (SGD) or √ (Adam) rule until
            a better fit.
        save_spectra: write each measurement as JSON under ``<log_dir>/spectra/`` (when the
            Trainer has a logger).
        verbose: print a line when the factor changes.

    Example::

        trainer = Trainer(callbacks=[BatchSizeLRCallback(rule="auto")])
    """

    def __init__(
        self,
        rule: RuleSpec | list[RuleSpec] = "auto",
        reference_batch_size: int | None = None,
        batch_size_attr: str = "batch_size",
        monitor_every_n_steps: int | None = 250,
        monitor_on_batch_size_change: bool = True,
        curvature: str = "hessian",
        k: int = 1,
        smallest: bool = True,
        tol: float = 1e-3,
        max_iter: int = 30,
        density_every: int = 4,
        density_probes: int = 4,
        density_steps: int = 20,
        max_overhead: float | None = 0.05,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        law_samples: int = 512,
        law_draws: int = 3,
        law_min_r_squared: float = 0.5,
        save_spectra: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        rules = rule if isinstance(rule, list) else [rule]
        for r in rules:
            if r != "auto":
                resolve_rule(r, torch.optim.SGD)  # unknown names fail here, not mid-fit
        _positive_int_or_none(reference_batch_size, "reference_batch_size")
        _positive_int_or_none(monitor_every_n_steps, "monitor_every_n_steps")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            raise ValueError(f"tol must be a positive number, got {tol!r}; e.g. 1e-3.")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 2 * k:
            raise ValueError(f"max_iter must be an integer >= 2k = {2 * k}, got {max_iter!r}.")
        for name, value in (("density_every", density_every), ("density_probes", density_probes),
                            ("density_steps", density_steps), ("law_draws", law_draws)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        if max_overhead is not None and not (
                isinstance(max_overhead, (int, float)) and 0 < max_overhead <= 1):
            raise ValueError(
                f"max_overhead must be a fraction in (0, 1] or None (no budget), got "
                f"{max_overhead!r}; e.g. 0.05 for 5%."
            )
        if isinstance(law_samples, bool) or not isinstance(law_samples, int) or law_samples < 16:
            raise ValueError(f"law_samples must be an integer >= 16, got {law_samples!r}.")
        if not (isinstance(law_min_r_squared, (int, float)) and 0 <= law_min_r_squared <= 1):
            raise ValueError(f"law_min_r_squared must be in [0, 1], got {law_min_r_squared!r}.")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (module, batch) -> tensor, got {loss_fn!r}.")

        self.rule = rule
        self.reference_batch_size = reference_batch_size
        self.batch_size_attr = batch_size_attr
        self.monitor_on_batch_size_change = monitor_on_batch_size_change
        self.loss_fn = loss_fn
        self.law_samples = law_samples
        self.law_draws = law_draws
        self.law_min_r_squared = law_min_r_squared
        self.save_spectra = save_spectra
        self.verbose = verbose
        self.monitor = SpectrumMonitor(MonitorConfig(
            every_n_steps=monitor_every_n_steps, curvature=curvature, k=k, smallest=smallest,
            tol=tol, max_iter=max_iter, density_every=density_every,
            density_probes=density_probes, density_steps=density_steps, max_overhead=max_overhead,
        ))

        self.effective_batch_size: int | None = None
        self.factors: list[float] = []
        self._effective_lrs: list[list[float]] = []
        self.law: Any = None
        self._rules: list[ScalingRule] = []
        self._scalers: list[LRScaler] = []
        self._reference_from_setup: int | None = None
        self._measured_batch_size: int | None = None
        self._last_step = -1
        self._first_step = 0
        self._measure_next = False
        self._fallback_warned = False
        self._pool: list[Any] = []
        self._pool_size = 0
        self._law_due = False

    # -- identity & state --------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        # Stable across runs (a lambda's repr holds its address), so checkpoints restore.
        return self._generate_state_key(rule=_rule_name(self.rule))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "reference_batch_size": self.reference_batch_size or self._reference_from_setup,
            "effective_batch_size": self.effective_batch_size,
            "law": self.law.to_dict() if self.law is not None else None,
            "monitor": self.monitor.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("reference_batch_size"):
            self.reference_batch_size = int(state_dict["reference_batch_size"])
        if state_dict.get("law"):
            from lr_batch_callback.law import BatchSizeLaw

            self.law = BatchSizeLaw.from_dict(state_dict["law"])
        self.monitor.load_state_dict(state_dict.get("monitor", {}))

    # -- batch size ----------------------------------------------------------------------------------
    def _attr_batch_size(self, pl_module: LightningModule) -> int | None:
        try:
            if lightning_hasattr(pl_module, self.batch_size_attr):
                value = lightning_getattr(pl_module, self.batch_size_attr)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        except Exception:  # a datamodule-less module raises from lightning_hasattr in some setups
            return None
        return None

    def _per_device_batch_size(self, trainer: Trainer, pl_module: LightningModule) -> int | None:
        try:
            loader = trainer.train_dataloader
        except Exception:
            loader = None
        return (_loader_batch_size(loader) or self._attr_batch_size(pl_module)
                or self._measured_batch_size)

    def _current_effective(self, trainer: Trainer, pl_module: LightningModule) -> int | None:
        per_device = self._per_device_batch_size(trainer, pl_module)
        if per_device is None:
            return None
        return effective_batch_size(per_device, trainer.accumulate_grad_batches, trainer.world_size)

    # -- hooks ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(trainer.strategy).__name__
        if name in _UNSUPPORTED_STRATEGIES:
            raise MisconfigurationException(
                f"BatchSizeLRCallback does not support {name}: DeepSpeed wraps the optimizer, so "
                "the step-time LR factor cannot be applied. Use strategy='ddp' (or 'fsdp' with "
                "monitor_every_n_steps=None)."
            )
        if name in _NO_MONITOR_STRATEGIES and self.monitor.config.every_n_steps:
            raise MisconfigurationException(
                f"Hessian monitoring is not supported under {name} (sharded parameters have no "
                "double backward here). Pass monitor_every_n_steps=None to BatchSizeLRCallback; "
                "LR scaling still works."
            )
        per_device = self._attr_batch_size(pl_module)
        if per_device is not None:
            # The batch size the user configured, before BatchSizeFinder (on_fit_start) moves it.
            self._reference_from_setup = effective_batch_size(
                per_device, trainer.accumulate_grad_batches, trainer.world_size)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._detach()
        optimizers = trainer.optimizers
        rules = self.rule if isinstance(self.rule, list) else [self.rule] * len(optimizers)
        if len(rules) != len(optimizers):
            raise MisconfigurationException(
                f"BatchSizeLRCallback got {len(rules)} rules for {len(optimizers)} optimizers; "
                "pass one rule, or a list with one rule per optimizer."
            )
        self._rules = [resolve_rule(r, opt) for r, opt in zip(rules, optimizers, strict=True)]
        self._set_law_on_rules()
        self._scalers = [LRScaler(opt) for opt in optimizers]
        self.monitor.start()
        self._last_step = self._first_step = trainer.global_step
        if self.reference_batch_size is None:
            self.reference_batch_size = self._reference_from_setup
        self._update(trainer, pl_module, force_log=True)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._measured_batch_size is None:
            try:
                self._measured_batch_size = batch_size_of(batch)
            except ValueError:
                pass
        self._update(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._last_step:
            return  # no optimizer step (gradient accumulation): nothing changed
        self._last_step = trainer.global_step
        if self._uses_law:
            self._collect_for_law(batch)
        if self._law_due and self._uses_law and self._pool_size >= min(self.law_samples, 64):
            self._refit_law(trainer, pl_module)
        if self.monitor.config.every_n_steps is None and not self._measure_next:
            return
        if not self.monitor.is_due(trainer.global_step, forced=self._measure_next):
            return
        self._measure_next = False
        within = self.monitor.within_budget(trainer.global_step - self._first_step)
        if trainer.world_size > 1:
            # Every rank must take the same decision: measurements run collectives.
            within = bool(trainer.strategy.broadcast(within, src=0))
        if not within:
            self.monitor.skip_over_budget()
            if trainer.is_global_zero:
                log_to_loggers(trainer.loggers, self.monitor.skipped_metrics(), trainer.global_step)
            return
        self._measure(trainer, pl_module, batch)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._detach()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        for scaler in self._scalers:
            scaler.restore()  # the checkpoint written on exit holds reference-unit LRs

    # -- LR factor -----------------------------------------------------------------------------------
    def _detach(self) -> None:
        for scaler in self._scalers:
            scaler.remove()
        self._scalers = []

    def _update(self, trainer: Trainer, pl_module: LightningModule, force_log: bool = False) -> None:
        current = self._current_effective(trainer, pl_module)
        if current is None:
            if force_log:
                rank_zero_warn(
                    "BatchSizeLRCallback cannot tell the batch size: the train dataloader has no "
                    f"`batch_size` and the module has no `{self.batch_size_attr}` attribute. It will "
                    "read the first batch's size; set `batch_size_attr` to be sure."
                )
            return
        if self.reference_batch_size is None:
            self.reference_batch_size = current
        if current == self.effective_batch_size and not force_log:
            return
        changed = self.effective_batch_size is not None and current != self.effective_batch_size
        self.effective_batch_size = current
        if changed:
            self._law_due = True
            if self.monitor_on_batch_size_change and self.monitor.config.every_n_steps is not None:
                self._measure_next = True
        elif force_log and self._uses_law:
            self._law_due = self.law is None
        self._apply(trainer, announce=changed or force_log)

    def _apply(self, trainer: Trainer, announce: bool) -> None:
        assert self.reference_batch_size is not None and self.effective_batch_size is not None
        self.factors = []
        for rule, scaler in zip(self._rules, self._scalers, strict=True):
            factor = float(rule(self.reference_batch_size, self.effective_batch_size))
            scaler.set_factor(factor)
            self.factors.append(factor)
        if announce and self.verbose:
            rank_zero_info(
                f"BatchSizeLRCallback: effective batch size {self.effective_batch_size} "
                f"(reference {self.reference_batch_size}) -> LR factor "
                + ", ".join(f"{f:.4g} ({r.name})" for f, r in zip(self.factors, self._rules,
                                                                    strict=True))
            )
        if trainer.is_global_zero:
            log_to_loggers(trainer.loggers, self.scaling_metrics(), trainer.global_step)

    def scaling_metrics(self) -> dict[str, float]:
        """The fixed-key LR metrics: ``lr_batch/*`` (see the README)."""
        metrics = {
            "lr_batch/effective_batch_size": float(self.effective_batch_size or math.nan),
            "lr_batch/reference_batch_size": float(self.reference_batch_size or math.nan),
        }
        if self._scalers:  # attached: the LRs the next step will use
            self._effective_lrs = [[float(lr) for lr in sc.effective_lrs()] for sc in self._scalers]
        for i, (factor, lrs) in enumerate(zip(self.factors, self._effective_lrs, strict=True)):
            opt = "" if i == 0 else f"_opt{i}"
            metrics[f"lr_batch/factor{opt}"] = factor
            for j, lr in enumerate(lrs):
                metrics[f"lr_batch/lr{opt}_pg{j}"] = lr
        return metrics

    @property
    def rule_names(self) -> list[str]:
        """The rule in force for each optimizer (what ``"auto"`` resolved to), once fitting."""
        return [rule.name for rule in self._rules]

    # -- spectra -------------------------------------------------------------------------------------
    def _loss_fn(self, pl_module: LightningModule) -> Callable[[nn.Module, Any], torch.Tensor]:
        if self.loss_fn is not None:
            return self.loss_fn
        method = getattr(pl_module, "curvature_loss", None)
        if callable(method):
            return lambda module, batch: module.curvature_loss(batch)  # type: ignore[operator]
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "Manual optimization: training_step steps the optimizers itself, so it cannot serve "
                "as the loss for Hessian measurements. Pass loss_fn= to BatchSizeLRCallback or "
                "define `curvature_loss(self, batch)` on your LightningModule."
            )
        if not self._fallback_warned:
            self._fallback_warned = True
            rank_zero_warn(
                "BatchSizeLRCallback measures the Hessian of `training_step`'s loss (logging "
                "silenced). Define `curvature_loss(self, batch) -> Tensor` on the LightningModule "
                "or pass loss_fn= to make it explicit."
            )
        return loss_from_training_step

    def _monitoring_blocker(self, pl_module: LightningModule) -> str | None:
        if any(isinstance(m, nn.SyncBatchNorm) for m in pl_module.modules()):
            return "SyncBatchNorm has no double backward; convert it or turn monitoring off"
        dtypes = {p.dtype for p in pl_module.parameters() if p.requires_grad}
        low = dtypes & {torch.float16, torch.bfloat16}
        if low:
            return (f"parameters are {sorted(str(d) for d in low)}: curvature estimates need "
                    "float32/float64 parameters (use precision='16-mixed' or 'bf16-mixed')")
        return None

    def _measure(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        if self.monitor.disabled:
            return
        blocker = self._monitoring_blocker(pl_module)
        if blocker:
            self.monitor.disabled = blocker
            rank_zero_warn(f"Hessian monitoring turned off: {blocker}.")
            return
        try:
            loss_fn = self._loss_fn(pl_module)
        except MisconfigurationException as exc:
            self.monitor.disabled = str(exc)
            rank_zero_warn(f"Hessian monitoring turned off: {exc}")
            return
        distributed = trainer.world_size > 1
        with warnings.catch_warnings():
            if not trainer.is_global_zero:
                warnings.simplefilter("ignore")
            result = self.monitor.measure(pl_module, loss_fn, batch, distributed=distributed,
                                          batch_size=self.effective_batch_size)
        if result is None:
            if trainer.is_global_zero:
                log_to_loggers(trainer.loggers, self.monitor.skipped_metrics(), trainer.global_step)
            return
        metrics, record = result
        if not trainer.is_global_zero:
            return
        record.update({
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch_size": self._per_device_batch_size(trainer, pl_module),
            "effective_batch_size": self.effective_batch_size,
            "lr_factor": self.factors[0] if self.factors else 1.0,
        })
        log_to_loggers(trainer.loggers, metrics, trainer.global_step)
        if self.save_spectra and trainer.loggers:  # logger=False: the user wants no files
            write_spectrum_record(self._spectra_dir(trainer), record)
        if record.get("density"):
            self._log_density_to_tensorboard(trainer, pl_module, record)

    @staticmethod
    def _spectra_dir(trainer: Trainer) -> str:
        import os

        return os.path.join(trainer.log_dir or trainer.default_root_dir, SPECTRA_DIRNAME)

    def _log_density_to_tensorboard(self, trainer: Trainer, pl_module: LightningModule,
                                    record: dict[str, Any]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        from lr_batch_callback.reporting import density_from_record, plot_spectra

        curve = density_from_record(record)
        if curve is None:
            return
        dim = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        tag = f"{record['curvature']}/density"
        for logger in loggers:
            try:
                tensorboard_density(logger.experiment, tag, curve[0], curve[1], dim,
                                    trainer.global_step)
                fig = plot_spectra([record])
                logger.experiment.add_figure(f"{tag}_figure", fig, global_step=trainer.global_step)
            except Exception as exc:  # a plotting problem must not cost the run
                rank_zero_warn(f"Could not write the density to TensorBoard: {exc}")

    @property
    def _uses_law(self) -> bool:
        return any(isinstance(r, CurvatureRule) for r in self._rules)

    def _set_law_on_rules(self) -> bool:
        """Give the fitted law to the curvature rules if it is good enough; say whether it was."""
        # Gate on the fit of the per-B means: single draws scatter too much at small B for the
        # per-draw R² to say whether λ(B) is captured (it was 0.34 on digits where the means
        # gave 0.95).
        usable = self.law is not None and self.law.r_squared_of_means >= self.law_min_r_squared
        for rule in self._rules:
            if isinstance(rule, CurvatureRule):
                rule.law = self.law if usable else None
        return usable

    # -- curvature law --------------------------------------------------------------------------------
    def _collect_for_law(self, batch: Any) -> None:
        """Keep the most recent training samples (detached, on device) for the λ(B) fit."""
        try:
            size = batch_size_of(batch)
        except ValueError:
            return
        from torch.utils._pytree import tree_map

        detached = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, batch)
        self._pool.append(detached)
        self._pool_size += size
        while self._pool and self._pool_size - batch_size_of(self._pool[0]) >= self.law_samples:
            self._pool_size -= batch_size_of(self._pool.pop(0))

    def _refit_law(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lr_batch_callback.law import estimate_batch_size_law

        self._law_due = False
        law = None
        # Under DDP each rank holds other samples and would fit another law, step with another
        # learning rate and drift apart from the other replicas: rank 0 fits, every rank uses it.
        if trainer.is_global_zero or trainer.world_size == 1:
            try:
                loss_fn = self._loss_fn(pl_module)
                sample = concat_batches(self._pool)
                dataset_size = None
                try:
                    dataset_size = len(trainer.train_dataloader.dataset)  # type: ignore[union-attr]
                except Exception:
                    pass
                law = estimate_batch_size_law(
                    pl_module, loss_fn, sample, draws=self.law_draws, dataset_size=dataset_size,
                    curvature=self.monitor.config.curvature, seed=trainer.global_step,
                    tol=self.monitor.config.tol, max_iter=max(self.monitor.config.max_iter, 50),
                )
            except Exception as exc:
                rank_zero_warn(f"rule='curvature': fitting the λ(B) law failed ({exc}); keeping "
                               "the previous factor.")
        if trainer.world_size > 1:
            from lr_batch_callback.law import BatchSizeLaw

            data = trainer.strategy.broadcast(law.to_dict() if law is not None else None, src=0)
            law = BatchSizeLaw.from_dict(data) if data is not None else None
        if law is None:
            return
        self.law = law
        if not self._set_law_on_rules():
            rank_zero_warn(
                f"rule='curvature': the λ(B) fit is too noisy to use (R² of the per-batch-size "
                f"means {law.r_squared_of_means:.2f} < "
                f"law_min_r_squared={self.law_min_r_squared}); using the fixed linear/√ rule "
                "until a better fit. Raise law_samples or law_draws for a steadier fit."
            )
        if trainer.is_global_zero:
            log_to_loggers(trainer.loggers, {
                "law/lambda_emp": law.lambda_emp,
                "law/noise_coefficient": law.noise_coefficient,
                "law/critical_batch_size": law.critical_batch_size,
                "law/r_squared": law.r_squared,
                "law/r_squared_of_means": law.r_squared_of_means,
            }, trainer.global_step)
        self._apply(trainer, announce=True)

"""``BatchSizeLRScaling``: the learning rate follows the effective batch size of a Lightning run.

The hook glue only. The factor is ``rule(reference, effective)`` (:mod:`~lr_batch_callback.scaling`),
always relative to the reference (never compounded), applied at step time by
:class:`~lr_batch_callback.scaling.LRScaler` so that every LR scheduler keeps working in
reference units. ``rule="curvature"`` fits the batch-size law on recent samples at each change
(:mod:`~lr_batch_callback.law.online`).

Hook timing (Lightning 2.x): ``setup`` records the configured batch size before BatchSizeFinder
changes it in ``on_fit_start``; checkpointed optimizer/scheduler state is restored before
``on_train_start``, where the factors are first applied; ``on_train_batch_start`` notices later
changes (a batch-size schedule, GradientAccumulationScheduler, ...) before the first optimizer
step they affect.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.rank_zero import WarningCache
from typing_extensions import override

from lr_batch_callback._checks import check_batch_size, check_bool, check_callable
from lr_batch_callback.callbacks.base import StableCallback
from lr_batch_callback.callbacks.batch_size import BatchSizeReader
from lr_batch_callback.callbacks.law import OnlineLaw
from lr_batch_callback.callbacks.loggers import log_metrics
from lr_batch_callback.engine.batching import BatchSizeFn
from lr_batch_callback.engine.operators import LossFn
from lr_batch_callback.law.model import BatchSizeLaw
from lr_batch_callback.law.online import LawConfig
from lr_batch_callback.scaling import LRScaler, ScalingRule, resolve_rule

__all__ = ["BatchSizeLRScaling", "RuleArg", "RuleSpec"]

RuleFn = Callable[[int, int], float]
RuleSpec = str | RuleFn
# ``list[str]`` before the callable: LightningCLI (jsonargparse) serialises a union by its first
# member that fits, and a list of names put after ``Callable`` is written "Unable to serialize".
RuleArg = str | list[str] | RuleFn | list[RuleSpec]


def _rule_name(rule: Any) -> str:
    if isinstance(rule, list):
        return "[" + ",".join(_rule_name(r) for r in rule) + "]"
    if isinstance(rule, str):
        return rule
    return str(getattr(rule, "__qualname__", type(rule).__qualname__))


class BatchSizeLRScaling(StableCallback):
    """Rescale the learning rate when the effective batch size changes.

    Args:
        rule: ``"auto"`` (√ for Adam-family optimizers, linear for SGD-family), ``"linear"``,
            ``"sqrt"``, ``"none"``, ``"curvature"`` (experimental: the measured λ(B) law), a
            callable ``(old_batch_size, new_batch_size) -> float``, or a list with one of these
            per optimizer.
        reference_batch_size: the effective batch size the configured learning rates were tuned
            for. ``None``: the one configured when ``fit`` starts (before BatchSizeFinder runs);
            when the train dataloader disagrees with ``batch_size_attr`` at the start, the
            dataloader's (said once). Kept in checkpoints.
        batch_size_attr: attribute of the LightningModule/DataModule (or their ``hparams``) that
            holds the per-device batch size.
        batch_size_fn: counts the samples of a batch, for batches whose size the dataloader
            does not state (custom batch objects).
        loss_fn: ``loss_fn(module, batch) -> scalar`` for ``rule="curvature"``'s measurements.
        law: how ``rule="curvature"`` measures the law (:class:`~lr_batch_callback.LawConfig`).
        verbose: print a line when the factor changes.

    Example::

        trainer = Trainer(callbacks=[BatchSizeLRScaling(rule="auto")])
    """

    def __init__(
        self,
        rule: RuleArg = "auto",
        reference_batch_size: int | None = None,
        batch_size_attr: str = "batch_size",
        batch_size_fn: BatchSizeFn | None = None,
        loss_fn: LossFn | None = None,
        law: LawConfig | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(rule, list) and not rule:
            raise ValueError("rule=[] names no rule: pass one rule for every optimizer (e.g. "
                             "'auto'), or a list with one rule per optimizer.")
        for r in rule if isinstance(rule, list) else [rule]:
            if r != "auto":
                resolve_rule(r, torch.optim.SGD)  # unknown names fail here, not mid-fit
        if law is not None and not isinstance(law, LawConfig):
            raise TypeError(f"law must be a LawConfig, got {law!r}.")
        self.rule = rule
        self.reference_batch_size = check_batch_size(reference_batch_size, "reference_batch_size",
                                                     allow_none=True)
        self.reader = BatchSizeReader(batch_size_attr, batch_size_fn)
        self.loss_fn = check_callable(loss_fn, "loss_fn", "(module, batch) -> scalar tensor")
        self.law_config = law or LawConfig()
        self.verbose = check_bool(verbose, "verbose")

        self.effective_batch_size: int | None = None
        self._applied = False  # whether a factor was set on the scalers this fit
        self.guard_cap: float | None = None  # the first optimizer's factor cap, until a change
        self._guard_cap_size: int | None = None  # the size a restored cap was measured at
        self._guard_said = False
        self._effective_lrs: list[list[float]] = []
        self._rules: list[ScalingRule] = []
        self._scalers: list[LRScaler] = []
        self._configured: int | None = None  # the batch-size attribute at setup
        self._configured_accumulation: int | None = None  # the Trainer's, before any schedule
        self._shown_factor: float | None = None  # the factor the progress bar holds
        self._restored_rule: str | None = None
        self._warnings = WarningCache()
        self._law = OnlineLaw(self.law_config, self.loss_fn, self._warnings)

    # -- identity & state ---------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "reference_batch_size": self.reference_batch_size,
            "effective_batch_size": self.effective_batch_size,
            "rule": self.rule_names or [_rule_name(self.rule)],
            "law": self.law.to_dict() if self.law is not None else None,
            "guard_cap": self.guard_cap,
            # The size the cap was measured at: a resume at another size drops it.
            "guard_cap_batch_size": self.effective_batch_size if self.guard_cap is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("reference_batch_size"):
            self.reference_batch_size = int(state_dict["reference_batch_size"])
        if state_dict.get("law"):
            self.law = BatchSizeLaw.from_dict(state_dict["law"])
        cap, size = state_dict.get("guard_cap"), state_dict.get("guard_cap_batch_size")
        self.guard_cap = float(cap) if cap is not None else None
        self._guard_cap_size = int(size) if size is not None else None
        rule = state_dict.get("rule")
        self._restored_rule = ",".join(rule) if isinstance(rule, list) else rule

    @property
    def factors(self) -> list[float]:
        """The LR factor of each optimizer, once one is set (``[]`` before).

        Read from the :class:`~lr_batch_callback.scaling.LRScaler` s, which own it: the factor
        the next step uses is the only copy. After ``fit`` it is the last one applied.
        """
        if not self._applied:
            return []
        return [scaler.factors[0] if scaler.factors else 1.0 for scaler in self._scalers]

    def effective_lrs(self, optimizer_index: int = 0) -> list[float] | None:
        """The LR each param group of one optimizer will step with (``None`` before ``fit``)."""
        if not self._scalers or optimizer_index >= len(self._scalers):
            return None
        return self._scalers[optimizer_index].effective_lrs()

    @property
    def rule_names(self) -> list[str]:
        """The rule in force for each optimizer (what ``"auto"`` resolved to), once fitting."""
        return [rule.name for rule in self._rules]

    # -- hooks --------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise MisconfigurationException(
                "BatchSizeLRScaling does not support DeepSpeed: DeepSpeed wraps the optimizer, so "
                "the step-time LR factor cannot be applied. Scale the LR in the DeepSpeed config."
            )
        if self._configured is None:  # BatchSizeFinder's internal restore re-enters setup
            self._configured = self.reader.attribute(pl_module)
        if self._configured_accumulation is None:
            self._configured_accumulation = trainer.accumulate_grad_batches

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = trainer.optimizers
        rules = self.rule if isinstance(self.rule, list) else [self.rule] * len(optimizers)
        if len(rules) != len(optimizers):
            raise MisconfigurationException(
                f"BatchSizeLRScaling got {len(rules)} rules for {len(optimizers)} optimizers; pass "
                "one rule, or a list with one rule per optimizer."
            )
        self._rules = [resolve_rule(r, opt) for r, opt in zip(rules, optimizers, strict=True)]
        self._scalers = [LRScaler(opt) for opt in optimizers]
        self._applied = False
        self._shown_factor = None  # each fit starts with an empty progress bar
        self.start_steps(trainer)
        if self.reference_batch_size is None:
            self.reference_batch_size = self._reference(trainer, pl_module)
        elif self._restored_rule is not None and self._restored_rule != ",".join(self.rule_names):
            rank_zero_info(
                f"BatchSizeLRScaling: the checkpoint was trained with rule {self._restored_rule!r}, "
                f"this run uses {','.join(self.rule_names)!r}. The reference batch size "
                f"{self.reference_batch_size} is kept, so the factor now follows the new rule "
                "from that reference."
            )
        self._law.give_to(self._rules)
        self._law.due = OnlineLaw.wanted(self._rules) and self.law is None
        self._update(trainer, pl_module, start=True)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.reader.follow(trainer, pl_module, batch)
        self._update(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self.stepped(trainer):
            return  # no optimizer step (gradient accumulation): nothing changed
        if OnlineLaw.wanted(self._rules):
            self._law.add(batch)
            if self._law.due and self._law.ready:
                self._refit_law(trainer, pl_module)
        self._show(trainer, pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.scaling_metrics()  # keep the last LRs readable after the hooks are gone
        for scaler in self._scalers:
            scaler.remove()  # detached; kept, so that `factors` still says what was applied

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        for scaler in self._scalers:
            scaler.restore()  # the checkpoint written on exit holds reference-unit LRs

    # -- batch size and factor ------------------------------------------------------------------------
    def _reference(self, trainer: Trainer, pl_module: LightningModule) -> int | None:
        """The effective batch size the LR was tuned for.

        That is the configured attribute at ``setup`` (before BatchSizeFinder), unless the
        dataloader disagrees although nothing changed it.
        """
        loader = self.reader.loader(trainer)
        configured = self._configured
        current_attr = self.reader.attribute(pl_module)
        per_device = configured
        if configured is None:
            per_device = loader or current_attr
        elif loader is not None and loader != configured and current_attr == configured:
            # The attribute did not move, yet the loader uses another size: it is not what
            # trains (a stale hparams.batch_size, a loader that ignores it). Trust the loader.
            self._warnings.warn(
                f"BatchSizeLRScaling: `{self.reader.attr}` is {configured} but the train dataloader "
                f"uses batch_size={loader}; the dataloader is what trains, so {loader} is taken as "
                "the reference. Pass reference_batch_size= to choose yourself."
            )
            per_device = loader
        if per_device is None:
            return None
        # The Trainer's own accumulation: a BatchSizeRamp may already have changed it, whatever
        # the callbacks' order.
        accumulation = self._configured_accumulation or trainer.accumulate_grad_batches
        return per_device * accumulation * trainer.world_size

    def _update(self, trainer: Trainer, pl_module: LightningModule, start: bool = False) -> None:
        current = self.reader.effective(trainer, pl_module)
        if current is None:
            if start:
                self._warnings.warn(
                    "BatchSizeLRScaling cannot tell the batch size: the train dataloader has no "
                    f"`batch_size` and the module has no `{self.reader.attr}` attribute. It will "
                    "read the first batch's size; set `batch_size_attr` (or pass "
                    "`batch_size_fn=`) to be sure."
                )
            elif self.reader.from_batches is None:
                self._warnings.warn(
                    "BatchSizeLRScaling is inactive: it cannot count the samples of batches of "
                    "this type. Pass batch_size_fn=(batch -> number of samples) or "
                    f"set `{self.reader.attr}` on the module."
                )
            return
        if self.reference_batch_size is None:
            self.reference_batch_size = current
        if current == self.effective_batch_size and not start:
            return
        changed = self.effective_batch_size is not None
        self.effective_batch_size = current
        if changed or (start and current != self._guard_cap_size):
            self.guard_cap = None  # a new size (or a resume at another): measured again
        if changed and OnlineLaw.wanted(self._rules):
            self._law.due = True
            if self._law.ready:
                return self._refit_law(trainer, pl_module)  # announces the factor itself
        self._apply(trainer, announce=True)

    def _apply(self, trainer: Trainer, announce: bool) -> None:
        assert self.reference_batch_size is not None and self.effective_batch_size is not None
        for i, (rule, scaler) in enumerate(zip(self._rules, self._scalers, strict=True)):
            factor = float(rule(self.reference_batch_size, self.effective_batch_size))
            if i == 0 and self.guard_cap is not None:
                factor = min(factor, self.guard_cap)
            scaler.set_factor(factor)
        self._applied = True
        if announce and self.verbose:
            rank_zero_info(
                f"BatchSizeLRScaling: effective batch size {self.effective_batch_size} "
                f"(reference {self.reference_batch_size}) -> LR factor "
                + ", ".join(f"{f:.4g} ({r.name})" for f, r in zip(self.factors, self._rules,
                                                                    strict=True))
            )
        if trainer.is_global_zero:
            log_metrics(trainer.loggers, self.scaling_metrics(), trainer.global_step)

    def cap_factor(self, trainer: Trainer, cap: float, ratio: float) -> None:
        """Cap the first optimizer's factor at ``cap`` until the next batch-size change.

        Called by the monitor's guard (:mod:`~lr_batch_callback.monitoring.guard`) when the
        measurement right after an increase puts the LR ``ratio`` times past the edge.
        """
        if not self._scalers or not self._applied:
            return
        before = self.factors[0]
        self.guard_cap = cap
        if not self._guard_said:
            self._guard_said = True
            rank_zero_warn(
                f"BatchSizeLRScaling: at effective batch size {self.effective_batch_size} the LR "
                f"factor {before:.4g} puts the LR {ratio:.2f}x past the edge of stability "
                f"measured right after the change; capped at {cap:.4g} until the next change "
                "(logged as lr_batch/guard_cap). MonitorConfig(guard=False) turns the guard off. "
                "(Said once.)")
        self._apply(trainer, announce=True)

    def drop_cap(self, trainer: Trainer) -> None:
        """Lift the guard's cap (the monitor's guard is off); the rule's factor applies again."""
        if self.guard_cap is None:
            return
        self.guard_cap = None
        if self._applied:
            self._apply(trainer, announce=True)

    def scaling_metrics(self) -> dict[str, float]:
        """The fixed-key LR metrics: ``lr_batch/*`` (see the README)."""
        metrics = {
            "lr_batch/effective_batch_size": float(self.effective_batch_size or math.nan),
            "lr_batch/reference_batch_size": float(self.reference_batch_size or math.nan),
        }
        if self.guard_cap is not None:
            metrics["lr_batch/guard_cap"] = self.guard_cap
        if self._attached and self.factors:  # active: the LRs the next step uses
            self._effective_lrs = [[float(lr) for lr in sc.effective_lrs()] for sc in self._scalers]
        for i, (factor, lrs) in enumerate(zip(self.factors, self._effective_lrs, strict=True)):
            opt = "" if i == 0 else f"_opt{i}"
            metrics[f"lr_batch/factor{opt}"] = factor
            for j, lr in enumerate(lrs):
                metrics[f"lr_batch/lr{opt}_pg{j}"] = lr
        return metrics

    def _show(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the effective LRs on the Trainer's logging cadence, the factor in the progress bar.

        The factor goes to the bar from the first step and at each change.

        The bar keeps the last value it was given, so the factor is logged (to the bar only) when
        it is new to the bar: a run shorter than ``log_every_n_steps`` still shows it.
        """
        factors = self.factors  # read from the scalers once per step
        if not self._attached or not factors:
            return
        # Only on the steps Lightning writes logs: ``self.log`` is dear next to a small model's
        # training step.
        connector = getattr(trainer, "_logger_connector", None)
        logging_step = connector is None or connector.should_update_logs
        if not logging_step and factors[0] == self._shown_factor:
            return
        try:
            if logging_step:
                self._log_lrs(pl_module)
            pl_module.log("lr_factor", factors[0], on_step=True, on_epoch=False,
                          prog_bar=True, logger=False)
            self._shown_factor = factors[0]
        except Exception:  # a loop without logging support: nothing to show
            pass

    def _log_lrs(self, pl_module: LightningModule) -> None:
        for i, scaler in enumerate(self._scalers):
            opt = "" if i == 0 else f"_opt{i}"
            for j, lr in enumerate(scaler.effective_lrs()):
                # A float64 tensor: a Python float would be logged rounded to float32.
                pl_module.log(f"lr_batch/lr{opt}_pg{j}", torch.tensor(lr, dtype=torch.float64),
                              on_step=True, on_epoch=False, prog_bar=False)

    @property
    def _attached(self) -> bool:
        return bool(self._scalers) and self._scalers[0].attached

    # -- the curvature law (rule="curvature") ---------------------------------------------------------
    @property
    def law(self) -> BatchSizeLaw | None:
        """The fitted λ(B) law of ``rule="curvature"``, or ``None``."""
        return self._law.law

    @law.setter
    def law(self, value: BatchSizeLaw | None) -> None:
        self._law.law = value

    def _refit_law(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._law.refit(trainer, pl_module, self._rules)
        self._apply(trainer, announce=True)

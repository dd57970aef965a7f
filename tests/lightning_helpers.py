"""Tiny LightningModules and recorder callbacks for the callback tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_dataset(n: int = 256, dim: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x[:, :classes].argmax(1) + (torch.rand(n, generator=g) < 0.2).long()) % classes
    return TensorDataset(x, y)


class TinyModule(LightningModule):
    """An MLP (optionally with BatchNorm and dropout) whose dataloader reads ``self.batch_size``."""

    def __init__(self, batch_size: int = 16, optimizer: str = "sgd", lr: float = 0.05,
                 scheduler: str | None = None, norm: bool = False, dropout: float = 0.0,
                 n: int = 256, log_constant: bool = False) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.optimizer_name = optimizer
        self.lr = lr
        self.scheduler_name = scheduler
        self.log_constant = log_constant
        layers: list[nn.Module] = [nn.Linear(6, 16)]
        if norm:
            layers.append(nn.BatchNorm1d(16))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(16, 3))
        self.net = nn.Sequential(*layers)
        self.data = make_dataset(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        if self.log_constant:
            self.log("plateau", 1.0, on_epoch=True, on_step=False)
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(1))

    def configure_optimizers(self) -> Any:
        params = self.parameters()
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        elif self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(params, lr=self.lr)
        else:
            raise ValueError(self.optimizer_name)
        if self.scheduler_name is None:
            return opt
        sched, interval, monitor = make_scheduler(self.scheduler_name, opt)
        config = {"scheduler": sched, "interval": interval}
        if monitor:
            config["monitor"] = monitor
        return {"optimizer": opt, "lr_scheduler": config}


def make_scheduler(name: str, opt: torch.optim.Optimizer) -> tuple[Any, str, str | None]:
    S = torch.optim.lr_scheduler
    base = opt.param_groups[0]["lr"]
    if name == "lambda":
        return S.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s)), "step", None
    if name == "onecycle":
        return S.OneCycleLR(opt, max_lr=base, total_steps=1000,
                            cycle_momentum=isinstance(opt, torch.optim.SGD)), "step", None
    if name == "cosine":
        return S.CosineAnnealingLR(opt, T_max=7), "step", None
    if name == "warm_restarts":
        return S.CosineAnnealingWarmRestarts(opt, T_0=5), "step", None
    if name == "cyclic":
        return S.CyclicLR(opt, base_lr=base / 10, max_lr=base, step_size_up=4,
                          cycle_momentum=isinstance(opt, torch.optim.SGD)), "step", None
    if name == "sequential":
        warm = S.LinearLR(opt, start_factor=0.1, total_iters=5)
        cos = S.CosineAnnealingLR(opt, T_max=20)
        return S.SequentialLR(opt, [warm, cos], milestones=[5]), "step", None
    if name == "plateau":
        return S.ReduceLROnPlateau(opt, patience=0, factor=0.5), "epoch", "plateau"
    raise ValueError(name)


class LRRecorder(Callback):
    """Records, at every optimizer step, the LR the optimizer used and the batch size trained on."""

    def __init__(self) -> None:
        self.used: list[float] = []
        self.batch_sizes: list[int] = []
        self._handles: list[Any] = []
        self._current_batch = 0

    def on_train_start(self, trainer, pl_module) -> None:
        for h in self._handles:
            h.remove()
        opt = trainer.optimizers[0]
        self._handles = [opt.register_step_pre_hook(self._pre)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._current_batch = len(batch[0])

    def _pre(self, optimizer, args, kwargs) -> None:
        self.used.append(float(optimizer.param_groups[0]["lr"]))
        self.batch_sizes.append(self._current_batch)

    def on_train_end(self, trainer, pl_module) -> None:
        for h in self._handles:
            h.remove()


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def values(self, key: str) -> dict[int, float]:
        return {step: m[key] for step, m in self.rows if key in m}


_LAW_KEYS = {"law_samples": "samples", "law_draws": "draws", "law_min_r_squared": "min_r_squared"}


def flat_callback(**kwargs: Any) -> Any:
    """A ``BatchSizeLRCallback`` from the flat keyword arguments of version 0.1.

    The 0.2 constructor groups the measurement settings into ``MonitorConfig`` and the λ(B)
    settings into ``LawConfig``; the tests keep their 0.1 spelling through this one mapping
    (``smallest=True`` is λ_min at every measurement, ``smallest=False`` never).
    """
    from dataclasses import fields

    from lr_batch_callback import BatchSizeLRCallback, LawConfig, MonitorConfig

    monitor_keys = {f.name for f in fields(MonitorConfig)}
    monitor = {k: kwargs.pop(k) for k in list(kwargs) if k in monitor_keys}
    if "smallest" in kwargs:
        monitor["lambda_min_every"] = 1 if kwargs.pop("smallest") else 0
    law = {_LAW_KEYS[k]: kwargs.pop(k) for k in list(kwargs) if k in _LAW_KEYS}
    return BatchSizeLRCallback(**kwargs, monitor=MonitorConfig(**monitor) if monitor else None,
                               law=LawConfig(**law) if law else None)

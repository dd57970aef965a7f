"""Zoo models in a real Trainer: monitoring on, λ_max read back from the CSVLogger's file."""

from __future__ import annotations

import csv
import math
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from lr_batch_callback import MonitorConfig, SpectrumMonitor
from tests.zoo import ZOO


def _float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_float32(v) for v in value)
    return value


class Repeat(Dataset):
    """The same ready-made batch, ``n`` times (the dataloader does not batch: batch_size=None)."""

    def __init__(self, batch: Any, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.batch


class ZooModule(LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        case = ZOO[name]()
        self.model = case.model.float()
        self.loss = case.loss_fn
        self.batch = _float32(case.batch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.model, batch)
        self.log("train_loss", loss)
        return loss

    def curvature_loss(self, batch: Any) -> torch.Tensor:
        return self.loss(self.model, batch)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Repeat(self.batch, 4), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


@pytest.mark.parametrize("name", ["gpt", "vision_transformer", "lstm",
                                  pytest.param("resnet18", marks=pytest.mark.slow)])
def test_zoo_model_logs_lambda_max_in_a_trainer(tmp_path, name: str) -> None:
    seed_everything(0)
    logger = CSVLogger(tmp_path, name=name)
    monitor = SpectrumMonitor(every_n_steps=2, config=MonitorConfig(max_overhead=None))
    trainer = Trainer(max_steps=4, callbacks=[monitor], logger=logger, accelerator="cpu",
                      enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(ZooModule(name))
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("hessian/lambda_max")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    for row in rows:
        value = float(row["hessian/lambda_max"])
        assert math.isfinite(value) and value > 0
    assert monitor.measurements == 2 and monitor.skipped == 0

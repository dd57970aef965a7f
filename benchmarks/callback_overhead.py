"""Callback overhead on the demo training at default settings.

>>> TO BE COMPLETED BY THE LEAD once ``lr_batch_callback/callback.py`` (``BatchSizeLRCallback``)
>>> lands: check that ``BatchSizeLRCallback()`` with no arguments is the default the demo uses,
>>> and adjust ``DEMO`` below if the demo's training differs.

A short Lightning training of the demo-like small CNN on scikit-learn's digits (8×8 images) runs
with and without ``BatchSizeLRCallback()`` at its default settings: the same seeds, the same data
order, ``median of N`` wall times of ``trainer.fit`` each. The overhead is
``(with − without) / without``. When the callback cannot be imported the row says
"callback: not available yet".
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class DemoSettings:
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    max_epochs: int = 5
    runs: int = 3
    seed: int = 0


DEMO = DemoSettings()


def load_callback() -> Any:
    """The callback class, or ``None`` when it does not exist yet."""
    try:
        from lr_batch_callback.callback import BatchSizeLRCallback
    except Exception:
        return None
    return BatchSizeLRCallback


def _module(settings: DemoSettings) -> Any:
    import torch.nn.functional as F
    from lightning.pytorch import LightningModule
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.problems import _digits_cnn

    class DigitsCNN(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = settings.batch_size
            self.net: nn.Module = _digits_cnn()
            digits = load_digits()
            x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
            self.data = TensorDataset(x, torch.tensor(digits.target, dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.data, batch_size=self.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(settings.seed))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=settings.lr, momentum=settings.momentum)

    return DigitsCNN()


def _fit_seconds(settings: DemoSettings, device: torch.device, callback_cls: Any | None) -> float:
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    seed_everything(settings.seed, workers=True, verbose=False)
    module = _module(settings)
    callbacks = [callback_cls()] if callback_cls is not None else []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            max_epochs=settings.max_epochs, accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1, callbacks=callbacks, logger=CSVLogger(tmp), enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
        )
        start = time.perf_counter()
        trainer.fit(module)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


def callback_overhead(device: torch.device, settings: DemoSettings = DEMO) -> dict[str, Any]:
    """Median fit time without and with the callback, and the overhead in percent."""
    callback_cls = load_callback()
    if callback_cls is None:
        return {"status": "callback: not available yet"}
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    without, with_cb = [], []
    for _ in range(settings.runs):  # alternate so that machine load drifts hit both equally
        without.append(_fit_seconds(settings, device, None))
        with_cb.append(_fit_seconds(settings, device, callback_cls))
    base, cb = statistics.median(without), statistics.median(with_cb)
    return {
        "status": "ok",
        "without_s": base,
        "with_s": cb,
        "overhead_pct": 100.0 * (cb - base) / base,
        "settings": settings,
    }

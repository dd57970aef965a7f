"""Callback overhead on the demo training at default settings.

>>> FOR THE LEAD: this section is to be checked once the demo (``examples/demo.py``) is final:
>>> that ``BatchSizeLRCallback()`` with no arguments is what the demo attaches, and that
>>> ``DEMO`` below (steps, batch size) matches the demo's training. Edit ``DEMO`` / ``_pieces``.

A short Lightning training of the demo's small CNN on scikit-learn's digits (8×8 images) runs
with and without ``BatchSizeLRCallback()`` at its default settings: the same seeds, the same data
order, the median of ``runs`` wall times of ``trainer.fit`` each, the two alternating so that
machine-load drifts hit both. The model and data come from ``examples/common.py``
(``DigitsClassifier``, ``DigitsDataModule``) when it imports, otherwise from an equivalent
built-in copy. Validation is off, so the overhead is relative to training alone. The overhead is
``(with − without) / without``. When the callback cannot be imported the row says
"callback: not available yet".
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class DemoSettings:
    batch_size: int = 32  # the demo's reference batch size
    lr: float = 0.01  # the demo's SGD learning rate at that batch size
    momentum: float = 0.9
    max_steps: int = 300  # past the callback's default monitoring period (250 steps)
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


def _examples_common() -> Any:
    path = Path(__file__).resolve().parent.parent / "examples" / "common.py"
    spec = importlib.util.spec_from_file_location("_lr_batch_examples_common", path)
    if spec is None or spec.loader is None:
        raise ImportError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pieces(settings: DemoSettings) -> tuple[Any, Any, str]:
    """(LightningModule, LightningDataModule or None, where they came from)."""
    try:
        common = _examples_common()
        module = common.DigitsClassifier(model="cnn", optimizer="sgd", lr=settings.lr,
                                         momentum=settings.momentum)
        data = common.DigitsDataModule(batch_size=settings.batch_size, seed=settings.seed)
        return module, data, "examples/common.py (DigitsClassifier, DigitsDataModule)"
    except Exception:
        return _builtin_module(settings), None, "built-in copy of the demo CNN"


def _builtin_module(settings: DemoSettings) -> Any:
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
            return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=settings.lr, momentum=settings.momentum)

    return DigitsCNN()


def _fit_seconds(settings: DemoSettings, device: torch.device, callback_cls: Any | None,
                 counts: list[tuple[int, int]] | None = None,
                 **kwargs: Any) -> tuple[float, str]:
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    seed_everything(settings.seed, workers=True, verbose=False)
    module, data, source = _pieces(settings)
    callbacks = [callback_cls(**kwargs)] if callback_cls is not None else []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            max_steps=settings.max_steps, accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1, callbacks=callbacks, logger=CSVLogger(tmp), enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
            limit_val_batches=0, num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        if data is not None:
            trainer.fit(module, datamodule=data)
        else:
            trainer.fit(module)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    if callbacks and counts is not None:
        # How many spectrum measurements ran and how many the overhead budget skipped: an
        # overhead near 0 % with 0 measurements means the budget, not the callback, was cheap.
        monitor = getattr(callbacks[0], "monitor", None)
        counts.append((int(getattr(monitor, "measurements", -1)),
                       int(getattr(monitor, "skipped", -1))))
    return seconds, source


def callback_overhead(device: torch.device, settings: DemoSettings = DEMO) -> dict[str, Any]:
    """Median fit time without and with the callback, and the overhead in percent."""
    callback_cls = load_callback()
    if callback_cls is None:
        return {"status": "callback: not available yet"}
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    without, with_cb = [], []
    counts: list[tuple[int, int]] = []
    source = ""
    for _ in range(settings.runs):  # alternate so that machine load drifts hit both equally
        seconds, source = _fit_seconds(settings, device, None)
        without.append(seconds)
        with_cb.append(_fit_seconds(settings, device, callback_cls, counts)[0])
    base, cb = statistics.median(without), statistics.median(with_cb)
    # Diagnostic, not the target: the same fit with the overhead budget switched off, so that
    # the measurement that falls due actually runs and its cost shows.
    unbudgeted: dict[str, Any] = {}
    try:
        forced, forced_counts = [], []
        for _ in range(settings.runs):
            forced.append(_fit_seconds(settings, device, callback_cls, forced_counts,
                                       max_overhead=None)[0])
        unbudgeted = {"with_s": statistics.median(forced),
                      "overhead_pct": 100.0 * (statistics.median(forced) - base) / base,
                      "measurements": forced_counts[-1][0] if forced_counts else -1,
                      "skipped": forced_counts[-1][1] if forced_counts else -1}
    except Exception as exc:  # an API change must not hide the main result
        unbudgeted = {"error": f"{type(exc).__name__}: {exc}"[:160]}
    return {
        "status": "ok",
        "without_s": base,
        "with_s": cb,
        "overhead_pct": 100.0 * (cb - base) / base,
        "settings": settings,
        "source": source,
        "measurements": counts[-1][0] if counts else -1,
        "skipped": counts[-1][1] if counts else -1,
        "unbudgeted": unbudgeted,
    }

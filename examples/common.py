"""Shared pieces of the examples: the digits data, the LightningModules, small helpers.

Nothing here downloads anything. The data is scikit-learn's bundled ``digits`` set (1,797
grey-scale 8×8 images of the digits 0-9), or a synthetic stand-in of the same shape when
scikit-learn is missing or ``dataset="synthetic"`` is asked for.

The networks are in ``models.py``. Not meant to be run; the example scripts import it
(``python examples/<name>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import csv
import importlib.util
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

# Loaded by file path (benchmarks/callback_overhead.py does that), this folder may not be on
# sys.path yet; models.py lives next to this file.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from models import DIGITS_MODELS, digits_model  # noqa: E402

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
DATASETS = ("digits", "synthetic")
MODELS = DIGITS_MODELS
OPTIMIZERS = ("sgd", "adam")
#: Learning rates tuned for a batch of ``REFERENCE_BATCH_SIZE`` samples.
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}
REFERENCE_BATCH_SIZE = 32


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def synthetic_digits(n: int = 1797, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Ten noisy 8×8 class prototypes: a stand-in for ``digits`` with the same shapes."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(NUM_CLASSES, *IMAGE_SHAPE, generator=g) * 16
    y = torch.arange(n) % NUM_CLASSES
    x = prototypes[y] + 4 * torch.randn(n, *IMAGE_SHAPE, generator=g)
    return x.clamp(0, 16), y


def load_digits_tensors(dataset: str = "digits", seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images ``(N, 1, 8, 8)`` with values in [0, 16] and labels ``(N,)``."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}.")
    if dataset == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            warnings.warn("scikit-learn is not installed: using synthetic digits instead.",
                          stacklevel=2)
        else:
            digits = load_digits()  # bundled with scikit-learn: no download
            x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
            return x, torch.tensor(digits.target, dtype=torch.long)
    return synthetic_digits(seed=seed)


def stratified_split(y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of a train/test split with the same class proportions on both sides."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in y.unique():
        idx = torch.nonzero(y == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


class DigitsDataModule(L.LightningDataModule):
    """Digits (or synthetic) images, split into train and test, normalised with train statistics.

    ``train_dataloader`` reads ``self.batch_size`` each time it is built, which is what lets
    ``BatchSizeSchedule`` and ``BatchSizeFinder`` change it during ``fit``. The test split is
    also the validation split, so the test accuracy is logged after every epoch (``val_acc``).

    Args:
        batch_size: per-device training batch size.
        dataset: ``"digits"`` (scikit-learn's bundled set) or ``"synthetic"``.
        test_fraction: fraction of each class held out for testing.
        eval_batch_size: batch size of the validation/test loaders.
        seed: seed of the split (and of the synthetic data).
    """

    def __init__(self, batch_size: int = REFERENCE_BATCH_SIZE, dataset: str = "digits",
                 test_fraction: float = 0.2, eval_batch_size: int = 512, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.dataset = dataset
        self.test_fraction = test_fraction
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors(self.dataset, self.seed)
        train, test = stratified_split(y, self.test_fraction, self.seed)
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        self.train_set = TensorDataset(x[train], y[train])
        self.test_set = TensorDataset(x[test], y[test])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.test_set is not None
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ------------------------------------------------------------------------------------------
# Optimizers and the LightningModules
# ------------------------------------------------------------------------------------------


def build_optimizer(name: str, params: Any, lr: float, momentum: float = 0.9
                    ) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")


class Classifier(L.LightningModule):
    """Cross-entropy classification around ``self.net``: the steps every example shares."""

    net: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def curvature_loss(self, batch: Any) -> Tensor:
        """The loss whose Hessian BatchSizeLRCallback measures: mean cross-entropy of the batch."""
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", (logits.argmax(1) == y).float().mean())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())


class DigitsClassifier(Classifier):
    """Cross-entropy classification of the digits with a small CNN or MLP.

    Args:
        model: ``"cnn"`` (``models.SmallCNN``, 151k parameters) or ``"mlp"``
            (``models.DigitsMLP``, 26k).
        optimizer: ``"sgd"`` (with momentum) or ``"adam"``.
        lr: learning rate at the reference batch size (32); default 0.01 for SGD, 1e-3 for Adam.
        momentum: SGD momentum.
    """

    def __init__(self, model: str = "cnn", optimizer: str = "sgd", lr: float | None = None,
                 momentum: float = 0.9) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
        self.save_hyperparameters()
        self.net = digits_model(model)
        self.optimizer_name = optimizer
        self.lr = DEFAULT_LR[optimizer] if lr is None else lr
        self.momentum = momentum

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.optimizer_name, self.parameters(), self.lr, self.momentum)


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------


def parse_schedule(text: str) -> dict[int, int]:
    """``"0:32,3:128,6:512"`` → ``{0: 32, 3: 128, 6: 512}`` (epoch → per-device batch size)."""
    try:
        pairs = (item.split(":") for item in text.replace(" ", "").split(",") if item)
        schedule = {int(epoch): int(size) for epoch, size in pairs}
    except ValueError:
        raise ValueError(
            f"Cannot read the schedule {text!r}; write epoch:batch_size pairs such as "
            "'0:32,3:128,6:512'."
        ) from None
    if not schedule:
        raise ValueError("The batch-size schedule is empty; e.g. '0:32,3:128,6:512'.")
    return schedule


def accelerator(device: str) -> str:
    """Lightning's accelerator name for ``--device {auto,cpu,cuda}``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device.")
    return device


def default_run_dir(name: str) -> Path:
    """``runs/<name>-<timestamp>``: a fresh directory for each run."""
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def make_loggers(run_dir: str | Path) -> list[Any]:
    """CSVLogger writing ``metrics.csv`` (and, via the callback, ``spectra/``) into ``run_dir``,
    plus a TensorBoardLogger into ``run_dir/tensorboard`` when tensorboard is installed."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    # name="" and version="" make the CSV log directory the run directory itself; it comes first
    # so that trainer.log_dir (where the spectra go) is that directory too.
    loggers: list[Any] = [CSVLogger(run_dir, name="", version="")]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version="",
                                         default_hp_metric=False))
    return loggers


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """The rows of a CSVLogger ``metrics.csv``; empty cells are left out of each row."""
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(fh)]

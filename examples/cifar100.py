"""CIFAR-100 with VGG-16 or WideResNet-28-10, as in Granziol, Zohren & Roberts (arXiv 2006.09092).

The networks are ``models.VGG16`` (with or without BatchNorm, 15.3M parameters) and
``models.WideResNet`` (WRN-28-10: 36.5M parameters; WRN-10-1, for smoke tests: 84k).

SGD with momentum 0.9 and weight decay 5e-4; the learning rate defaults to the paper's value at
batch size 128 for the chosen network, and ``BatchSizeLRCallback`` scales it linearly for any
other batch size. The paper's pairs are exactly that rule: (0.05, 128), (0.1, 256), (0.2, 512)
for VGG-16 and (0.1, 128), (0.2, 256), (0.4, 512) for VGG-16-BN and WRN-28-10, so
``--batch-size 512`` reproduces their largest-batch run. ``--optimizer adamw`` uses their AdamW
setting (4e-4 at 128) with the square-root rule. The top Hessian eigenvalue of the training
batch is logged every ``--monitor-every`` steps.

Data: the python version of CIFAR-100 under ``--data-dir`` (``<data-dir>/cifar-100-python/``,
as torchvision's ``CIFAR100(root, download=False)`` expects); nothing is downloaded.
``--fake-data`` uses torchvision's ``FakeData`` (random 32×32 images, 100 classes) instead.
A GPU is used when present.

Run it::

    python examples/cifar100.py --data-dir ~/data --model wrn                 # WRN-28-10
    python examples/cifar100.py --data-dir ~/data --model vgg16_bn --batch-size 512
    python examples/cifar100.py --data-dir ~/data --batch-size-schedule "0:128,100:256,200:512"
    # smoke run on CPU, seconds: WRN-10-1 on fake data, a few steps
    python examples/cifar100.py --fake-data --depth 10 --width 1 --batch-size 8 --max-steps 3
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from _args import example_parser
from common import Classifier, accelerator, default_run_dir, make_loggers, parse_schedule
from lr_batch_callback import BatchSizeLRCallback, BatchSizeSchedule, MonitorConfig
from models import VGG16, WideResNet

NUM_CLASSES = 100
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)  # CIFAR-100 training set
PAPER_BATCH_SIZE = 128
#: The paper's learning rates at batch size 128 (Granziol et al. 2022, their experiments section).
PAPER_LR = {("sgd", "vgg16"): 0.05, ("sgd", "vgg16_bn"): 0.1, ("sgd", "wrn"): 0.1,
            ("adamw", "vgg16"): 4e-4, ("adamw", "vgg16_bn"): 4e-4, ("adamw", "wrn"): 4e-4}


def build_network(name: str, depth: int, width: int, dropout: float) -> nn.Module:
    """``models.WideResNet`` (WRN-28-10: 36.5M parameters) or ``models.VGG16`` (15.3M)."""
    if name == "wrn":
        return WideResNet(depth, width, NUM_CLASSES, dropout=dropout)
    if name in ("vgg16", "vgg16_bn"):
        return VGG16(batch_norm=name == "vgg16_bn", num_classes=NUM_CLASSES)
    raise ValueError(f"Unknown model {name!r}; choose vgg16, vgg16_bn or wrn.")


# ------------------------------------------------------------------------------------------
# Data and training
# ------------------------------------------------------------------------------------------


class CIFAR100DataModule(L.LightningDataModule):
    """CIFAR-100 from a local folder (random crop + flip for training), or FakeData."""

    def __init__(self, data_dir: str | None, batch_size: int, fake_data: bool = False,
                 fake_size: int = 512, num_workers: int = 0) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size  # read by train_dataloader: BatchSizeSchedule changes it
        self.fake_data = fake_data
        self.fake_size = fake_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        from torchvision import datasets, transforms

        normalize = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
        augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        train_tf, test_tf = transforms.Compose(augment + normalize), transforms.Compose(normalize)
        if self.fake_data:
            shape = (3, 32, 32)
            self.train_set = datasets.FakeData(self.fake_size, shape, NUM_CLASSES, train_tf)
            self.test_set = datasets.FakeData(max(self.fake_size // 4, 1), shape, NUM_CLASSES,
                                              test_tf, random_offset=1)
            return
        try:
            self.train_set = datasets.CIFAR100(self.data_dir, train=True, transform=train_tf)
            self.test_set = datasets.CIFAR100(self.data_dir, train=False, transform=test_tf)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted."
            raise SystemExit(
                f"CIFAR-100 not found under {self.data_dir!r} ({exc}). Put the python version "
                "(cifar-100-python/ with train, test, meta) there, or use --fake-data."
            ) from None

    def _loader(self, dataset: Dataset | None, batch_size: int, train: bool) -> DataLoader:
        assert dataset is not None
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, 512, train=False)


def paper_lr_decay(epochs: int) -> Any:
    """LR multiplier per epoch: 1 for the first half, then linear down to 0.01 at 90%."""
    def factor(epoch: int) -> float:
        t = epoch / max(epochs, 1)
        if t <= 0.5:
            return 1.0
        if t <= 0.9:
            return 1.0 - 0.99 * (t - 0.5) / 0.4
        return 0.01
    return factor


class CIFARClassifier(Classifier):
    """Cross-entropy training with SGD (momentum 0.9) or AdamW and the decay above."""

    def __init__(self, network: nn.Module, optimizer: str, lr: float, weight_decay: float,
                 epochs: int) -> None:
        super().__init__()
        self.net = network
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, paper_lr_decay(self.epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "epoch"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, output_dir="runs/cifar100-<timestamp>", threads=False)
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", help="folder holding cifar-100-python/")
    data.add_argument("--fake-data", action="store_true",
                      help="torchvision FakeData (random 32×32 images, 100 classes) instead")
    data.add_argument("--fake-size", type=int, default=512, help="training images of --fake-data")
    data.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                      help="data-loading processes")
    net = parser.add_argument_group("network")
    net.add_argument("--model", choices=("wrn", "vgg16_bn", "vgg16"), default="wrn",
                     help="WideResNet-depth-width, or torchvision's VGG-16 with/without BN")
    net.add_argument("--depth", type=int, default=28, help="WideResNet depth (6n + 4)")
    net.add_argument("--width", type=int, default=10, help="WideResNet widening factor")
    net.add_argument("--dropout", type=float, default=0.0, help="WideResNet dropout")
    net.add_argument("--precision", default="32-true", help="e.g. 16-mixed or bf16-mixed on GPU")
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                     help="SGD with momentum 0.9, or AdamW")
    opt.add_argument("--lr", type=float, default=None,
                     help=f"learning rate at --reference-batch-size (default: the paper's: "
                          f"{PAPER_LR[('sgd', 'vgg16')]} VGG-16, {PAPER_LR[('sgd', 'wrn')]} "
                          f"VGG-16-BN/WRN, {PAPER_LR[('adamw', 'wrn')]} AdamW)")
    opt.add_argument("--reference-batch-size", type=int, default=PAPER_BATCH_SIZE,
                     help="batch size the learning rate is tuned for")
    opt.add_argument("--weight-decay", type=float, default=5e-4, help="L2 / decoupled decay")
    opt.add_argument("--batch-size", type=int, default=PAPER_BATCH_SIZE,
                     help="per-device batch size (the LR follows it)")
    opt.add_argument("--batch-size-schedule",
                     help="change the batch size during training, e.g. '0:128,100:256,200:512'")
    opt.add_argument("--rule", default="auto",
                     choices=("auto", "linear", "sqrt", "none", "curvature"),
                     help="LR scaling rule; auto: linear for SGD, sqrt for AdamW")
    opt.add_argument("--epochs", type=int, default=300,
                     help="LR constant for half of them, then linear decay to 1%% at 90%%")
    opt.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps")
    monitor = parser.add_argument_group("curvature monitoring")
    monitor.add_argument("--monitor-every", type=int, default=500,
                         help="optimizer steps between Hessian measurements")
    monitor.add_argument("--max-overhead", type=float, default=0.05,
                         help="cap on the fraction of training time spent measuring; 0: no cap")
    monitor.add_argument("--curvature", choices=("hessian", "ggn"), default="hessian",
                         help="Hessian or Generalised Gauss-Newton")
    args = parser.parse_args(argv)
    if not args.fake_data and args.data_dir is None:
        parser.error("pass --data-dir (the folder holding cifar-100-python/) or --fake-data")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    L.seed_everything(args.seed, verbose=False)
    lr = args.lr if args.lr is not None else PAPER_LR[(args.optimizer, args.model)]
    schedule = parse_schedule(args.batch_size_schedule) if args.batch_size_schedule else None
    run_dir = args.output_dir or default_run_dir("cifar100")
    print(f"Run directory: {run_dir}")

    network = build_network(args.model, args.depth, args.width, args.dropout)
    name = f"WRN-{args.depth}-{args.width}" if args.model == "wrn" else args.model.upper()
    num_params = sum(p.numel() for p in network.parameters())
    print(f"{name}: {num_params / 1e6:.2f}M parameters; {args.optimizer} lr {lr:g} at batch size "
          f"{args.reference_batch_size}")

    datamodule = CIFAR100DataModule(args.data_dir, args.batch_size, args.fake_data,
                                    args.fake_size, args.num_workers)
    model = CIFARClassifier(network, args.optimizer, lr, args.weight_decay, args.epochs)
    lr_callback = BatchSizeLRCallback(
        rule=args.rule,
        reference_batch_size=args.reference_batch_size,
        monitor_every_n_steps=args.monitor_every,
        monitor=MonitorConfig(curvature=args.curvature, max_overhead=args.max_overhead or None),
    )
    callbacks: list[Any] = [lr_callback]
    if schedule is not None:
        callbacks.insert(0, BatchSizeSchedule(schedule))
    trainer = L.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accelerator=accelerator(args.device),
        devices=1,
        default_root_dir=run_dir,
        precision=args.precision,
        logger=make_loggers(run_dir),
        callbacks=callbacks,
        log_every_n_steps=20,
    )
    trainer.fit(model, datamodule=datamodule)

    acc = trainer.callback_metrics.get("val_acc")
    factor = lr_callback.factors[0]
    scheduled_lr = trainer.optimizers[0].param_groups[0]["lr"]  # reference units
    print(f"\nEffective batch size {lr_callback.effective_batch_size} (reference "
          f"{lr_callback.reference_batch_size}): LR factor {factor:.4g}, last LR "
          f"{scheduled_lr:.4g} × {factor:.4g} = {scheduled_lr * factor:.4g}")
    if acc is not None and not math.isnan(float(acc)):
        print(f"Test accuracy: {float(acc):.2%}")
    print(f"Metrics: {run_dir / 'metrics.csv'}; spectra: {run_dir / 'spectra'}")


if __name__ == "__main__":
    main()

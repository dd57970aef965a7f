"""Demo: grow the batch size during training; the learning rate follows, the Hessian is watched.

The 151k-parameter ``SmallCNN`` of ``models.py`` learns scikit-learn's bundled 8×8 digits (no
download) while ``BatchSizeSchedule``
raises the batch size 32 → 128 → 512 and ``BatchSizeLRCallback`` rescales the learning rate
at each change (linear rule for SGD, square root for Adam) and measures the top eigenvalue of
the batch Hessian every few steps, with its spectral density now and then.

Run it (about a minute on two CPU cores)::

    python examples/demo.py                      # SGD with momentum 0.9
    python examples/demo.py --optimizer adam     # Adam: square-root rule
    python examples/demo.py --rule curvature     # the factor from the measured λ(B) law
    python examples/demo.py --help

Everything lands in one run directory (default ``runs/demo-<timestamp>``):

- ``metrics.csv`` — CSVLogger: ``lr_batch/factor``, ``lr_batch/lr_pg0``, ``hessian/lambda_max``,
  ``val_acc``, ...;
- ``spectra/step_*.json`` — one file per spectrum measurement (read with ``load_spectra``);
- ``tensorboard/`` — the same scalars plus density histograms (``tensorboard --logdir runs``),
  when tensorboard is installed;
- ``demo.png`` — λ_max and the learning rate over the steps, and spectral densities.

What to look for, with SGD: the LR rises ×4 at each change of batch size. λ_max grows while
the network learns at B=32 and drops at each increase. The dashed line ``2(1+μ)/η`` is the
largest curvature heavy-ball SGD is stable on at learning rate η: the larger the batch (and
LR), the closer training runs to it.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import torch
from lightning.pytorch.callbacks import Callback

from _args import example_parser
from common import (
    DEFAULT_LR,
    REFERENCE_BATCH_SIZE,
    DigitsClassifier,
    DigitsDataModule,
    accelerator,
    default_run_dir,
    make_loggers,
    parse_schedule,
    read_metrics_csv,
)
from lr_batch_callback import (
    BatchSizeLRCallback,
    BatchSizeSchedule,
    MonitorConfig,
    SpectrumRecord,
    load_spectra,
)

matplotlib.use("Agg")  # files only: works without a display

MOMENTUM = 0.9
LAMBDA_UNIT = "nats / weight²"  # Hessian of a cross-entropy (in nats) w.r.t. the weights
# SGD: η·λ is a pure number. Adam: its step η·m/√v is in weight units, like η.
LR_UNIT = {"sgd": "weight² / nat", "adam": "weight"}
OPTIMIZER_NAMES = {"sgd": f"SGD (momentum {MOMENTUM})", "adam": "Adam"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, fast="smoke run: 2 epochs of 4 steps each (for the tests)",
                            output_dir="runs/demo-<timestamp>", digits=("dataset", "model", "optimizer"))
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate at batch size {REFERENCE_BATCH_SIZE} (default: "
                             f"{DEFAULT_LR['sgd']} for SGD, {DEFAULT_LR['adam']} for Adam)")
    parser.add_argument("--schedule", default=None,
                        help="per-device batch size by epoch, 'epoch:size,...' "
                             "(default: '0:32,3:128,6:512'; with --fast '0:16,1:32')")
    parser.add_argument("--rule", choices=("auto", "linear", "sqrt", "none", "curvature"),
                        default="auto", help="LR scaling rule; auto: linear for SGD, sqrt for "
                                             "Adam")
    parser.add_argument("--epochs", type=int, default=None, help="default: 9 (2 with --fast)")
    parser.add_argument("--monitor-every", type=int, default=None,
                        help="optimizer steps between spectrum measurements (default: 5; 2 with "
                             "--fast)")
    args = parser.parse_args(argv)
    args.schedule = parse_schedule(args.schedule or ("0:16,1:32" if args.fast else "0:32,3:128,6:512"))
    args.epochs = args.epochs or (2 if args.fast else 9)
    args.monitor_every = args.monitor_every or (2 if args.fast else 5)
    args.output_dir = args.output_dir or default_run_dir("demo")
    return args


class EpochSummary(Callback):
    """One row per epoch for the final table: batch size, LR factor, effective LR, test accuracy."""

    def __init__(self, lr_callback: BatchSizeLRCallback) -> None:
        self.lr_callback = lr_callback
        self.rows: list[dict[str, Any]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation (on the test split) has run by now; the batch size of the next epoch has
        # not been seen by the LR callback yet, so its numbers are this epoch's.
        scaling = self.lr_callback.scaling_metrics()
        self.rows.append({
            "epoch": trainer.current_epoch,
            "batch_size": self.lr_callback.effective_batch_size,
            "factor": scaling["lr_batch/factor"],
            "lr": scaling["lr_batch/lr_pg0"],
            "test_acc": float(trainer.callback_metrics.get("val_acc", math.nan)),
        })


def print_table(rows: list[dict[str, Any]], spectra: list[SpectrumRecord]) -> None:
    """Epoch table; λ_max is the last measurement of the epoch (— when there was none)."""
    last_lambda = {r.epoch: r.lambda_max for r in spectra}  # sorted by step: last wins
    print(f"\n{'epoch':>5}  {'batch size':>10}  {'LR factor':>9}  {'eff. LR':>8}  "
          f"{'λ_max':>8}  {'test acc':>8}")
    for row in rows:
        lam = last_lambda.get(row["epoch"])
        lam_text = f"{lam:8.2f}" if lam is not None else f"{'—':>8}"
        print(f"{row['epoch']:>5}  {row['batch_size']:>10}  {row['factor']:>9.3g}  "
              f"{row['lr']:>8.4g}  {lam_text}  {row['test_acc']:>8.1%}")


def plot_run(path: Path, spectra: list[SpectrumRecord], metrics: list[dict[str, float]],
             title: str, optimizer: str) -> None:
    """λ_max and the effective LR over steps (batch-size changes marked), and a few densities."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 7.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=[1.2, 1])
    ax_lam = fig.add_subplot(grid[0, 0])
    ax_lr = fig.add_subplot(grid[1, 0], sharex=ax_lam)
    plot_lambda_and_lr(ax_lam, ax_lr, spectra, metrics, optimizer)
    plot_densities(fig.add_subplot(grid[:, 1]), spectra)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lambda_and_lr(ax_lam: Any, ax_lr: Any, spectra: list[SpectrumRecord],
                       metrics: list[dict[str, float]], optimizer: str) -> None:
    # The LR callback logs the factor, the batch size and the effective LR (lr × factor) in one
    # row whenever they change (and the effective LR alone on every logging step).
    changes = [(int(m["step"]), m["lr_batch/lr_pg0"], int(m["lr_batch/effective_batch_size"]))
               for m in metrics if "lr_batch/factor" in m]
    last_step = max([int(m["step"]) for m in metrics if "step" in m] + [r.step for r in spectra])
    lr_steps = [step for step, _, _ in changes] + [last_step]
    lr_values = [lr for _, lr, _ in changes] + [changes[-1][1]]

    lambdas = [r.lambda_max for r in spectra]
    ax_lam.plot([r.step for r in spectra], lambdas, "o-", ms=4, color="C0",
                label="λ_max of the batch Hessian")
    if optimizer == "sgd":
        limit = [2 * (1 + MOMENTUM) / lr for lr in lr_values]
        ax_lam.step(lr_steps, limit, where="post", ls="--", color="C3",
                    label=f"SGD stability limit 2(1+μ)/η, μ={MOMENTUM}")
    if all(v > 0 for v in lambdas):
        ax_lam.set_yscale("log")
    ax_lam.set_ylabel(f"eigenvalue ({LAMBDA_UNIT})")
    ax_lam.set_title("Top eigenvalue of the batch Hessian")
    ax_lam.legend(loc="best", fontsize="small")

    ax_lr.step(lr_steps, lr_values, where="post", color="C2", lw=2,
               label="effective LR = lr × factor")
    ax_lr.set_yscale("log")
    ax_lr.set_ylim(min(lr_values) / 1.5, max(lr_values) * 3)  # room for the B= labels on top
    ticks = sorted(set(lr_values))
    ax_lr.set_yticks(ticks, [f"{lr:.3g}" for lr in ticks])
    ax_lr.minorticks_off()
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel(f"learning rate ({LR_UNIT[optimizer]})")
    ax_lr.set_title("Learning rate used by the optimizer")
    ax_lr.legend(loc="lower right", fontsize="small")

    for i, (step, _, batch_size) in enumerate(changes):
        if i > 0:
            ax_lam.axvline(step, color="grey", ls=":", lw=1)
            ax_lr.axvline(step, color="grey", ls=":", lw=1)
        ax_lr.annotate(f"B={batch_size}", (step, 1), xycoords=("data", "axes fraction"),
                       xytext=(3, -12), textcoords="offset points", fontsize="small", color="grey")
    ax_lam.grid(alpha=0.3, which="both")
    ax_lr.grid(alpha=0.3, which="both")


def plot_densities(ax: Any, spectra: list[SpectrumRecord]) -> None:
    """One density per batch size: the last one measured at that size."""
    latest = {r.effective_batch_size: r for r in spectra if r.density is not None}
    peak = 0.0
    for record in latest.values():
        curve = record.density_curve()
        assert curve is not None
        grid, density = curve[0].numpy(), curve[1].numpy()
        peak = max(peak, float(density.max()))
        ax.plot(grid, density, label=f"B={record.effective_batch_size}, step {record.step}")
    if latest:
        ax.set_yscale("log")
        ax.set_ylim(peak * 1e-7, peak * 3)  # the outliers are ~1e-5 of the bulk at 0
        ax.legend(loc="upper right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no density measured", ha="center", transform=ax.transAxes)
    ax.set_xlabel(f"eigenvalue λ ({LAMBDA_UNIT})")
    ax.set_ylabel("spectral density (per unit λ, log scale)")
    ax.set_title("Spectral density of the batch Hessian (SLQ)")
    ax.grid(alpha=0.3)


def main(argv: list[str] | None = None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    # Harmless notices on small in-memory data: no worker processes needed, tiny epochs.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    run_dir = args.output_dir
    print(f"Run directory: {run_dir}")

    datamodule = DigitsDataModule(batch_size=next(iter(args.schedule.values())),
                                  dataset=args.dataset, seed=args.seed)
    model = DigitsClassifier(model=args.model, optimizer=args.optimizer, lr=args.lr,
                             momentum=MOMENTUM)
    lr_callback = BatchSizeLRCallback(
        rule=args.rule,
        reference_batch_size=REFERENCE_BATCH_SIZE,  # the batch size the default LRs were tuned for
        monitor_every_n_steps=args.monitor_every,
        monitor=MonitorConfig(
            lambda_min_every=0,  # λ_max only: λ_min costs several times more
            density_every=3,  # a spectral density every third measurement
            density_probes=4,
            density_steps=20,
            # On 8×8 images a measurement costs more than the training steps between two of
            # them, and measuring is the point here: no cap on the measurement overhead.
            max_overhead=None,
        ),
    )
    summary = EpochSummary(lr_callback)

    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator=accelerator(args.device),
        devices=1,
        default_root_dir=run_dir,
        logger=make_loggers(run_dir),  # metrics.csv, spectra/ and tensorboard/ in run_dir
        callbacks=[BatchSizeSchedule(args.schedule), lr_callback, summary],
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        limit_train_batches=4 if args.fast else None,
        limit_val_batches=1 if args.fast else None,
    )
    trainer.fit(model, datamodule=datamodule)

    spectra = load_spectra(run_dir)
    metrics = read_metrics_csv(run_dir / "metrics.csv")
    print_table(summary.rows, spectra)
    figure = run_dir / "demo.png"
    phases = " → ".join(f"{size} (epoch {epoch})" for epoch, size in args.schedule.items())
    title = (f"{args.model.upper()} on {args.dataset}, {OPTIMIZER_NAMES[args.optimizer]}, "
             f"rule={args.rule}; batch size {phases}")
    plot_run(figure, spectra, metrics, title, args.optimizer)
    print(f"\n{len(spectra)} spectrum measurements in {run_dir / 'spectra'}")
    print(f"Figure: {figure}")
    print(f"Run directory: {run_dir}")
    print(f"Elapsed: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

"""Lightning's BatchSizeFinder picks the batch size; BatchSizeLRCallback makes the LR follow.

BatchSizeFinder grows the batch size at the start of ``fit`` (until memory runs out, the data
runs out, or ``--max-trials`` doublings) but leaves the learning rate as configured.
BatchSizeLRCallback records the batch size the LR was tuned for *before* the finder runs and
rescales the LR to the size it finds: linear rule for SGD, square root for Adam. The network is
the digits ``SmallCNN`` of ``models.py`` (151k parameters).

Run it (seconds on a CPU)::

    python examples/batch_size_finder.py
    python examples/batch_size_finder.py --optimizer adam --max-trials 3
    python examples/batch_size_finder.py --fast      # a few steps (smoke test)
"""

from __future__ import annotations

import argparse
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import BatchSizeFinder

from _args import example_parser
from common import (
    REFERENCE_BATCH_SIZE,
    DigitsClassifier,
    DigitsDataModule,
    accelerator,
    default_run_dir,
    make_loggers,
)
from lr_batch_callback import BatchSizeLRCallback


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, fast="1 epoch of 3 steps (smoke test)",
                            output_dir="runs/batch_size_finder-<timestamp>",
                            digits=("dataset", "optimizer"))
    parser.add_argument("--max-trials", type=int, default=4,
                        help="BatchSizeFinder's max_trials: how far it doubles the batch size")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs after the search")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    run_dir = args.output_dir or default_run_dir("batch_size_finder")

    # The LR of DigitsClassifier is tuned for batch size 32: the size configured here.
    datamodule = DigitsDataModule(batch_size=REFERENCE_BATCH_SIZE, dataset=args.dataset,
                                  seed=args.seed)
    model = DigitsClassifier(optimizer=args.optimizer)
    finder = BatchSizeFinder(mode="power", init_val=REFERENCE_BATCH_SIZE,
                             max_trials=args.max_trials, steps_per_trial=2)
    lr_callback = BatchSizeLRCallback(rule="auto", monitor_every_n_steps=None, verbose=False)
    trainer = L.Trainer(
        max_epochs=1 if args.fast else args.epochs,
        limit_train_batches=3 if args.fast else 1.0,
        accelerator=accelerator(args.device),
        devices=1,
        default_root_dir=run_dir,
        logger=make_loggers(run_dir),
        callbacks=[finder, lr_callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule)

    reference, found = lr_callback.reference_batch_size, finder.optimal_batch_size
    factor = lr_callback.factors[0]
    rule = lr_callback.rule_names[0]  # what "auto" chose
    print(f"\nBatchSizeFinder found batch size {found} (configured: {reference}).")
    print(f"Learning rate ({args.optimizer}, {rule} rule): "
          f"{model.lr:g} at batch size {reference} → factor {factor:g} → "
          f"{model.lr * factor:g} at batch size {found}")
    print(f"Test accuracy: {float(trainer.callback_metrics['val_acc']):.1%}")
    print(f"Metrics (lr_batch/*): {run_dir / 'metrics.csv'}")


if __name__ == "__main__":
    main()

"""Plain PyTorch, no Lightning: ``LRScaler`` across batch-size changes, ``hessian_eigenvalues``
for the largest stable learning rate.

The 151k-parameter ``SmallCNN`` of ``models.py`` (or ``DigitsMLP``) is trained on the digits in
phases of growing batch size (32 → 128 → 512 by default). At each change ``scaling_factor``
gives the LR factor (linear rule for SGD) and ``LRScaler`` applies it at step time:
``optimizer.param_groups[i]["lr"]`` keeps the reference value (so schedulers and checkpoints are
untouched) while every step uses ``lr × factor``.

After each phase the top eigenvalue λ_max of the Hessian on a training batch gives the largest
learning rate heavy-ball SGD is stable with on the local quadratic, ``2(1+μ)/λ_max`` (μ the
momentum); the table compares it with the learning rate used.

Run it (seconds on a CPU)::

    python examples/plain_pytorch.py
    python examples/plain_pytorch.py --batch-sizes 32,64,128,256,512 --model mlp
    python examples/plain_pytorch.py --fast     # a few steps per phase
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from _args import example_parser
from common import REFERENCE_BATCH_SIZE, DigitsDataModule
from lr_batch_callback import LRScaler, hessian_eigenvalues, scaling_factor
from models import digits_model


def loss_fn(model: nn.Module, batch: Any) -> Tensor:
    """The loss whose Hessian is measured: mean cross-entropy of the batch."""
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    model.train()
    return correct / len(loader.dataset)  # type: ignore[arg-type]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, fast="5 steps per phase (smoke test)", device=False,
                            digits=("dataset", "model"))
    parser.add_argument("--batch-sizes", default="32,128,512", help="one training phase each")
    parser.add_argument("--epochs-per-phase", type=int, default=2, help="epochs per batch size")
    parser.add_argument("--lr", type=float, default=0.01,
                        help=f"SGD learning rate at batch size {REFERENCE_BATCH_SIZE}")
    parser.add_argument("--momentum", type=float, default=0.9, help="heavy-ball momentum μ")
    parser.add_argument("--rule", choices=("linear", "sqrt", "none"), default="linear",
                        help="LR scaling rule for a batch-size change")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    max_steps = 5 if args.fast else None

    data = DigitsDataModule(dataset=args.dataset, seed=args.seed)
    data.setup("fit")  # a LightningDataModule is plain Python: used here for its loaders only
    test_loader = data.test_dataloader()

    model = digits_model(args.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    scaler = LRScaler(optimizer)  # factor 1 until the batch size changes

    print(f"{'batch':>5}  {'factor':>6}  {'LR used':>8}  {'λ_max':>8}  {'2(1+μ)/λ_max':>12}  "
          f"{'LR / limit':>10}  {'test acc':>8}")
    for batch_size in batch_sizes:
        factor = scaling_factor(args.rule, REFERENCE_BATCH_SIZE, batch_size)
        scaler.set_factor(factor)  # takes effect at the next optimizer.step()
        data.batch_size = batch_size
        loader = data.train_dataloader()  # shuffled batches of the new size
        steps = 0
        for _ in range(1 if args.fast else args.epochs_per_phase):
            for batch in loader:
                optimizer.zero_grad()
                loss_fn(model, batch).backward()
                optimizer.step()  # uses lr × factor; param_groups keep lr
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break

        # Curvature of the loss on one training batch of the current size. The model is left
        # exactly as it was (mode, RNG, .grad), so training could go on right after.
        result = hessian_eigenvalues(model, loss_fn, next(iter(loader)), k=1, seed=0)
        lambda_max = float(result.eigenvalues[0])
        lr_used = scaler.effective_lrs()[0]
        limit = 2 * (1 + args.momentum) / lambda_max
        print(f"{batch_size:>5}  {factor:>6.3g}  {lr_used:>8.4g}  {lambda_max:>8.2f}  "
              f"{limit:>12.4g}  {lr_used / limit:>10.2f}  {accuracy(model, test_loader):>8.1%}")

    print(f"\noptimizer.param_groups[0]['lr'] = {optimizer.param_groups[0]['lr']:g} "
          f"(reference units); the last steps used {scaler.effective_lrs()[0]:g}.")
    scaler.remove()  # detach the step hooks


if __name__ == "__main__":
    main()

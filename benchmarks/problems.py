"""The benchmark problems: one model, one batch and one set of weights, shared by every method.

Models (all float32):

- ``digits_cnn``: conv 1→32→64 (3×3) + max-pool + fc 1024→128→10 on scikit-learn's 8×8 digits,
  batch 256, briefly pre-trained with SGD so that the spectrum is that of a network in training.
- ``resnet18``: torchvision's ResNet-18 in its CIFAR form (3×3 stem, no max-pool, 11.2M
  parameters) on random 32×32 inputs; BatchNorm statistics calibrated by a few forward passes.
- ``mlp``: 512→256→256→10 ReLU MLP on random inputs with random labels.

Every estimate runs with the model in ``eval()`` mode: PyHessian forces ``eval()`` and curvlinops
rejects BatchNorm in train mode, so this is the only mode in which all methods see the same
operator. The digits CNN and the MLP have no BatchNorm or dropout, so for them the mode does not
change the Hessian.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

MODELS = ("digits_cnn", "resnet18", "mlp")


@dataclass
class Problem:
    """A model at fixed weights, one batch, and the loss every method differentiates."""

    name: str
    description: str
    model: nn.Module
    batch: tuple[Tensor, Tensor]
    criterion: nn.Module
    device: torch.device

    @property
    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def batch_size(self) -> int:
        return int(self.batch[0].shape[0])

    def loss_fn(self, model: nn.Module, batch: Any) -> Tensor:
        """``loss_fn(model, batch)`` in the form lr_batch_callback and hessian-eigenthings take."""
        x, y = batch
        return self.criterion(model(x), y)

    def gradient_step(self) -> None:
        """One forward and backward pass (what a product is compared with), no optimizer step."""
        torch.autograd.grad(self.loss_fn(self.model, self.batch), self.params)

    def clear_grads(self) -> None:
        for p in self.model.parameters():
            p.grad = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall time of ``fn()`` in seconds (device work included) and its result."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def _digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return x, y


def _pretrain(model: nn.Module, x: Tensor, y: Tensor, steps: int, batch_size: int,
              generator: torch.Generator) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x[idx]), y[idx]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_problem(name: str, device: torch.device, *, batch_size: int | None = None,
                  pretrain_steps: int = 300, seed: int = 0,
                  state_dict: dict[str, Tensor] | None = None) -> Problem:
    """The problem ``name`` on ``device``: model, fixed weights and batch, all from ``seed``.

    The batch does not depend on ``pretrain_steps``; passing ``state_dict`` (weights saved from an
    earlier build) skips pre-training and reproduces that build exactly.
    """
    data_gen = torch.Generator().manual_seed(seed)
    train_gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    steps = 0 if state_dict is not None else pretrain_steps
    if name == "digits_cnn":
        model = _digits_cnn()
        x_all, y_all = _digits()
        b = batch_size or 256
        idx = torch.randperm(x_all.shape[0], generator=data_gen)[:b]
        x, y = x_all[idx], y_all[idx]
        _pretrain(model, x_all, y_all, steps, 64, train_gen)
        desc = f"CNN conv 1→32→64 + fc, digits 8×8, {pretrain_steps} SGD steps"
    elif name == "mlp":
        model = _mlp()
        b = batch_size or 256
        x_all = torch.randn(2048, 512, generator=data_gen)
        y_all = torch.randint(0, 10, (2048,), generator=data_gen)
        x, y = x_all[:b], y_all[:b]
        _pretrain(model, x_all, y_all, min(steps, 100), 64, train_gen)
        desc = f"MLP 512→256→256→10 ReLU, random inputs/labels, {min(pretrain_steps, 100)} SGD steps"
    elif name == "resnet18":
        model = _resnet18()
        b = batch_size or 128
        x = torch.randn(b, 3, 32, 32, generator=data_gen)
        y = torch.randint(0, 10, (b,), generator=data_gen)
        if steps:
            model.train()
            with torch.no_grad():  # calibrate BatchNorm running statistics for eval mode
                for _ in range(5):
                    model(torch.randn(64, 3, 32, 32, generator=train_gen))
        desc = "ResNet-18 (CIFAR stem), random 32×32 inputs, BN calibrated, eval mode"
    else:
        raise ValueError(f"Unknown model {name!r}; choose from {MODELS}.")
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model = model.to(device=device, dtype=torch.float32).eval()
    return Problem(name=name, description=desc, model=model,
                   batch=(x.to(device), y.to(device)), criterion=nn.CrossEntropyLoss(),
                   device=device)

"""The benchmark problems: a model at training-time weights, its data, its optimizer and its loss.

- ``digits_cnn``: the demo's network, ``SmallCNN`` of ``examples/models.py`` (151,306
  parameters), on scikit-learn's 8×8 digits normalised as the demo's ``DigitsDataModule`` does
  (the same train split and statistics), batch 32, SGD lr 0.01 with momentum 0.9, after
  ``pretrain_steps`` steps of that optimizer.
- ``resnet18``: torchvision's ``resnet18(weights=None, num_classes=10)`` (11,181,642 parameters)
  on random 3×32×32 inputs with random labels, batch 16, the same optimizer, freshly initialised.
- ``gpt``: the GPT-like transformer of :mod:`benchmarks.gpt` (2 pre-LN blocks, d = 64, causal
  SDPA, GELU, tied head; 118,528 parameters) on next-byte prediction over the standard
  library's source, batch 16 × 32 tokens, AdamW lr 1e-3, after ``pretrain_steps`` steps.
- ``gpt_long``: the same model with 2,048-token context, batch 2, freshly initialised (the
  long-sequence case of the peak-memory figures).

Both stay in train mode, as in training (the ResNet's BatchNorm uses batch statistics; the CNN has
neither BatchNorm nor dropout, so its mode changes nothing and the peers, which force ``eval()``
or reject BatchNorm in train mode, see the same operator). Everything is float32 on the CPU.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
MODELS = ("digits_cnn", "resnet18")
TRANSFORMERS = ("gpt", "gpt_long")
LR, MOMENTUM = 0.01, 0.9


def _examples() -> tuple[Any, Any]:
    """``examples/models.py`` and ``examples/common.py`` (the demo's network and data)."""
    folder = str(REPO / "examples")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import common
    import models

    return models, common


@dataclass
class Problem:
    """A model, its optimizer, a stream of training batches and the batch being looked at."""

    name: str
    description: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[tuple[Tensor, Tensor]]
    batch: tuple[Tensor, Tensor]
    criterion: Callable[[Tensor, Tensor], Tensor]

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
        """``loss_fn(model, batch)``, the form lr_batch_callback and hessian-eigenthings take."""
        x, y = batch
        return self.criterion(model(x), y)

    def train_step(self) -> None:
        """One plain training step on the next batch (forward, backward, optimizer step); the
        batch stepped on becomes :attr:`batch`, as the monitor measures on the batch just used."""
        self.batch = next(self.batches)
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn(self.model, self.batch).backward()
        self.optimizer.step()

    def clear_grads(self) -> None:
        """Drop ``.grad`` (PyHessian leaves a differentiable gradient graph there) and return to
        train mode (PyHessian calls ``model.eval()`` and never undoes it)."""
        for p in self.model.parameters():
            p.grad = None
        self.model.train()


def _stream(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator
            ) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled epochs of ``(x, y)`` without end, as a DataLoader with ``shuffle=True``."""
    while True:
        order = torch.randperm(x.shape[0], generator=generator)
        for i in range(0, x.shape[0] - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]


def _random_stream(batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        yield (torch.randn(batch_size, 3, 32, 32, generator=generator),
               torch.randint(0, 10, (batch_size,), generator=generator))


def digits_train_tensors(seed: int = 0) -> tuple[Tensor, Tensor]:
    """The demo's training split, normalised with its statistics (``DigitsDataModule``)."""
    _, common = _examples()
    data = common.DigitsDataModule(batch_size=32, seed=seed)
    data.setup("fit")
    assert data.train_set is not None
    x, y = data.train_set.tensors
    return x, y


def build_problem(name: str, *, batch_size: int | None = None, pretrain_steps: int = 300,
                  seed: int = 0, state_dict: dict[str, Tensor] | None = None) -> Problem:
    """The problem ``name``, all of it drawn from ``seed``.

    Passing ``state_dict`` (weights saved from an earlier build) skips pre-training; the batch
    stream does not depend on the pre-training, so a rebuild sees the same first batch.
    """
    torch.manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed)
    if name == "digits_cnn":
        models, _ = _examples()
        model: nn.Module = models.SmallCNN()
        x, y = digits_train_tensors(seed)
        b = batch_size or 32
        batches = _stream(x, y, b, data_gen)
        pretrain = _stream(x, y, b, torch.Generator().manual_seed(seed + 1))
        desc = f"SmallCNN (examples/models.py), digits 8×8, batch {b}"
    elif name == "resnet18":
        from torchvision.models import resnet18

        model = resnet18(weights=None, num_classes=10)
        b = batch_size or 16
        batches = _random_stream(b, data_gen)
        pretrain = _random_stream(b, torch.Generator().manual_seed(seed + 1))
        pretrain_steps = 0
        desc = f"torchvision resnet18(weights=None, num_classes=10), random 3×32×32, batch {b}"
    elif name in TRANSFORMERS:
        from benchmarks import gpt

        context = 32 if name == "gpt" else 2048
        b = batch_size or (16 if name == "gpt" else 2)
        model = gpt.GPT(context=context)
        data = gpt.corpus()
        batches = gpt.windows(data, b, context, data_gen)
        pretrain = gpt.windows(data, b, context, torch.Generator().manual_seed(seed + 1))
        pretrain_steps = pretrain_steps if name == "gpt" else 0
        desc = f"GPT-like (benchmarks/gpt.py), bytes of the stdlib, batch {b} × {context} tokens"
    else:
        raise ValueError(f"Unknown model {name!r}; choose from {MODELS + TRANSFORMERS}.")
    model.train()
    optimizer: torch.optim.Optimizer
    criterion: Callable[[Tensor, Tensor], Tensor]
    if name in TRANSFORMERS:
        from benchmarks.gpt import lm_loss

        optimizer, criterion = torch.optim.AdamW(model.parameters(), lr=1e-3), lm_loss
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        criterion = nn.CrossEntropyLoss()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    else:
        for _ in range(pretrain_steps):
            xb, yb = next(pretrain)
            optimizer.zero_grad(set_to_none=True)
            criterion(model(xb), yb).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if pretrain_steps and state_dict is None:
        desc += f", after {pretrain_steps} {type(optimizer).__name__} steps"
    problem = Problem(name=name, description=desc, model=model, optimizer=optimizer,
                      batches=batches, batch=next(batches), criterion=criterion)
    return problem


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of ``fn()`` in seconds, and its result."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out

"""Small models and batches shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp_tanh() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


class SmallBNCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 10)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def frozen_mlp() -> nn.Module:
    model = mlp_tanh()
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


def classification_batch(model_name: str, n: int = 24, seed: int = 0,
                         dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 6, 6) if model_name == "cnn_bn" else (n, 5)
    return torch.randn(*shape, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


MODELS = {"mlp_tanh": mlp_tanh, "cnn_bn": SmallBNCNN, "dropout": DropoutMLP, "frozen": frozen_mlp}


def make(model_name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[model_name]().to(dtype).train()


def ce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])

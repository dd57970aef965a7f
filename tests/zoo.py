"""A model zoo of what people train, in tiny float64 configurations with dense references.

Each entry builds a model, a batch, its loss, the parameters whose curvature is compared (all of
them when small; a subset chosen to make the gradient flow through the whole network when the
model is big, e.g. ResNet-18's first BatchNorm) and the pieces of the GGN reference: the function
that runs the model to the output the loss consumes, and the loss of that output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

DTYPE = torch.float64


@dataclass
class Case:
    name: str
    model: nn.Module
    batch: Any
    loss_fn: Callable[[nn.Module, Any], Tensor]
    output_fn: Callable[[nn.Module, Any], Tensor]  # model -> the output f the loss consumes
    loss_of_output: Callable[[Tensor], Tensor]  # f -> loss (the same loss as loss_fn)
    params: list[Tensor] | None = None  # None: every trainable parameter
    ggn_output: Any = None

    @property
    def chosen(self) -> list[Tensor]:
        return self.params if self.params is not None else [
            p for p in self.model.parameters() if p.requires_grad]

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.chosen)


def _classification(model: nn.Module, x: Tensor, classes: int, name: str,
                    params: list[Tensor] | None = None) -> Case:
    y = torch.arange(x.shape[0]) % classes
    return Case(name, model, (x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                lambda m, b: m(b[0]), lambda f: F.cross_entropy(f, y), params)


def resnet18() -> Case:
    from torchvision.models import resnet18 as build

    torch.manual_seed(0)
    model = build(num_classes=3).to(DTYPE).train()
    x = torch.randn(4, 3, 32, 32, dtype=DTYPE)
    # The first BatchNorm: its curvature runs through every layer, BatchNorm in train mode.
    return _classification(model, x, 3, "resnet18", params=list(model.bn1.parameters()))


def mobilenet_v3_small() -> Case:
    from torchvision.models import mobilenet_v3_small as build

    torch.manual_seed(0)
    model = build(num_classes=3).to(DTYPE).train()
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    # The stem's BatchNorm (before every Hardswish and every squeeze-excitation Hardsigmoid).
    return _classification(model, x, 3, "mobilenet_v3_small",
                           params=list(model.features[0][1].parameters()))


def vision_transformer() -> Case:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2,
                              hidden_dim=8, mlp_dim=16, num_classes=3).to(DTYPE).train()
    x = torch.randn(3, 3, 8, 8, dtype=DTYPE)
    return _classification(model, x, 3, "vit")  # head zero-initialised: repeated eigenvalues


class CausalEncoder(nn.Module):
    """nn.TransformerEncoder with a causal mask and a regression head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.head(self.encoder(x, mask=mask, is_causal=True))


def transformer_encoder() -> Case:
    torch.manual_seed(0)
    model = CausalEncoder().to(DTYPE).train()
    x = torch.randn(3, 5, 8, dtype=DTYPE)
    y = torch.randn(3, 5, 1, dtype=DTYPE)
    return Case("transformer_encoder", model, (x, y), lambda m, b: F.mse_loss(m(b[0]), b[1]),
                lambda m, b: m(b[0]), lambda f: F.mse_loss(f, y))


class TinyGPT(nn.Module):
    """Token and position embeddings, one pre-LN block (causal SDPA, GELU MLP), tied head."""

    def __init__(self, vocab: int = 11, dim: int = 8, context: int = 6) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(context, dim)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(2 * dim, dim))
        self.heads = 2

    def forward(self, idx: Tensor) -> Tensor:
        b, t = idx.shape
        h = self.tokens(idx) + self.positions(torch.arange(t))
        q, k, v = self.qkv(self.ln1(h)).split(h.shape[-1], dim=-1)
        shape = (b, t, self.heads, -1)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        h = h + self.mlp(self.ln2(h))
        return self.ln_f(h) @ self.tokens.weight.T  # tied output head


def gpt() -> Case:
    torch.manual_seed(0)
    model = TinyGPT().to(DTYPE).train()
    idx = torch.randint(0, 11, (3, 6))
    x, y = idx[:, :-1], idx[:, 1:]

    def loss_of(f: Tensor) -> Tensor:
        return F.cross_entropy(f.reshape(-1, f.shape[-1]), y.reshape(-1))

    return Case("gpt", model, (x, y), lambda m, b: loss_of(m(b[0])), lambda m, b: m(b[0]), loss_of)


class RecurrentRegressor(nn.Module):
    def __init__(self, cell: type[nn.Module], packed: bool = False) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)
        self.packed = packed

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, lengths = batch
        if self.packed:
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, state = self.rnn(packed)
            h = state[0] if isinstance(state, tuple) else state
            return self.head(h[-1])
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _recurrent(name: str, cell: type[nn.Module], packed: bool = False) -> Case:
    torch.manual_seed(0)
    model = RecurrentRegressor(cell, packed).to(DTYPE).train()
    x = torch.randn(3, 5, 3, dtype=DTYPE)
    lengths = torch.tensor([5, 3, 2])
    y = torch.randn(3, 2, dtype=DTYPE)
    return Case(name, model, ((x, lengths), y), lambda m, b: F.mse_loss(m(b[0]), b[1]),
                lambda m, b: m(b[0]), lambda f: F.mse_loss(f, y))


def lstm() -> Case:
    return _recurrent("lstm", nn.LSTM)


def gru() -> Case:
    return _recurrent("gru", nn.GRU)


def packed_lstm() -> Case:
    return _recurrent("packed_lstm", nn.LSTM, packed=True)


def groupnorm_silu_cnn() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4),
        nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).to(DTYPE).train()
    return _classification(model, torch.randn(4, 1, 7, 7, dtype=DTYPE), 3, "groupnorm_silu_cnn")


def weight_norm_mlp() -> Case:
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    return _classification(model, torch.randn(6, 4, dtype=DTYPE), 3, "weight_norm")


def spectral_norm_mlp() -> Case:
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    return _classification(model, torch.randn(6, 4, dtype=DTYPE), 3, "spectral_norm")


class LogitsAndFeatures(nn.Module):
    """Returns ``(logits, features)``: features is an ancestor of logits (distillation style)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return self.head(features), features


def logits_and_features() -> Case:
    torch.manual_seed(0)
    model = LogitsAndFeatures().to(DTYPE).train()
    x = torch.randn(6, 4, dtype=DTYPE)
    y = torch.arange(6) % 3
    return Case("logits_and_features", model, (x, y),
                lambda m, b: F.cross_entropy(m(b[0])[0], b[1]), lambda m, b: m(b[0])[0],
                lambda f: F.cross_entropy(f, y), ggn_output=0)


def sparse_embedding() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2)).to(DTYPE)
    x = torch.randint(0, 7, (5, 2))
    return _classification(model, x, 2, "sparse_embedding")


ZOO: dict[str, Callable[[], Case]] = {
    f.__name__: f for f in (resnet18, mobilenet_v3_small, vision_transformer, transformer_encoder,
                            gpt, lstm, gru, packed_lstm, groupnorm_silu_cnn, weight_norm_mlp,
                            spectral_norm_mlp, logits_and_features, sparse_embedding)
}

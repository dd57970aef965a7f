"""A small GPT-like transformer and a byte corpus every machine has, for the large-model figures.

The model is the one issue 20 measured a default measurement on: token and position
embeddings, ``layers`` pre-LayerNorm blocks with causal fused attention
(``F.scaled_dot_product_attention``) and a GELU MLP, a tied output head; trained with AdamW on
next-byte prediction. The corpus is the Python standard library's own source (``inspect``,
``textwrap``, ``dataclasses``, ...) read as bytes: present wherever Python is, no download.
"""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 256  # bytes


class Block(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + MLP(LN(x)), causal SDPA, GELU."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Byte-level GPT: embeddings, ``layers`` pre-LN blocks, final LayerNorm, tied head."""

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, context: int = 32) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, dim)
        self.positions = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.tokens(idx) + self.positions(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h) @ self.tokens.weight.T


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def corpus() -> Tensor:
    """Bytes of a few standard-library modules' source (identical for one Python version)."""
    text = "\n".join(inspect.getsource(m) for m in (inspect, textwrap, dataclasses))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def windows(data: Tensor, batch_size: int, context: int, generator: torch.Generator
            ) -> Iterator[tuple[Tensor, Tensor]]:
    """Random windows of ``context + 1`` bytes without end: (inputs, next-byte targets)."""
    while True:
        start = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=generator)
        chunk = torch.stack([data[s : s + context + 1] for s in start.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]

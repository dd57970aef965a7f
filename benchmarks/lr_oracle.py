"""LR-oracle benchmark: which batch-size rule puts the learning rate where a grid search does?

Usage::

    python benchmarks/lr_oracle.py                      # full run (one core, about an hour)
    python benchmarks/lr_oracle.py --quick --out /tmp/q  # smoke test (seconds, used by the tests)
    python benchmarks/lr_oracle.py --tasks digits_cnn --seeds 0,1,2
    python benchmarks/lr_oracle.py --markdown-only benchmarks/results/lr_oracle.json

What it measures, per task × optimizer × protocol × batch size B:

* **Oracle.** The learning rate is searched on a lattice of √2 steps, LR_k = anchor · 2^(k/2),
  widened until the best LR is not at either edge and the largest LR fails. Every LR is trained
  with several seeds (the full run: 3); all LRs of one seed share the initialisation and the data
  order (common random numbers), so that differences between LRs are not sampling noise. The
  final loss is the training objective on the whole training set (BatchNorm on the statistics of
  that whole set, so no running-statistics lag), at the end of the budget. ``LR*`` is the
  lattice point with the lowest mean final loss, refined by a parabola through it and its two
  neighbours in log LR (a shift of at most half a step). The **band** is the contiguous set of
  lattice LRs whose mean final loss is within 2 standard errors (√(se_best² + se²)) of the best
  one and where no seed failed, widened by half a step on each side. A run **fails (diverges)**
  if its batch loss becomes non-finite or exceeds 20 × max(L0, L_fail) (L0: the initial loss), or
  if its final loss is non-finite or above L_fail, the loss of the best constant predictor (label
  entropy for cross-entropy, label variance for MSE): it ended no better than predicting a
  constant. A failed seed counts as L_fail in the means. The **largest non-diverging LR** is the
  top of the contiguous run of non-failing lattice points above LR*.
* **Budgets** (both read from the same runs, constant LR, no schedule): *fixed-step* — S optimizer
  steps at every B; *fixed-epoch* — the samples of S steps at B0, i.e. S·B0/B steps at B (the
  same number of epochs; for the online teacher task, the same number of fresh samples).
* **Protocols**: (a) *from scratch* at each B; (b) *switch* — the callback's real use: train S steps
  at the reference batch B0 with LR*_a(B0) (the lattice optimum of (a) at B0), then change to B
  (optimizer state kept) and continue for the budget. A rule's LR is base × factor(B0 → B): in (a)
  the base is the refined LR*_a(B0) (the run at B0 is the same for both budgets), so errors are
  pure scaling errors; in (b) the base is the LR actually used before the switch, LR*_a(B0) on
  the lattice, which is what the callback multiplies. The oracle of (b) at B0 (continuing at B0)
  is reported but not scored: every rule gives factor 1 there. All measurements a rule uses are
  taken at the switch point (the state after the S steps at B0), per seed; a rule's factor is the
  geometric mean of its per-seed factors.
* **Scores** per rule over the cells B ≠ B0: mean |log2(LR_rule/LR*)|, the fraction of cells whose
  rule LR is in the band, the number of cells where the rule LR is past the largest non-diverging
  LR (half a step beyond it), and the mean loss gap (mean final loss at the rule LR, interpolated
  linearly in log LR on the lattice, minus the best mean; L_fail − best for a divergence).

Rules (each a small pure function of measured quantities; ``adaptive`` = Adam):

* ``linear`` B/B0, ``sqrt`` √(B/B0), ``none`` 1 (``lr_batch_callback.scaling_factor``).
* ``curvature`` — the library's ``rule="curvature"`` exactly as the callback does it:
  ``estimate_batch_size_law`` on the last 512 training samples (draws=3, dataset_size=N,
  tol=1e-3, max_iter=50), used only if ``r_squared_of_means`` ≥ 0.5, factor
  ``law.lr_factor(B0, B, adaptive)``; otherwise linear (SGD) / √ (Adam).
* ``direct`` — λ_max (Lanczos, ``hessian_eigenvalues``) measured on random batches of size B and
  B0: λ(B0)/λ(B), √ of it for Adam.
* ``direct_precond`` (Adam) — the same ratio of the preconditioned sharpness λ_max(P⁻¹H_B),
  P = diag(√v̂)+ε from the optimizer state (Cohen et al. 2022), not square-rooted.
* ``law_edge`` — λ(B) = a + c·x + d·√x, x = 1/B − 1/N (outlier term plus a noise-edge term
  ∝ √x, Granziol et al.), fitted to the per-size means of the curvature law's observations.
* ``noise`` (SGD) — McCandlish et al. 2018: (1 + B_noise/B0)/(1 + B_noise/B), B_noise = B_simple
  = tr Σ / |G|², from gradient norms at two batch sizes (micro-batches of min(B) and the 512 pool).
* ``noise_hess`` (SGD) / ``noise_hess_sqrt`` (Adam) — the same factor (its √ for Adam) with
  McCandlish's Hessian-weighted B_noise = tr(HΣ)/(GᵀHG) (gᵀHg of micro-batch and pool gradients,
  H the pool's Hessian): curvature information inside the noise scale.
* ``surge`` (Adam) — Li et al. 2024 (arXiv 2405.14578): ε_opt(B) = ε_max /
  (½(√(B_noise/B) + √(B/B_noise))), so the factor is
  (√(Bn/B0) + √(B0/Bn)) / (√(Bn/B) + √(B/Bn)), with Bn = McCandlish's B_simple (their B_noise is
  defined from the same gradient mean and variance; using B_simple for it is our approximation).
* ``noise_sqrt`` (Adam) — √ of the McCandlish factor: √ rule below B_noise, saturating above.
* ``guard`` — the fixed rule capped at the stability threshold at B: SGD
  min(B/B0, 2(1+μ)/(LR0·λ(B))); Adam min(√(B/B0), 38/(LR0·λ_max(P⁻¹H_B))), 38 = (2+2β1)/(1−β1).
* ``noise_guard`` (SGD) — suggested by the first full run and scored on its stored measurements
  (``--rescore``, no new training): the ``noise`` factor with the same stability cap,
  min((1 + B_simple/B0)/(1 + B_simple/B), 2(1+μ)/(LR0·λ(B))).

Everything runs in float32 on the CPU with one thread (``--threads``). Small models are trained
as *ensembles*: all LRs × seeds of one batch size are one model whose parameters carry a leading
model dimension (grouped convolutions, batched matmuls), which is exact (no parameter is shared)
and an order of magnitude faster than one model at a time for these sizes.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("lr_batch_callback") is None:  # not installed: use this checkout
    sys.path.insert(0, str(REPO))

from lr_batch_callback import (  # noqa: E402
    BatchSizeLaw,
    estimate_batch_size_law,
    hessian_eigenvalues,
    scaling_factor,
)

MOMENTUM = 0.9
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
SGD_THRESHOLD = 2.0 * (1.0 + MOMENTUM)  # heavy-ball stability: lr·λ < 2(1+μ)
ADAM_THRESHOLD = (2.0 + 2.0 * BETAS[0]) / (1.0 - BETAS[0])  # Cohen et al. 2022: 38 for β1=0.9
KILL_FACTOR = 20.0  # a batch loss above KILL_FACTOR·max(L0, L_fail) ends the run (diverged)
BAND_SE = 2.0

RULES = {
    "sgd": ["linear", "sqrt", "none", "curvature", "direct", "law_edge", "noise", "noise_hess",
            "guard", "noise_guard"],
    "adam": ["sqrt", "linear", "none", "curvature", "direct", "direct_precond", "law_edge",
             "surge", "noise_sqrt", "noise_hess_sqrt", "guard"],
}
FIXED = {"sgd": "linear", "adam": "sqrt"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# =================================================================================================
# Ensembles of small networks: M independent copies evaluated together
# =================================================================================================
def _uniform(fan_in: int) -> Callable[[torch.Generator, tuple[int, ...]], Tensor]:
    bound = 1.0 / math.sqrt(fan_in)
    return lambda g, shape: (torch.rand(shape, generator=g) * 2 - 1) * bound


def _normal(std: float) -> Callable[[torch.Generator, tuple[int, ...]], Tensor]:
    return lambda g, shape: torch.randn(shape, generator=g) * std


def _const(value: float) -> Callable[[torch.Generator, tuple[int, ...]], Tensor]:
    return lambda g, shape: torch.full(shape, value)


class Ensemble(nn.Module):
    """M copies of one network; every parameter and buffer has a leading dimension of size M.

    Copy i is initialised from ``torch.Generator().manual_seed(seeds[i])`` alone, so a copy's
    initial weights do not depend on M or on the other copies. ``use_batch_stats_only`` makes
    BatchNorm normalise with the batch statistics without updating its running buffers (the
    full-training-set objective and the curvature measurements use it).
    """

    def __init__(self, seeds: Sequence[int], **cfg: Any) -> None:
        super().__init__()
        self.M = len(seeds)
        self.cfg = cfg
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        for name, shape, init in self.spec(**cfg):
            data = torch.stack([init(g, shape) for g in gens])
            self.register_parameter(name, nn.Parameter(data))
        for name, shape, value in self.buffer_spec(**cfg):
            self.register_buffer(name, torch.full((self.M, *shape), value))
        self.use_batch_stats_only = False

    def spec(self, **cfg: Any) -> list[tuple[str, tuple[int, ...], Callable]]:
        raise NotImplementedError

    def buffer_spec(self, **cfg: Any) -> list[tuple[str, tuple[int, ...], float]]:
        return []

    def _bn(self, h: Tensor, name: str) -> Tensor:
        """BatchNorm over (batch, spatial) of a (B, M·C, H, W) tensor: per model and channel."""
        mean, var = getattr(self, f"{name}_rm"), getattr(self, f"{name}_rv")
        batch_stats = self.training or self.use_batch_stats_only
        track = self.training and not self.use_batch_stats_only
        return F.batch_norm(
            h, mean.view(-1) if track or not batch_stats else None,
            var.view(-1) if track or not batch_stats else None,
            getattr(self, f"{name}_w").reshape(-1), getattr(self, f"{name}_b").reshape(-1),
            batch_stats, 0.1, 1e-5,
        )


class DigitsCNN(Ensemble):
    """conv3×3(1→c1)+BN+ReLU+pool → conv3×3(c1→c2)+BN+ReLU+pool → fc(4·c2→h)+ReLU → fc(h→10)."""

    def spec(self, c1: int = 8, c2: int = 16, hidden: int = 32):
        return [
            ("conv1", (c1, 1, 3, 3), _uniform(9)),
            ("bn1_w", (c1,), _const(1.0)), ("bn1_b", (c1,), _const(0.0)),
            ("conv2", (c2, c1, 3, 3), _uniform(9 * c1)),
            ("bn2_w", (c2,), _const(1.0)), ("bn2_b", (c2,), _const(0.0)),
            ("fc1", (4 * c2, hidden), _uniform(4 * c2)), ("fc1_b", (1, hidden), _uniform(4 * c2)),
            ("fc2", (hidden, 10), _uniform(hidden)), ("fc2_b", (1, 10), _uniform(hidden)),
        ]

    def buffer_spec(self, c1: int = 8, c2: int = 16, hidden: int = 32):
        return [("bn1_rm", (c1,), 0.0), ("bn1_rv", (c1,), 1.0),
                ("bn2_rm", (c2,), 0.0), ("bn2_rv", (c2,), 1.0)]

    def forward(self, x: Tensor) -> Tensor:  # (M, B, 1, 8, 8) -> (M, B, 10)
        M, B = x.shape[:2]
        c1, c2 = self.conv1.shape[1], self.conv2.shape[1]
        h = x.permute(1, 0, 2, 3, 4).reshape(B, M, 8, 8)
        h = F.conv2d(h, self.conv1.reshape(M * c1, 1, 3, 3), padding=1, groups=M)
        h = F.max_pool2d(F.relu(self._bn(h, "bn1")), 2)
        h = F.conv2d(h, self.conv2.reshape(M * c2, c1, 3, 3), padding=1, groups=M)
        h = F.max_pool2d(F.relu(self._bn(h, "bn2")), 2)  # (B, M·c2, 2, 2)
        h = h.reshape(B, M, 4 * c2).transpose(0, 1)
        h = F.relu(torch.baddbmm(self.fc1_b, h, self.fc1))
        return torch.baddbmm(self.fc2_b, h, self.fc2)


class TinyLM(Ensemble):
    """Decoder-only transformer: token+position embedding, ``layers`` pre-LN blocks (causal
    multi-head attention written out — no fused kernel, so double backward is exact — and a GELU
    MLP), final LayerNorm, output head tied to the token embedding."""

    def spec(self, vocab: int = 8, context: int = 16, d: int = 32, layers: int = 2, heads: int = 2,
             mlp: int = 2):
        # small embeddings: the tied head starts near the uniform prediction (loss ≈ log V)
        out = [("emb", (vocab, d), _normal(0.05)), ("pos", (context, d), _normal(0.05))]
        for i in range(layers):
            out += [
                (f"ln{i}a_w", (d,), _const(1.0)), (f"ln{i}a_b", (d,), _const(0.0)),
                (f"qkv{i}", (d, 3 * d), _normal(1 / math.sqrt(d))),
                (f"proj{i}", (d, d), _normal(1 / math.sqrt(d) / math.sqrt(2 * layers))),
                (f"ln{i}m_w", (d,), _const(1.0)), (f"ln{i}m_b", (d,), _const(0.0)),
                (f"fc{i}", (d, mlp * d), _normal(1 / math.sqrt(d))),
                (f"out{i}", (mlp * d, d), _normal(1 / math.sqrt(mlp * d) / math.sqrt(2 * layers))),
            ]
        return out + [("lnf_w", (d,), _const(1.0)), ("lnf_b", (d,), _const(0.0))]

    @staticmethod
    def _ln(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        # w, b: (M, d) -> broadcast over (M, B, T, d)
        return F.layer_norm(x, x.shape[-1:]) * w[:, None, None] + b[:, None, None]

    def forward(self, tok: Tensor) -> Tensor:  # (M, B, T) int64 -> (M, B, T, V)
        M, B, T = tok.shape
        d = self.emb.shape[-1]
        heads, layers = self.cfg.get("heads", 2), self.cfg.get("layers", 2)
        hd = d // heads
        x = torch.gather(self.emb, 1, tok.reshape(M, B * T, 1).expand(M, B * T, d))
        x = x.reshape(M, B, T, d) + self.pos[:, None, :T]
        mask = torch.full((T, T), float("-inf")).triu(1)
        for i in range(layers):
            h = self._ln(x, getattr(self, f"ln{i}a_w"), getattr(self, f"ln{i}a_b"))
            qkv = torch.bmm(h.reshape(M, B * T, d), getattr(self, f"qkv{i}"))
            q, k, v = qkv.reshape(M, B, T, 3, heads, hd).unbind(3)
            att = torch.einsum("mbthe,mbshe->mbhts", q, k) / math.sqrt(hd) + mask
            y = torch.einsum("mbhts,mbshe->mbthe", att.softmax(-1), v).reshape(M, B * T, d)
            x = x + torch.bmm(y, getattr(self, f"proj{i}")).reshape(M, B, T, d)
            h = self._ln(x, getattr(self, f"ln{i}m_w"), getattr(self, f"ln{i}m_b"))
            h = F.gelu(torch.bmm(h.reshape(M, B * T, d), getattr(self, f"fc{i}")))
            x = x + torch.bmm(h, getattr(self, f"out{i}")).reshape(M, B, T, d)
        x = self._ln(x, self.lnf_w, self.lnf_b)
        return torch.einsum("mbtd,mvd->mbtv", x, self.emb)


class StudentMLP(Ensemble):
    """d_in → hidden (tanh) → 1."""

    def spec(self, d_in: int = 32, hidden: int = 64):
        return [("w1", (d_in, hidden), _uniform(d_in)), ("b1", (1, hidden), _uniform(d_in)),
                ("w2", (hidden, 1), _uniform(hidden)), ("b2", (1, 1), _uniform(hidden))]

    def forward(self, x: Tensor) -> Tensor:  # (M, B, d) -> (M, B)
        h = torch.tanh(torch.baddbmm(self.b1, x, self.w1))
        return torch.baddbmm(self.b2, h, self.w2).squeeze(-1)


# =================================================================================================
# Tasks
# =================================================================================================
@dataclass
class Task:
    name: str
    description: str
    model_cls: type[Ensemble]
    model_kw: dict[str, Any]
    loss_kind: str  # "ce", "mse" or "lm"
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    B0: int
    batch_sizes: list[int]
    steps: int
    lr_guess: dict[str, float]
    law_samples: int = 512
    eval_chunk: int = 100_000
    eval_index: Tensor | None = None  # objective on this subset of the training set (None: all)
    info: dict[str, Any] = field(default_factory=dict)
    L0: float = math.nan  # mean initial training loss
    L_fail: float = math.nan  # the best constant predictor's loss: ending above it = failed

    def constant_predictor_loss(self) -> float:
        y = self.y_train.reshape(-1)
        if self.loss_kind == "mse":
            return float(y.float().var(unbiased=False))
        p = torch.bincount(y).float() / y.numel()
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    def new_model(self, seeds: Sequence[int]) -> Ensemble:
        return self.model_cls(seeds, **self.model_kw)

    def losses(self, model: Ensemble, x: Tensor, y: Tensor) -> Tensor:
        """Per-model mean loss, shape (M,), of per-model batches x (M, B, ...), y (M, B, ...)."""
        out = model(x)
        M, B = y.shape[:2]
        if self.loss_kind == "mse":
            return ((out - y) ** 2).mean(1)
        per = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
        return per.view(M, -1).mean(1)

    def single_loss_fn(self) -> Callable[[nn.Module, Any], Tensor]:
        """``loss_fn(model, batch)`` for a one-copy ensemble and an ordinary (x, y) batch."""

        def loss_fn(model: nn.Module, batch: Any) -> Tensor:
            x, y = batch
            return self.losses(model, x[None], y[None])[0]  # type: ignore[arg-type]

        return loss_fn

    @torch.no_grad()
    def objective(self, model: Ensemble, split: str = "train") -> Tensor:
        """Per-model mean loss over a whole split. Train: BatchNorm on the statistics of the
        whole training set (the training objective). Test: running statistics (eval mode)."""
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        if split == "train" and self.eval_index is not None:
            x, y = x[self.eval_index], y[self.eval_index]
        was = model.training
        model.train(split == "train")
        model.use_batch_stats_only = split == "train"
        total = torch.zeros(model.M)
        n = x.shape[0]
        for start in range(0, n, self.eval_chunk):
            xs, ys = x[start:start + self.eval_chunk], y[start:start + self.eval_chunk]
            xm = xs.unsqueeze(0).expand(model.M, *xs.shape)
            ym = ys.unsqueeze(0).expand(model.M, *ys.shape)
            total += self.losses(model, xm, ym) * xs.shape[0]
        model.use_batch_stats_only = False
        model.train(was)
        return total / n


def make_digits(quick: bool) -> Task:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.images.astype(np.float32) / 16.0
    y = data.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    mean, std = xtr.mean(), xtr.std()
    to = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1)  # noqa: E731
    return Task(
        name="digits_cnn",
        description=("CNN conv8-BN-pool-conv16-BN-pool-fc32-fc10 (3.7k parameters) on scikit-learn "
                     "digits, stratified 80/20 split (1,437 train / 360 test), cross-entropy"),
        model_cls=DigitsCNN, model_kw={}, loss_kind="ce",
        x_train=to(xtr), y_train=torch.from_numpy(ytr), x_test=to(xte), y_test=torch.from_numpy(yte),
        B0=32, batch_sizes=[32, 128] if quick else [8, 16, 32, 64, 128, 256, 512],
        steps=8 if quick else 200, lr_guess={"sgd": 0.05, "adam": 3e-3},
        law_samples=64 if quick else 512,
    )


def markov_sequences(n: int, length: int, vocab: int, successors: int, rng: np.random.Generator,
                     table: tuple[np.ndarray, np.ndarray] | None = None):
    """Sequences of a random sparse second-order Markov chain (each context (a, b) has
    ``successors`` possible next tokens with Dirichlet(1) probabilities)."""
    if table is None:
        succ = np.stack([rng.choice(vocab, successors, replace=False) for _ in range(vocab ** 2)])
        probs = rng.dirichlet(np.ones(successors), size=vocab ** 2)
        P = np.zeros((vocab ** 2, vocab))
        np.put_along_axis(P, succ, probs, axis=1)
        table = (P, P.cumsum(1))
    P, cum = table
    out = np.zeros((n, length), dtype=np.int64)
    out[:, :2] = rng.integers(0, vocab, (n, 2))
    for t in range(2, length):
        c = out[:, t - 2] * vocab + out[:, t - 1]
        out[:, t] = np.minimum((rng.random(n)[:, None] > cum[c]).sum(1), vocab - 1)
    return out, table


def make_lm(quick: bool) -> Task:
    vocab, context = 8, 16
    rng = np.random.default_rng(1)
    n_train, n_test = (256, 128) if quick else (4096, 1024)
    train, table = markov_sequences(n_train, context + 1, vocab, 3, rng)
    test, _ = markov_sequences(n_test, context + 1, vocab, 3, rng, table)
    n_eval = min(n_train, 1024)  # the objective: a fixed random subset (the same for every run)
    eval_idx = torch.from_numpy(rng.permutation(n_train)[:n_eval])
    P = table[0]
    # entropy of the next token given its two predecessors, averaged over the positions the
    # model is scored on (the first target only sees one predecessor: bounded below the same way)
    cond_entropy = float(-(P * np.log(np.where(P > 0, P, 1))).sum(1).mean())
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    return Task(
        name="tiny_lm",
        description=(f"2-block pre-LN transformer LM (d=32, 2 heads, GELU MLP 64, causal mask, "
                     f"tied head; 17k parameters) on sequences of a random sparse order-2 Markov "
                     f"chain (V={vocab}, 3 successors per context, T={context}; {n_train} train / "
                     f"{n_test} test sequences, objective on a fixed {n_eval}-sequence train subset; log V = {math.log(vocab):.3f}, mean conditional "
                     f"entropy {cond_entropy:.3f} nats)"),
        model_cls=TinyLM, model_kw={"vocab": vocab, "context": context}, loss_kind="lm",
        x_train=t(train[:, :-1]), y_train=t(train[:, 1:]), x_test=t(test[:, :-1]),
        y_test=t(test[:, 1:]),
        B0=16, batch_sizes=[16, 64] if quick else [4, 8, 16, 32, 64, 128], steps=8 if quick else 200,
        lr_guess={"sgd": 0.1, "adam": 3e-3}, law_samples=64 if quick else 512, eval_chunk=256,
        eval_index=eval_idx,
        info={"log_vocab": math.log(vocab), "conditional_entropy": cond_entropy},
    )


def make_teacher(quick: bool) -> Task:
    """A noisy quadratic-like teacher-student problem in the online regime (fresh samples).

    Inputs x ~ N(0, diag(s_i²)) with s_i² ∝ i^-2 (a power-law spectrum, condition number d²), a
    linear teacher whose signal energy per direction decays like 1/i (w_i ∝ √i·N(0,1)), scaled to
    unit variance, plus label noise of standard deviation 0.5; a tanh MLP student. Progress on the
    slow directions is budget-limited (a sharp LR optimum) while the label noise keeps the
    gradient noise high — the setting in which critical batch sizes are usually studied (the noisy
    quadratic model of Zhang et al. 2019).
    """
    d_in, hidden, noise = 64, 64, 0.5
    n_train, n_test = (4096, 1024) if quick else (2 ** 18, 8192)
    g = torch.Generator().manual_seed(7)
    i = torch.arange(1, d_in + 1).float()
    scales = i ** -1.0
    scales = scales * math.sqrt(d_in / float((scales ** 2).sum()))
    w = torch.randn(d_in, generator=g) * i.sqrt()

    def sample(n: int) -> tuple[Tensor, Tensor, Tensor]:
        x = torch.randn(n, d_in, generator=g) * scales
        return x, x @ w, torch.randn(n, generator=g)

    xtr, ftr, etr = sample(n_train)
    xte, fte, ete = sample(n_test)
    scale = ftr.std()
    ytr, yte = ftr / scale + noise * etr, fte / scale + noise * ete
    n_eval = min(n_train, 8192)
    return Task(
        name="noisy_teacher",
        description=(f"noisy teacher-student regression, online regime: x ~ N(0, diag(s²)), s_i² ∝ "
                     f"i^-2 (d={d_in}), linear teacher with signal energy ∝ 1/i scaled to unit "
                     f"variance, label noise σ = {noise:g} (noise floor {noise ** 2:g}); student "
                     f"{d_in}-{hidden}-1 tanh MLP (4.2k parameters); {n_train} training samples "
                     f"(the largest budget sees each at most ~1.6 times), objective on a fixed "
                     f"{n_eval}-sample train subset; MSE"),
        model_cls=StudentMLP, model_kw={"d_in": d_in, "hidden": hidden}, loss_kind="mse",
        x_train=xtr, y_train=ytr, x_test=xte, y_test=yte,
        B0=32, batch_sizes=[32, 128] if quick else [8, 16, 32, 64, 128, 256, 512, 1024, 2048],
        steps=8 if quick else 200, lr_guess={"sgd": 0.01, "adam": 3e-3},
        law_samples=64 if quick else 512, eval_chunk=4096, eval_index=torch.arange(n_eval),
    )


TASKS: dict[str, Callable[[bool], Task]] = {
    "digits_cnn": make_digits, "tiny_lm": make_lm, "noisy_teacher": make_teacher,
}


# =================================================================================================
# Per-model optimizers and training of one group (one batch size, all LRs × seeds at once)
# =================================================================================================
class EnsembleOptimizer:
    """SGD with heavy-ball momentum (PyTorch's form: buf = μ·buf + g; p -= lr·buf) or Adam
    (PyTorch's defaults, bias-corrected), with one learning rate per model copy."""

    def __init__(self, model: Ensemble, kind: str, lrs: Tensor) -> None:
        self.kind, self.lr, self.t = kind, lrs.clone().float(), 0
        self.params = dict(model.named_parameters())
        slots = ("buf",) if kind == "sgd" else ("m", "v")
        self.state = {n: {s: torch.zeros_like(p) for s in slots} for n, p in self.params.items()}

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        for name, p in self.params.items():
            g, st = p.grad, self.state[name]
            lr = self.lr.view(-1, *([1] * (p.dim() - 1)))
            if self.kind == "sgd":
                st["buf"].mul_(MOMENTUM).add_(g)
                p.sub_(lr * st["buf"])
            else:
                b1, b2 = BETAS
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (st["v"] / (1 - b2 ** self.t)).sqrt_().add_(ADAM_EPS)
                p.sub_(lr * (st["m"] / (1 - b1 ** self.t)) / denom)

    def snapshot(self) -> dict[str, Any]:
        return {"t": self.t, "state": {n: {k: v.clone() for k, v in s.items()}
                                       for n, s in self.state.items()}}

    def load(self, snap: dict[str, Any], index: Tensor) -> None:
        self.t = snap["t"]
        for n, s in snap["state"].items():
            for k, v in s.items():
                self.state[n][k].copy_(v[index])

    def v_hat(self, m: int) -> list[Tensor]:
        """Adam's bias-corrected second moment of copy m (one tensor per parameter)."""
        return [self.state[n]["v"][m:m + 1] / (1 - BETAS[1] ** self.t) for n in self.params]


@torch.no_grad()
def _kill(model: Ensemble, opt: EnsembleOptimizer, dead: Tensor) -> None:
    """Freeze diverged copies at finite values (all-zero weights) so they cost nothing odd."""
    for p in model.parameters():
        p[dead] = 0.0
    for name, b in model.named_buffers():
        b[dead] = 1.0 if name.endswith("_rv") else 0.0
    for s in opt.state.values():
        for v in s.values():
            v[dead] = 0.0
    opt.lr[dead] = 0.0


def index_stream(task: Task, seed: int, salt: int, n: int) -> Tensor:
    """The data order of one seed: concatenated random permutations of the training set."""
    g = torch.Generator().manual_seed(1_000_003 * int(seed) + 7919 * int(salt) + 17)
    reps = -(-n // task.n_train)
    return torch.cat([torch.randperm(task.n_train, generator=g) for _ in range(reps)])[:n]


def model_state(model: Ensemble) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_group(task: Task, kind: str, B: int, lrs: Sequence[float], seeds: Sequence[int],
                eval_steps: Sequence[int], *, start: dict[str, Any] | None = None, salt: int = 0,
                keep_state: bool = False) -> dict[str, Any]:
    """Train len(lrs)·len(seeds) copies at batch size B; evaluate at each step in eval_steps.

    Copy index = i_lr · n_seeds + i_seed. ``start``: per-seed model and optimizer snapshots
    (protocol b) — otherwise every copy starts from its seed's initialisation. Returns final
    losses (train objective and test) per eval step, shaped (n_lr, n_seeds), and the failure
    flags (killed, or a final train loss that is not finite or above the constant predictor's).
    """
    n_lr, n_seed = len(lrs), len(seeds)
    seed_of = torch.arange(n_lr * n_seed) % n_seed
    model = task.new_model([seeds[i] for i in seed_of.tolist()])
    model.train()
    lr_t = torch.tensor([lr for lr in lrs for _ in seeds], dtype=torch.float32)
    opt = EnsembleOptimizer(model, kind, lr_t)
    if start is not None:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(start["model"][k][seed_of])
        opt.load(start["opt"], seed_of)
    total = max(eval_steps)
    streams = torch.stack([index_stream(task, s, salt, total * B) for s in seeds])
    alive = torch.ones(model.M, dtype=torch.bool)
    out: dict[str, Any] = {"train": {}, "test": {}, "failed": {}}
    for step in range(1, total + 1):
        idx = streams[:, (step - 1) * B: step * B]  # (n_seed, B)
        x, y = task.x_train[idx][seed_of], task.y_train[idx][seed_of]
        losses = task.losses(model, x, y)
        bad = alive & (~torch.isfinite(losses) | (losses > KILL_FACTOR * max(task.L0, task.L_fail)))
        alive &= ~bad
        for p in model.parameters():
            p.grad = None
        torch.where(alive, losses, torch.zeros(())).sum().backward()
        opt.step()
        if bad.any():  # after the step: the graph needed the weights as they were
            _kill(model, opt, ~alive)
        if step in eval_steps:
            tr = task.objective(model, "train")
            te = task.objective(model, "test")
            failed = ~alive | ~torch.isfinite(tr) | (tr > task.L_fail)
            out["train"][step] = tr.view(n_lr, n_seed).tolist()
            out["test"][step] = te.view(n_lr, n_seed).tolist()
            out["failed"][step] = failed.view(n_lr, n_seed).tolist()
    if keep_state:
        out["state"] = {"model": model_state(model), "opt": opt.snapshot()}
    return out


# =================================================================================================
# Oracle analysis of one lattice curve
# =================================================================================================
def lattice_lr(anchor: float, k: float) -> float:
    return anchor * 2.0 ** (k / 2.0)


def lattice_k(anchor: float, lr: float) -> float:
    return 2.0 * math.log2(lr / anchor)


def analyze_curve(ks: Sequence[int], loss: np.ndarray, failed: np.ndarray, L0: float) -> dict[str, Any]:
    """Oracle, band and stability edge of mean final loss over lattice points ks (sorted).

    loss, failed: (K, n_seeds). A failed seed counts as L0. Returns lattice coordinates (k).
    """
    ks = np.asarray(ks, dtype=float)
    capped = np.where(failed | ~np.isfinite(loss), L0, loss)
    mean = capped.mean(1)
    n = capped.shape[1]
    se = capped.std(1, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(len(ks))
    ok = ~failed.any(1)
    res: dict[str, Any] = {"k": ks.tolist(), "mean": mean.tolist(), "se": se.tolist(),
                           "ok": ok.tolist(), "n_failed": failed.sum(1).tolist(),
                           "all_failed": not ok.any()}
    if not ok.any():  # nothing trained (only plausible in the smoke test): rank the failures
        if len(ks) == 0:
            res.update(k_star=None)
            return res
        ok = np.ones_like(ok)
    i = int(np.argmin(np.where(ok, mean, np.inf)))
    k_star = float(ks[i])
    if 0 < i < len(ks) - 1 and ok[i - 1] and ok[i + 1]:
        y0, y1, y2 = mean[i - 1], mean[i], mean[i + 1]
        curv = y0 - 2 * y1 + y2
        if curv > 0:
            k_star += float(np.clip(0.5 * (y0 - y2) / curv, -0.5, 0.5))
    tol = BAND_SE * np.sqrt(se[i] ** 2 + se ** 2)
    inband = ok & (mean <= mean[i] + tol)
    lo = hi = i
    while lo > 0 and inband[lo - 1]:
        lo -= 1
    while hi < len(ks) - 1 and inband[hi + 1]:
        hi += 1
    top = i
    while top < len(ks) - 1 and ok[top + 1]:
        top += 1
    res.update(
        k_best=float(ks[i]), k_star=k_star, best_mean=float(mean[i]), best_se=float(se[i]),
        band_k=[float(ks[lo]) - 0.5, float(ks[hi]) + 0.5], k_stable=float(ks[top]),
        stable_at_top=bool(top == len(ks) - 1), best_at_low_edge=bool(i <= 1),
        best_at_high_edge=bool(i >= len(ks) - 2),
    )
    return res


def score_rule(curve: dict[str, Any], k_rule: float, L0: float) -> dict[str, Any]:
    """How far a rule's LR (lattice coordinate k_rule) is from the oracle of one curve."""
    if curve.get("k_star") is None or not math.isfinite(k_rule):
        return {"log2_err": math.nan, "in_band": False, "diverged": True, "loss_gap": math.nan}
    ks, mean = np.asarray(curve["k"]), np.asarray(curve["mean"])
    lo, hi = curve["band_k"]
    diverged = k_rule > curve["k_stable"] + 0.5 and not curve["stable_at_top"]
    if diverged:
        loss = L0
    elif k_rule <= ks[0]:
        loss = float(mean[0])
    elif k_rule >= ks[-1]:
        loss = float(mean[-1])
    else:
        loss = float(np.interp(k_rule, ks, mean))
    return {
        "log2_err": (k_rule - curve["k_star"]) / 2.0,
        "in_band": bool(lo <= k_rule <= hi),
        "diverged": bool(diverged),
        "loss_gap": loss - curve["best_mean"],
        "outside_grid": bool(k_rule < ks[0] or k_rule > ks[-1]),
    }


# =================================================================================================
# Measurements at the switch point, and the rules
# =================================================================================================
def flat_params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def hvp_operator(model: Ensemble, loss_fn, batch, scale: list[Tensor] | None = None):
    """v ↦ D H D v on a fixed batch (graph built once, reused), D = diag(scale) or I.

    Plain double backward; BatchNorm on the batch's statistics without touching its buffers.
    """
    params = flat_params(model)
    model.train()
    model.use_batch_stats_only = True
    loss = loss_fn(model, batch)
    model.use_batch_stats_only = False
    grads = torch.autograd.grad(loss, params, create_graph=True)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    d = torch.cat([s.reshape(-1) for s in scale]) if scale is not None else None

    def matvec(v: Tensor) -> Tensor:
        u = v * d if d is not None else v
        parts = [c.view(s) for c, s in zip(torch.split(u, sizes), shapes, strict=True)]
        hv = torch.autograd.grad(grads, params, grad_outputs=parts, retain_graph=True)
        out = torch.cat([h.reshape(-1) for h in hv]).detach()
        return out * d if d is not None else out

    return matvec, sum(sizes)


def lanczos_top(matvec, n: int, *, max_iter: int = 60, tol: float = 1e-3, seed: int = 0) -> tuple[float, bool]:
    """Largest eigenvalue of the symmetric map ``matvec`` with the library's own Lanczos."""
    import warnings

    from lr_batch_callback import CurvatureOperator, lanczos

    op = CurvatureOperator.from_function(
        lambda V: torch.stack([matvec(v.float()).double() for v in V]), n, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = lanczos(op, tol=tol, max_iter=min(max_iter, n), seed=seed)
    return float(res.eigenvalues[0]), bool(res.converged)


def extract(task: Task, state: dict[str, Any], m: int, seed: int) -> Ensemble:
    """Copy m of an ensemble snapshot as a one-copy ensemble (for the curvature engine)."""
    single = task.new_model([seed])
    with torch.no_grad():
        for k, v in single.state_dict().items():
            v.copy_(state["model"][k][m:m + 1])
    single.train()
    return single


def grad_sq_norm(model: Ensemble, loss_fn, batch) -> float:
    model.use_batch_stats_only = True
    g = torch.autograd.grad(loss_fn(model, batch), flat_params(model))
    model.use_batch_stats_only = False
    return float(sum((x.double() ** 2).sum() for x in g))


def noise_scale(model: Ensemble, loss_fn, pool: tuple[Tensor, Tensor], b_small: int,
                dataset_size: int) -> dict[str, float]:
    """McCandlish et al. (2018, App. A): unbiased |G|² and tr Σ from mean squared gradient norms
    at two batch sizes (disjoint micro-batches of b_small, and the whole pool), with the
    finite-population factor x = 1/B − 1/N; B_simple = tr Σ / |G|² (inf if |G|² ≤ 0)."""
    x, y = pool
    n = x.shape[0]
    small = [grad_sq_norm(model, loss_fn, (x[i:i + b_small], y[i:i + b_small]))
             for i in range(0, n - b_small + 1, b_small)]
    g_small = float(np.mean(small))
    g_big = grad_sq_norm(model, loss_fn, pool)
    xs, xb = 1 / b_small - 1 / dataset_size, 1 / n - 1 / dataset_size
    tr_sigma = (g_small - g_big) / (xs - xb)
    g2 = g_big - tr_sigma * xb
    b_simple = tr_sigma / g2 if g2 > 0 and tr_sigma > 0 else (math.inf if tr_sigma > 0 else 0.0)
    return {"g_small_sq": g_small, "g_big_sq": g_big, "b_small": b_small, "b_big": n,
            "G_sq": g2, "tr_sigma": tr_sigma, "B_simple": b_simple}


def flat_grad(model: Ensemble, loss_fn, batch) -> Tensor:
    model.use_batch_stats_only = True
    g = torch.autograd.grad(loss_fn(model, batch), flat_params(model))
    model.use_batch_stats_only = False
    return torch.cat([x.reshape(-1) for x in g]).detach()


def noise_scale_hessian(model: Ensemble, loss_fn, pool: tuple[Tensor, Tensor], b_small: int,
                        dataset_size: int, max_micro: int = 64) -> dict[str, float]:
    """McCandlish et al.'s Hessian-weighted noise scale B_noise = tr(HΣ) / (GᵀHG).

    H is the Hessian of the pool (fixed, graph reused); the same two-size estimator as
    :func:`noise_scale`, with |g|² replaced by gᵀHg: E[g_Bᵀ H g_B] = GᵀHG + tr(HΣ)·(1/B − 1/N).
    Uses the first ``max_micro`` micro-batches. B_noise = inf where GᵀHG ≤ 0 (no curvature
    along the gradient: nothing bounds the step) and 0 where tr(HΣ) ≤ 0.
    """
    x, y = pool
    n = x.shape[0]
    matvec, _ = hvp_operator(model, loss_fn, pool)
    quad = lambda v: float(v.double() @ matvec(v).double())  # noqa: E731
    small = [quad(flat_grad(model, loss_fn, (x[i:i + b_small], y[i:i + b_small])))
             for i in range(0, min(n, max_micro * b_small) - b_small + 1, b_small)]
    q_small = float(np.mean(small))
    q_big = quad(flat_grad(model, loss_fn, pool))
    xs, xb = 1 / b_small - 1 / dataset_size, 1 / n - 1 / dataset_size
    tr_hs = (q_small - q_big) / (xs - xb)
    ghg = q_big - tr_hs * xb
    if ghg <= 0:
        b_noise = math.inf
    else:
        b_noise = tr_hs / ghg if tr_hs > 0 else 0.0
    return {"gHg_small": q_small, "gHg_big": q_big, "micro_batches": len(small), "GHG": ghg,
            "tr_H_sigma": tr_hs, "B_noise": b_noise}


def fit_law_edge(batch_sizes: Sequence[float], eigenvalues: Sequence[float],
                 dataset_size: float) -> dict[str, float] | None:
    """Least squares of λ(B) = a + c·x + d·√x (x = 1/B − 1/N) on the per-size means."""
    sizes = np.asarray(batch_sizes, dtype=float)
    vals = np.asarray(eigenvalues, dtype=float)
    distinct = np.unique(sizes)
    if distinct.size < 3:
        return None
    means = np.array([vals[sizes == b].mean() for b in distinct])
    xx = np.maximum(1 / distinct - 1 / dataset_size, 0.0)
    A = np.stack([np.ones_like(xx), xx, np.sqrt(xx)], 1)
    (a, c, d), *_ = np.linalg.lstsq(A, means, rcond=None)
    pred = A @ np.array([a, c, d])
    ss = float(((means - means.mean()) ** 2).sum())
    r2 = 1 - float(((means - pred) ** 2).sum()) / ss if ss > 0 else math.nan
    return {"a": float(a), "c": float(c), "d": float(d), "r_squared_of_means": r2}


def law_edge_predict(fit: dict[str, float], B: float, dataset_size: float) -> float:
    x = max(1 / B - 1 / dataset_size, 0.0)
    return fit["a"] + fit["c"] * x + fit["d"] * math.sqrt(x)


# -- the rules: pure functions of measured quantities ---------------------------------------------
def rule_fixed(name: str, b0: float, b: float) -> float:
    return scaling_factor(name, int(b0), int(b))


def rule_curvature(law: Any, b0: float, b: float, adaptive: bool, min_r2: float = 0.5) -> tuple[float, bool]:
    """The library's rule='curvature' as the callback applies it; returns (factor, law used)."""
    fallback = rule_fixed("sqrt" if adaptive else "linear", b0, b)
    r2 = law.r_squared_of_means
    if not (math.isfinite(r2) and r2 >= min_r2):
        return fallback, False
    try:
        return float(law.lr_factor(b0, b, adaptive=adaptive)), True
    except ValueError:
        return fallback, False


def rule_ratio(lam_b0: float, lam_b: float, root: bool) -> float:
    """λ(B0)/λ(B) (or its square root); falls back to nothing (nan) without positive values."""
    if not (lam_b0 > 0 and lam_b > 0):
        return math.nan
    r = lam_b0 / lam_b
    return math.sqrt(r) if root else r


def rule_noise_sgd(b_noise: float, b0: float, b: float) -> float:
    """McCandlish et al. 2018: ε_opt(B) = ε_max / (1 + B_noise/B)."""
    return (1 + b_noise / b0) / (1 + b_noise / b) if math.isfinite(b_noise) else b / b0


def rule_surge_adam(b_noise: float, b0: float, b: float) -> float:
    """Li et al. 2024: ε_opt(B) = ε_max / (½(√(B_noise/B) + √(B/B_noise)))."""
    if math.isinf(b_noise):  # all batches far below the noise scale: the √ rule
        return math.sqrt(b / b0)
    if not b_noise > 0:  # no measurable noise: no change
        return 1.0
    f = lambda B: 1.0 / (0.5 * (math.sqrt(b_noise / B) + math.sqrt(B / b_noise)))  # noqa: E731
    return f(b) / f(b0)


def rule_noise_sqrt(b_noise: float, b0: float, b: float) -> float:
    return math.sqrt(rule_noise_sgd(b_noise, b0, b))


def rule_guard(fixed: float, lr0: float, sharpness_b: float, threshold: float) -> float:
    """The fixed rule's factor, capped so that LR(B)·sharpness(B) ≤ threshold."""
    if not sharpness_b > 0:
        return fixed
    return min(fixed, threshold / (lr0 * sharpness_b))


def measure_switch_point(task: Task, kind: str, state: dict[str, Any], seeds: Sequence[int],
                         quick: bool) -> list[dict[str, Any]]:
    """Everything the rules need, per seed, at the state after S steps at B0."""
    loss_fn = task.single_loss_fn()
    S, B0, N = task.steps, task.B0, task.n_train
    sizes = sorted(set(task.batch_sizes) | {B0})
    out = []
    for m, seed in enumerate(seeds):
        t0 = time.perf_counter()
        single = extract(task, state, m, seed)
        stream = index_stream(task, seed, 0, S * B0)
        recent = stream[S * B0 - task.law_samples: S * B0]
        pool = (task.x_train[recent], task.y_train[recent])
        rec: dict[str, Any] = {"seed": seed}
        # 1. the library's law, exactly as the callback fits it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            law = estimate_batch_size_law(
                single, loss_fn, pool, draws=2 if quick else 3, dataset_size=N, seed=S + 1000 * seed,
                tol=1e-3, max_iter=10 if quick else 50,
            )
        rec["law"] = law.to_dict()
        rec["law_r_squared_of_means"] = law.r_squared_of_means
        rec["law_critical_batch_size"] = law.critical_batch_size
        rec["law_warnings"] = [str(w.message)[:200] for w in caught]
        rec["_law"] = law
        rec["law_edge"] = fit_law_edge(law.batch_sizes, law.eigenvalues, N)
        # 2. λ_max on batches of each size (and the preconditioned sharpness for Adam)
        g = torch.Generator().manual_seed(99 + seed)
        v_hat = None
        if kind == "adam":
            opt_v = [state["opt"]["state"][n]["v"][m:m + 1] / (1 - BETAS[1] ** state["opt"]["t"])
                     for n, _ in single.named_parameters()]
            v_hat = [1.0 / (v.sqrt() + ADAM_EPS).sqrt() for v in opt_v]
        lam, lam_p, conv = {}, {}, {}
        for B in sizes:
            draws = 1 if quick else (3 if B <= 64 else 2)
            vals, pvals, cv = [], [], []
            for d in range(draws):
                idx = torch.randperm(N, generator=g)[:B]
                batch = (task.x_train[idx], task.y_train[idx])
                r = hessian_eigenvalues(single, loss_fn, batch, k=1, tol=1e-3,
                                        max_iter=10 if quick else 100, seed=1000 * seed + d)
                vals.append(float(r.eigenvalues[0]))
                cv.append(bool(r.converged))
                if v_hat is not None:
                    mv, n = hvp_operator(single, loss_fn, batch, scale=v_hat)
                    top, ok = lanczos_top(mv, n, max_iter=10 if quick else 80, tol=1e-3,
                                          seed=2000 * seed + d)
                    pvals.append(top)
                    cv.append(ok)
            lam[B] = float(np.mean(vals))
            if pvals:
                lam_p[B] = float(np.mean(pvals))
            conv[B] = all(cv)
        rec["lambda"] = lam
        rec["lambda_precond"] = lam_p
        rec["lanczos_converged"] = conv
        # 3. gradient noise scale
        rec["noise"] = noise_scale(single, loss_fn, pool, min(task.batch_sizes), N)
        rec["noise_hess"] = noise_scale_hessian(single, loss_fn, pool, min(task.batch_sizes), N,
                                                max_micro=8 if quick else 64)
        rec["seconds"] = time.perf_counter() - t0
        out.append(rec)
    return out


def rules_for(kind: str, meas: Sequence[dict[str, Any]], B0: int, N: int, B: int,
              base: dict[str, float]) -> dict[str, Any]:
    """Every rule's per-seed factors, their geometric mean, and the LR (base × factor) per budget."""
    per_seed = {b: [rule_factors(kind, m, B0, N, B, base[b]) for m in meas] for b in base}
    factors = {b: {r: geo_mean([ps[r] for ps in per_seed[b]]) for r in RULES[kind]} for b in base}
    lrs = {b: {r: base[b] * f for r, f in factors[b].items()} for b in base}
    return {"base_lr": base, "factor": factors, "factor_per_seed": per_seed, "lr": lrs}


def rule_factors(kind: str, meas: dict[str, Any], B0: int, N: int, B: int, lr0: float) -> dict[str, float]:
    """Every rule's factor for B0 → B from one seed's measurements (lr0: the base LR)."""
    adaptive = kind == "adam"
    lam, lam_p = meas["lambda"], meas["lambda_precond"]
    bn = meas["noise"]["B_simple"]
    bn_h = meas["noise_hess"]["B_noise"]
    f: dict[str, float] = {r: rule_fixed(r, B0, B) for r in ("linear", "sqrt", "none")}
    f["curvature"], _ = rule_curvature(meas["_law"], B0, B, adaptive)
    f["direct"] = rule_ratio(lam[B0], lam[B], root=adaptive)
    edge = meas["law_edge"]
    if edge is not None:
        f["law_edge"] = rule_ratio(law_edge_predict(edge, B0, N), law_edge_predict(edge, B, N),
                                   root=adaptive)
    else:
        f["law_edge"] = math.nan
    if adaptive:
        f["direct_precond"] = rule_ratio(lam_p[B0], lam_p[B], root=False)
        f["surge"] = rule_surge_adam(bn, B0, B)
        f["noise_sqrt"] = rule_noise_sqrt(bn, B0, B)
        f["noise_hess_sqrt"] = rule_noise_sqrt(bn_h, B0, B)
        f["guard"] = rule_guard(f["sqrt"], lr0, lam_p[B], ADAM_THRESHOLD)
    else:
        f["noise"] = rule_noise_sgd(bn, B0, B)
        f["noise_hess"] = rule_noise_sgd(bn_h, B0, B)
        f["guard"] = rule_guard(f["linear"], lr0, lam[B], SGD_THRESHOLD)
        f["noise_guard"] = rule_guard(f["noise"], lr0, lam[B], SGD_THRESHOLD)
    return {r: f[r] for r in RULES[kind]}


def geo_mean(values: Sequence[float]) -> float:
    vals = [v for v in values if math.isfinite(v) and v > 0]
    if len(vals) < len(values) or not vals:
        return math.nan
    return float(math.exp(np.mean(np.log(vals))))


# =================================================================================================
# The search: lattice grids with extension, per protocol and batch size
# =================================================================================================
@dataclass
class Config:
    seeds: list[int]
    quick: bool
    max_rounds: int = 3
    extend_by: int = 3


def budgets(task: Task, B: int) -> dict[str, int]:
    return {"fixed_step": task.steps, "fixed_epoch": max(1, round(task.steps * task.B0 / B))}


def search(task: Task, kind: str, B: int, anchor: float, ks: Sequence[int], cfg: Config, *,
           start: dict[str, Any] | None, salt: int, keep_state: bool = False) -> dict[str, Any]:
    """Train the lattice points ks at B; widen until the oracle is interior and the top fails
    (for both budgets). Returns per-k results and the curves."""
    bud = budgets(task, B)
    steps = sorted(set(bud.values()))
    points: dict[int, dict[str, Any]] = {}
    states: dict[int, dict[str, Any]] = {}
    todo = sorted(set(int(k) for k in ks))
    rounds = 0
    wall = 0.0
    while todo:
        t0 = time.perf_counter()
        res = train_group(task, kind, B, [lattice_lr(anchor, k) for k in todo], cfg.seeds, steps,
                          start=start, salt=salt, keep_state=keep_state)
        wall += time.perf_counter() - t0
        for i, k in enumerate(todo):
            points[k] = {b: {"train": res["train"][s][i], "test": res["test"][s][i],
                             "failed": res["failed"][s][i]} for b, s in bud.items()}
            if keep_state:
                n = len(cfg.seeds)
                states[k] = {"model": {kk: v[i * n:(i + 1) * n] for kk, v in res["state"]["model"].items()},
                             "opt": {"t": res["state"]["opt"]["t"],
                                     "state": {p: {s: v[i * n:(i + 1) * n] for s, v in st.items()}
                                               for p, st in res["state"]["opt"]["state"].items()}}}
        rounds += 1
        todo = []
        if cfg.quick or rounds > cfg.max_rounds:
            break
        kk = sorted(points)
        up = down = False
        for b in bud:
            curve = curve_of(points, b, task.L_fail)
            if curve.get("k_star") is None:
                down = True
                continue
            top_mean = curve["mean"][-1]
            # the top must fail, or have lost more than half the achievable improvement
            top_failed = curve["n_failed"][-1] > 0 or top_mean > 0.5 * (task.L_fail + curve["best_mean"])
            up |= (not top_failed) or curve["best_at_high_edge"]
            down |= curve["best_at_low_edge"]
        if up:
            todo += list(range(kk[-1] + 1, kk[-1] + 1 + cfg.extend_by))
        if down:
            todo += list(range(kk[0] - cfg.extend_by, kk[0]))
    curves = {b: curve_of(points, b, task.L_fail) for b in bud}
    return {"B": B, "anchor": anchor, "budget_steps": bud, "points": {str(k): v for k, v in sorted(points.items())},
            "curves": curves, "rounds": rounds, "seconds": wall, "_states": states}


def curve_of(points: dict[int, dict[str, Any]], budget: str, L0: float) -> dict[str, Any]:
    ks = sorted(points)
    loss = np.array([points[k][budget]["train"] for k in ks], dtype=float)
    failed = np.array([points[k][budget]["failed"] for k in ks], dtype=bool)
    return analyze_curve(ks, loss, failed, L0)


def initial_ks(center_k: float, rule_ks: Sequence[float], half_width: int, span_cap: int) -> list[int]:
    lo, hi = math.floor(center_k) - half_width, math.ceil(center_k) + half_width
    finite = [k for k in rule_ks if math.isfinite(k)]
    if finite:
        lo = max(min(lo, math.floor(min(finite)) - 1), math.floor(center_k) - span_cap)
        hi = min(max(hi, math.ceil(max(finite)) + 1), math.ceil(center_k) + span_cap)
    return list(range(lo, hi + 1))


def run_task_optimizer(task: Task, kind: str, cfg: Config) -> dict[str, Any]:
    B0, S = task.B0, task.steps
    out: dict[str, Any] = {"task": task.name, "optimizer": kind, "B0": B0, "steps": S}
    t_start = time.perf_counter()
    half, cap = (1, 3) if cfg.quick else (4, 10)
    # (a) from scratch at B0, on a wide lattice around the guess
    guess = task.lr_guess[kind]
    a0 = search(task, kind, B0, guess, range(-2 if cfg.quick else -8, (2 if cfg.quick else 8) + 1), cfg,
                start=None, salt=0, keep_state=True)
    c0 = a0["curves"]["fixed_step"]
    if c0.get("k_star") is None:
        raise RuntimeError(f"{task.name}/{kind}: every LR failed at B0={B0}")
    k_best0 = int(c0["k_best"])
    lr_prefix = lattice_lr(guess, k_best0)
    anchor = lr_prefix  # every later lattice: LR = LR*_a(B0) · 2^(k/2)
    prefix = a0["_states"][k_best0]
    log(f"{task.name}/{kind}: LR*_a(B0={B0}) = {lr_prefix:.4g} (lattice), {a0['seconds']:.0f}s")
    # the prefix state is the B0 run at that LR after S steps (fixed-step = fixed-epoch at B0)
    t0 = time.perf_counter()
    meas = measure_switch_point(task, kind, prefix, cfg.seeds, cfg.quick)
    out["measure_seconds"] = time.perf_counter() - t0
    log(f"{task.name}/{kind}: switch-point measurements {out['measure_seconds']:.0f}s; "
        f"law R²(means) {[round(m['law_r_squared_of_means'], 2) for m in meas]}, "
        f"B_simple {[round(m['noise']['B_simple'], 1) for m in meas]}, "
        f"B_noise(H) {[round(m['noise_hess']['B_noise'], 1) for m in meas]}")
    # re-express the B0 scratch search on the new anchor (shift of k_best0)
    a0["anchor"] = anchor
    a0["points"] = {str(int(k) - k_best0): v for k, v in a0["points"].items()}
    a0["curves"] = {b: curve_of({int(k): v for k, v in a0["points"].items()}, b, task.L_fail)
                    for b in a0["budget_steps"]}
    a0.pop("_states")
    protocols: dict[str, Any] = {}
    for proto in ("a", "b"):
        t_proto = time.perf_counter()
        start = None if proto == "a" else prefix
        salt = 0 if proto == "a" else 1
        if proto == "a":
            s0 = a0
        else:
            s0 = search(task, kind, B0, anchor, range(-2 if cfg.quick else -4, (2 if cfg.quick else 4) + 1),
                        cfg, start=start, salt=salt)
            s0.pop("_states")
        runs = {B0: s0}
        rules_at: dict[int, dict[str, Any]] = {}
        for B in task.batch_sizes:
            if B == B0:
                continue
            # protocol a: LR*_a(B0) (refined; the same run for both budgets) — pure scaling error;
            # protocol b: the LR actually used before the switch (the callback multiplies it)
            if proto == "a":
                base = {b: lattice_lr(anchor, s0["curves"][b]["k_star"]) for b in s0["budget_steps"]}
            else:
                base = {b: lr_prefix for b in s0["budget_steps"]}
            rules_at[B] = rules_for(kind, meas, task.B0, task.n_train, B, base)
            rule_lr = rules_at[B]["lr"]
            expo = 0.25 if kind == "adam" else 0.5
            center = lattice_k(anchor, base["fixed_step"] * (B / B0) ** expo)
            rule_ks = [lattice_k(anchor, v) for v in rule_lr["fixed_step"].values() if v > 0 and math.isfinite(v)]
            ks = initial_ks(center, rule_ks, half, cap)
            runs[B] = search(task, kind, B, anchor, ks, cfg, start=start, salt=salt)
            runs[B].pop("_states")
            c = runs[B]["curves"]["fixed_step"]
            log(f"{task.name}/{kind}/{proto} B={B}: {len(runs[B]['points'])} LRs in "
                f"{runs[B]['rounds']} round(s), {runs[B]['seconds']:.0f}s; LR*/LR*(B0) = "
                f"{2 ** ((c['k_star'] - s0['curves']['fixed_step']['k_star']) / 2) if c.get('k_star') is not None else float('nan'):.3g}")
        scores = score_protocol(task, kind, runs, rules_at, anchor)
        protocols[proto] = {"runs": {str(B): r for B, r in runs.items()},
                            "rules": {str(B): r for B, r in rules_at.items()},
                            "scores": scores, "seconds": time.perf_counter() - t_proto}
    out["anchor_lr"] = anchor
    out["prefix_lr"] = lr_prefix
    out["measurements"] = [{k: v for k, v in m.items() if not k.startswith("_")} for m in meas]
    out["protocols"] = protocols
    out["seconds"] = time.perf_counter() - t_start
    return out


def score_protocol(task: Task | None, kind: str, runs: dict[int, Any], rules_at: dict[int, Any],
                   anchor: float, L_fail: float | None = None) -> dict[str, Any]:
    L_fail = task.L_fail if task is not None else L_fail
    cells: list[dict[str, Any]] = []
    for B, info in rules_at.items():
        for b in runs[B]["curves"]:
            curve = runs[B]["curves"][b]
            for r, lr in info["lr"][b].items():
                k_rule = lattice_k(anchor, lr) if lr > 0 and math.isfinite(lr) else math.nan
                s = score_rule(curve, k_rule, L_fail)
                s.update(B=B, budget=b, rule=r, lr_rule=lr,
                         lr_star=lattice_lr(anchor, curve["k_star"]) if curve.get("k_star") is not None else math.nan)
                cells.append(s)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for b in ("fixed_step", "fixed_epoch"):
        summary[b] = {}
        for r in RULES[kind]:
            cs = [c for c in cells if c["budget"] == b and c["rule"] == r]
            errs = [abs(c["log2_err"]) for c in cs if math.isfinite(c["log2_err"])]
            gaps = [c["loss_gap"] for c in cs if math.isfinite(c["loss_gap"])]
            summary[b][r] = {
                "mean_abs_log2_err": float(np.mean(errs)) if errs else math.nan,
                "mean_log2_err": float(np.mean([c["log2_err"] for c in cs if math.isfinite(c["log2_err"])])) if errs else math.nan,
                "frac_in_band": float(np.mean([c["in_band"] for c in cs])) if cs else math.nan,
                "divergences": int(sum(c["diverged"] for c in cs)),
                "mean_loss_gap": float(np.mean(gaps)) if gaps else math.nan,
                "cells": len(cs),
            }
    return {"cells": cells, "summary": summary}


# =================================================================================================
# Outputs
# =================================================================================================
def _clean(obj: Any) -> Any:
    """JSON-safe: str keys, no NaN/inf (null), no tensors."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Tensor):
        return _clean(obj.tolist())
    return obj


def write_csv(results: dict[str, Any], path: Path) -> None:
    rows = []
    for tr in results["results"]:
        for proto, p in tr["protocols"].items():
            for c in p["scores"]["cells"]:
                rows.append({"task": tr["task"], "optimizer": tr["optimizer"], "protocol": proto,
                             "budget": c["budget"], "B": c["B"], "rule": c["rule"],
                             "lr_rule": c["lr_rule"], "lr_star": c["lr_star"],
                             "log2_err": c["log2_err"], "in_band": c["in_band"],
                             "diverged": c["diverged"], "loss_gap": c["loss_gap"]})
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["task"])
        w.writeheader()
        w.writerows(rows)


RULE_STYLE = {
    "linear": ("s", "tab:blue"), "sqrt": ("D", "tab:cyan"), "none": ("o", "tab:gray"),
    "curvature": ("v", "tab:red"), "direct": ("^", "tab:orange"), "direct_precond": ("<", "tab:brown"),
    "law_edge": (">", "tab:pink"), "noise": ("P", "tab:green"), "surge": ("X", "tab:olive"),
    "noise_sqrt": ("P", "tab:green"), "noise_hess": ("h", "lime"), "noise_hess_sqrt": ("h", "lime"),
    "guard": ("*", "tab:purple"), "noise_guard": ("p", "darkgreen"),
}


def plot_task(results: dict[str, Any], task_name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trs = [t for t in results["results"] if t["task"] == task_name]
    cols = [("a", "fixed_step"), ("a", "fixed_epoch"), ("b", "fixed_step"), ("b", "fixed_epoch")]
    fig, axes = plt.subplots(len(trs), len(cols) + 1, figsize=(4.2 * (len(cols) + 1), 3.6 * len(trs)),
                             squeeze=False)
    L0 = results["tasks"][task_name]["L_fail"]
    cmap = plt.get_cmap("viridis")
    for row, tr in enumerate(trs):
        anchor = tr["anchor_lr"]
        sizes = sorted(int(b) for b in tr["protocols"]["a"]["runs"])
        colour = {B: cmap(i / max(1, len(sizes) - 1)) for i, B in enumerate(sizes)}
        for col, (proto, budget) in enumerate(cols):
            ax = axes[row][col]
            p = tr["protocols"][proto]
            for B in sizes:
                run = p["runs"][str(B)]
                curve = run["curves"][budget]
                lrs = np.array([lattice_lr(anchor, k) for k in curve["k"]])
                mean, se = np.array(curve["mean"]), np.array(curve["se"])
                ok = np.array(curve["ok"])
                ax.plot(lrs, mean, "-", color=colour[B], lw=1.2, label=f"B={B}")
                ax.fill_between(lrs, mean - se, mean + se, color=colour[B], alpha=0.2, lw=0)
                ax.plot(lrs[~ok], mean[~ok], "x", color=colour[B], ms=5)
                if curve.get("k_star") is not None:
                    ks = lattice_lr(anchor, curve["k_star"])
                    ax.plot([ks], [np.interp(curve["k_star"], curve["k"], mean)], "*", color="k", ms=9,
                            zorder=5)
                    lo, hi = (lattice_lr(anchor, k) for k in curve["band_k"])
                    ax.hlines(curve["best_mean"], lo, hi, color=colour[B], lw=4, alpha=0.5)
                rules = p["rules"].get(str(B))
                if rules:
                    for r, lr in rules["lr"][budget].items():
                        if not (lr and math.isfinite(lr)):
                            continue
                        m, c = RULE_STYLE.get(r, ("o", "k"))
                        k = lattice_k(anchor, lr)
                        y = float(np.interp(k, curve["k"], mean))
                        ax.plot([lr], [y], m, mfc="none", mec=c, ms=7, mew=1.4)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(top=L0 * 1.1)
            ax.set_title(f"{tr['optimizer']} · protocol {proto} · {budget.replace('_', '-')}", fontsize=9)
            ax.set_xlabel("learning rate")
            if col == 0:
                ax.set_ylabel("final train loss (mean ± se)")
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="lower left")
        # last column: LR*(B)/LR*(B0) with band, and the rules' factors (protocol b, fixed-step)
        ax = axes[row][-1]
        for proto, ls in (("a", "--"), ("b", "-")):
            p = tr["protocols"][proto]
            base_k = p["runs"][str(tr["B0"])]["curves"]["fixed_step"]["k_star"] if proto == "a" else 0.0
            xs, ys, lo, hi = [], [], [], []
            for B in sizes:
                c = p["runs"][str(B)]["curves"]["fixed_step"]
                if c.get("k_star") is None:
                    continue
                xs.append(B)
                ys.append(2 ** ((c["k_star"] - base_k) / 2))
                lo.append(2 ** ((c["band_k"][0] - base_k) / 2))
                hi.append(2 ** ((c["band_k"][1] - base_k) / 2))
            ax.plot(xs, ys, ls, color="0.55" if proto == "a" else "k", marker="*",
                    label=f"oracle ({proto})")
            if proto == "b":
                ax.fill_between(xs, lo, hi, color="k", alpha=0.12, lw=0, label="band (b)")
                for r in RULES[tr["optimizer"]]:
                    m, c = RULE_STYLE.get(r, ("o", "k"))
                    fx = [1.0 if B == tr["B0"] else p["rules"][str(B)]["factor"]["fixed_step"][r] for B in sizes]
                    ax.plot(sizes, [f if f else np.nan for f in fx], marker=m, color=c, lw=0.8, ms=5,
                            mfc="none", label=r)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_ylim(2.0 ** -7, 2.0 ** 9)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("LR(B) / LR*(B0)")
        ax.set_title(f"{tr['optimizer']}: oracle vs rules (fixed-step)", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{task_name}: final loss vs LR per batch size (star: oracle; bar: band; x: failed; "
                 f"open markers: rule LRs)", fontsize=10)
    if results["config"]["quick"]:  # layout is the slow part of plotting: skip it in the smoke test
        fig.savefig(path, dpi=40)
    else:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def markdown(results: dict[str, Any]) -> str:
    """The score tables, generated from the results JSON."""
    cfg, lines = results["config"], []
    lines.append("# LR-oracle benchmark: batch-size LR rules against a grid-search oracle\n")
    lines.append(f"Command: `{cfg['command']}`  ")
    lines.append(f"Wall time: {results['wall_seconds'] / 60:.1f} min on {cfg['threads']} thread(s); "
                 f"{cfg['machine']}; torch {cfg['torch']}; package commit {cfg['package_commit']}; "
                 f"seeds {cfg['seeds']}; started {cfg['started']}.\n")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    if results.get("notes"):
        lines.append("")
    lines.append("Definitions are in the docstring of `benchmarks/lr_oracle.py`. Each score is over the "
                 "cells B ≠ B0 of one task × optimizer × protocol × budget: **err** = mean |log2(LR_rule/LR*)| "
                 "(octaves), **band** = fraction of cells whose rule LR is in the statistically "
                 "indistinguishable band, **div** = cells where the rule LR is past the largest "
                 "non-diverging LR, **gap** = mean final-loss gap to the oracle (divergence counted "
                 "as L_fail − best). Protocol a = from scratch at B; b = S steps at B0, then switch.\n")
    for name, t in results["tasks"].items():
        lines.append(f"- **{name}** — {t['description']}; B0 = {t['B0']}, B ∈ {t['batch_sizes']}, "
                     f"S = {t['steps']} steps, initial loss {t['L0']:.3f}, failure level (constant predictor) "
                     f"{t['L_fail']:.3f}.")
    lines.append("")
    for kind in ("sgd", "adam"):
        trs = [t for t in results["results"] if t["optimizer"] == kind]
        if not trs:
            continue
        for budget in ("fixed_step", "fixed_epoch"):
            lines.append(f"## {kind.upper()} — {budget.replace('_', '-')} budget\n")
            head = ["rule"] + [f"{t['task']} {p}" for t in trs for p in ("a", "b")] + ["all"]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            for r in RULES[kind]:
                row = [f"`{r}`"]
                pooled = []
                for t in trs:
                    for p in ("a", "b"):
                        s = t["protocols"][p]["scores"]["summary"][budget][r]
                        row.append(f"{_fmt(s['mean_abs_log2_err'])} · {_fmt(s['frac_in_band'])} · "
                                   f"{s['divergences']} · {_fmt(s['mean_loss_gap'], '.3f')}")
                        pooled += [c for c in t["protocols"][p]["scores"]["cells"]
                                   if c["budget"] == budget and c["rule"] == r]
                errs = [abs(c["log2_err"]) for c in pooled if c["log2_err"] is not None]
                gaps = [c["loss_gap"] for c in pooled if c["loss_gap"] is not None]
                row.append(f"{_fmt(float(np.mean(errs)) if errs else None)} · "
                           f"{_fmt(float(np.mean([bool(c['in_band']) for c in pooled])) if pooled else None)} · "
                           f"{sum(bool(c['diverged']) for c in pooled)} · "
                           f"{_fmt(float(np.mean(gaps)) if gaps else None, '.3f')}")
                lines.append("| " + " | ".join(row) + " |")
            lines.append("\nCells: err · band · div · gap.\n")
    lines.append("## Each rule against the fixed rule (linear for SGD, √ for Adam), cell by cell\n")
    lines.append("Over every scored cell (task × protocol × B ≠ B0) of one optimizer and budget: how "
                 "often the rule's |log2 error| is smaller / larger than the fixed rule's by more than "
                 "0.25 octave (half a lattice step), the mean change of |log2 error| (negative = "
                 "better), the change of the fraction in band, of divergences and of the mean loss gap.\n")
    lines.append("| opt | budget | rule | closer / farther | Δ err (oct) | Δ band | Δ div | Δ gap |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for kind in ("sgd", "adam"):
        trs = [t for t in results["results"] if t["optimizer"] == kind]
        if not trs:
            continue
        for budget in ("fixed_step", "fixed_epoch"):
            for r in RULES[kind]:
                if r == FIXED[kind]:
                    continue
                pairs = []  # (this rule's cell, the fixed rule's cell) for the same task, protocol, B
                for t in trs:
                    for p in ("a", "b"):
                        cs = [c for c in t["protocols"][p]["scores"]["cells"] if c["budget"] == budget]
                        fixed = {c["B"]: c for c in cs if c["rule"] == FIXED[kind]}
                        pairs += [(c, fixed[c["B"]]) for c in cs if c["rule"] == r and c["B"] in fixed
                                  and c["log2_err"] is not None and fixed[c["B"]]["log2_err"] is not None]
                if not pairs:
                    continue
                d = np.array([abs(c["log2_err"]) - abs(f["log2_err"]) for c, f in pairs])
                band = np.mean([bool(c["in_band"]) for c, _ in pairs]) - np.mean([bool(f["in_band"]) for _, f in pairs])
                div = sum(bool(c["diverged"]) for c, _ in pairs) - sum(bool(f["diverged"]) for _, f in pairs)
                gaps = [c["loss_gap"] - f["loss_gap"] for c, f in pairs
                        if c["loss_gap"] is not None and f["loss_gap"] is not None]
                lines.append(f"| {kind} | {budget} | `{r}` | {int((d < -0.25).sum())} / {int((d > 0.25).sum())} "
                             f"of {len(d)} | {d.mean():+.2f} | {band:+.2f} | {div:+d} | "
                             f"{_fmt(float(np.mean(gaps)) if gaps else None, '+.3f')} |")
    lines.append("")
    lines.append("## Oracle LR*(B) relative to the rules' base (octaves), band, largest non-diverging LR\n")
    lines.append("log2 of LR*(B)/base with the band in brackets and the largest non-diverging LR in "
                 "parentheses ('+': the lattice top did not fail). Base: LR*_a(B0) in protocol a, the LR "
                 "used before the switch in protocol b (so the B0 entry of b is the continuation's own "
                 "oracle at B0).\n")
    lines.append("| task | opt | protocol | budget | " + " | ".join(["B / log2 LR*(B)/LR*(B0) [band] (stable)"]) + " |")
    lines.append("|---|---|---|---|---|")
    for t in results["results"]:
        for p in ("a", "b"):
            runs = t["protocols"][p]["runs"]
            for budget in ("fixed_step", "fixed_epoch"):
                # relative to the base the rules multiply: LR*_a(B0) in (a), the prefix LR in (b)
                base = runs[str(t["B0"])]["curves"][budget]["k_star"] if p == "a" else 0.0
                parts = []
                for B in sorted(runs, key=int):
                    c = runs[B]["curves"][budget]
                    if c.get("k_star") is None:
                        parts.append(f"{B}: –")
                        continue
                    o = lambda k, base=base: (k - base) / 2  # noqa: E731
                    parts.append(f"{B}: {o(c['k_star']):+.2f} [{o(c['band_k'][0]):+.2f}, "
                                 f"{o(c['band_k'][1]):+.2f}] ({o(c['k_stable']):+.1f}"
                                 f"{'+' if c['stable_at_top'] else ''})")
                lines.append(f"| {t['task']} | {t['optimizer']} | {p} | {budget} | " + "; ".join(parts) + " |")
    lines.append("\n## Measurements at the switch point (mean over seeds)\n")
    lines.append("| task | opt | LR*_a(B0) | law R²(means) | law used | B* = c/a | B_simple | "
                 "B_noise = tr(HΣ)/GᵀHG | λ(B) for each B | LR·λ(B0)/threshold |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for t in results["results"]:
        ms = t["measurements"]
        r2 = [m["law_r_squared_of_means"] for m in ms]
        used = sum(1 for v in r2 if v is not None and v >= 0.5)
        bstar = [m["law_critical_batch_size"] for m in ms]
        bn = [m["noise"]["B_simple"] for m in ms]
        bh = [m["noise_hess"]["B_noise"] for m in ms]
        lam_keys = sorted(ms[0]["lambda"], key=int)
        lam = "; ".join(f"{B}: {np.mean([m['lambda'][B] for m in ms]):.3g}" for B in lam_keys)
        if t["optimizer"] == "adam":
            lam += " · P⁻¹H: " + "; ".join(f"{B}: {np.mean([m['lambda_precond'][B] for m in ms]):.3g}"
                                            for B in lam_keys)
            edge = t["prefix_lr"] * np.mean([m["lambda_precond"][str(t["B0"])] for m in ms]) / ADAM_THRESHOLD
        else:
            edge = t["prefix_lr"] * np.mean([m["lambda"][str(t["B0"])] for m in ms]) / SGD_THRESHOLD
        lines.append(f"| {t['task']} | {t['optimizer']} | {t['prefix_lr']:.3g} | "
                     f"{', '.join(_fmt(v) for v in r2)} | {used}/{len(ms)} | "
                     f"{', '.join(_fmt(v, '.3g') for v in bstar)} | {', '.join(_fmt(v, '.3g') for v in bn)} | "
                     f"{', '.join(_fmt(v, '.3g') for v in bh)} | "
                     f"{lam} | {edge:.2f} |")
    lines.append("\n## Stability edge: largest non-diverging LR × sharpness(B) / threshold (protocol b, "
                 "fixed-step)\n")
    lines.append("Sharpness measured at the switch point: λ_max(H_B) for SGD (threshold 2(1+μ) = 3.8), "
                 "λ_max(P⁻¹H_B) for Adam (threshold 38). 1.0 means the stability bound is exactly the "
                 "largest LR that trained; '≥' marks a lattice whose top LR did not fail.\n")
    lines.append("| task | opt | B: ratio |")
    lines.append("|---|---|---|")
    for t in results["results"]:
        ms = t["measurements"]
        key = "lambda_precond" if t["optimizer"] == "adam" else "lambda"
        thr = ADAM_THRESHOLD if t["optimizer"] == "adam" else SGD_THRESHOLD
        runs = t["protocols"]["b"]["runs"]
        parts = []
        for B in sorted(runs, key=int):
            c = runs[B]["curves"]["fixed_step"]
            if c.get("k_star") is None:
                continue
            sharp = np.mean([m[key][B] for m in ms])
            ratio = lattice_lr(t["anchor_lr"], c["k_stable"]) * sharp / thr
            parts.append(f"{B}: {'≥' if c['stable_at_top'] else ''}{ratio:.2f}")
        lines.append(f"| {t['task']} | {t['optimizer']} | " + "; ".join(parts) + " |")
    lines.append("\n## Timing\n")
    lines.append("| task | opt | total s | of which switch-point measurements s |")
    lines.append("|---|---|---|---|")
    for t in results["results"]:
        lines.append(f"| {t['task']} | {t['optimizer']} | {t['seconds']:.0f} | {t['measure_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def rescore(results: dict[str, Any]) -> dict[str, Any]:
    """Recompute every rule's LR and score from the stored measurements and loss curves.

    The training runs are not repeated: a rule added to RULES (a pure function of the stored
    measurements) is scored on the lattices already trained; a rule LR outside a lattice is
    scored with the loss at the nearest lattice end (flagged ``outside_grid``).
    """
    results["config"]["rules"] = RULES
    for tr in results["results"]:
        kind, B0 = tr["optimizer"], tr["B0"]
        task_info = results["tasks"][tr["task"]]
        meas = []
        for m in tr["measurements"]:
            m = dict(m)
            m["_law"] = BatchSizeLaw.from_dict(m["law"])
            m["lambda"] = {int(k): v for k, v in m["lambda"].items()}
            m["lambda_precond"] = {int(k): v for k, v in m["lambda_precond"].items()}
            if m["noise"]["B_simple"] is None:  # JSON null: inf (see noise_scale)
                m["noise"]["B_simple"] = math.inf
            if m["noise_hess"]["B_noise"] is None:
                m["noise_hess"]["B_noise"] = math.inf
            meas.append(m)
        for proto in tr["protocols"].values():
            runs = {int(B): r for B, r in proto["runs"].items()}
            rules_at = {}
            for B, old in proto["rules"].items():
                rules_at[int(B)] = rules_for(kind, meas, B0, task_info["n_train"], int(B), old["base_lr"])
            proto["rules"] = {str(B): r for B, r in rules_at.items()}
            proto["scores"] = score_protocol(None, kind, runs, rules_at, tr["anchor_lr"],
                                             L_fail=task_info["L_fail"])
    return _clean(results)


def package_commit() -> str:
    import lr_batch_callback

    root = Path(lr_batch_callback.__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() + (
            "" if root == REPO else f" (package imported from {root})")
    except Exception:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny grids, 1 seed, 8 steps (smoke test)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: benchmarks/results; figures and markdown to "
                         "examples/results in the full run)")
    ap.add_argument("--fig-dir", type=Path, default=None, help="figure/markdown folder (default: --out, "
                    "or examples/results for the full run without --out)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {list(TASKS)}")
    ap.add_argument("--optimizers", default="sgd,adam")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    ap.add_argument("--steps", type=int, default=None, help="override S (steps per budget)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown-only", type=Path, default=None, metavar="JSON",
                    help="regenerate the markdown (and figures) from a results JSON and exit")
    ap.add_argument("--rescore", type=Path, default=None, metavar="JSON",
                    help="recompute the rules and scores of a results JSON from its stored "
                         "measurements and curves (no training), rewrite it, its CSV, figures, markdown")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rescore is not None:
        results = rescore(json.loads(args.rescore.read_text()))
        args.rescore.write_text(json.dumps(results, indent=1))
        write_csv(results, args.rescore.with_suffix(".csv"))
        args.markdown_only = args.rescore
    if args.markdown_only is not None:
        results = json.loads(args.markdown_only.read_text())
        fig_dir = args.fig_dir or args.markdown_only.parent
        (fig_dir / "lr_oracle.md").write_text(markdown(results))
        for name in results["tasks"]:
            plot_task(results, name, fig_dir / f"lr_oracle_{name}.png")
        return 0
    out_dir = args.out or (REPO / "benchmarks" / "results")
    fig_dir = args.fig_dir or (args.out if args.out is not None else REPO / "examples" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick else [0, 1, 2])
    cfg = Config(seeds=seeds, quick=args.quick)
    t_all = time.perf_counter()
    results: dict[str, Any] = {
        "config": {"command": "python " + " ".join(shlex.quote(a) for a in [
            "benchmarks/lr_oracle.py", *(sys.argv[1:] if argv is None else argv)]),
                   "quick": args.quick, "seeds": seeds, "threads": args.threads,
                   "torch": torch.__version__, "python": platform.python_version(),
                   "machine": f"{platform.machine()} {os.cpu_count()} CPU(s)",
                   "package_commit": package_commit(),
                   "started": datetime.datetime.now().isoformat(timespec="seconds"),
                   "momentum": MOMENTUM, "adam_betas": BETAS, "adam_eps": ADAM_EPS,
                   "band_se": BAND_SE, "kill_factor": KILL_FACTOR, "rules": RULES},
        "tasks": {}, "results": [],
    }
    for name in args.tasks.split(","):
        task = TASKS[name](args.quick)
        if args.steps:
            task.steps = args.steps
        init = task.new_model(seeds)
        task.L0 = float(task.objective(init, "train").mean())
        task.L_fail = task.constant_predictor_loss()
        results["tasks"][name] = {"description": task.description, "B0": task.B0,
                                  "batch_sizes": task.batch_sizes, "steps": task.steps,
                                  "n_train": task.n_train, "n_test": int(task.x_test.shape[0]),
                                  "parameters": sum(p[0].numel() for p in init.parameters()),
                                  "L0": task.L0, "L_fail": task.L_fail, "law_samples": task.law_samples,
                                  "lr_guess": task.lr_guess, **task.info}
        for kind in args.optimizers.split(","):
            log(f"== {name} / {kind} ==")
            tr = run_task_optimizer(task, kind, cfg)
            results["results"].append(tr)
            results["wall_seconds"] = time.perf_counter() - t_all
            (out_dir / "lr_oracle.json.tmp").write_text(json.dumps(_clean(results)))  # progress
    results["wall_seconds"] = time.perf_counter() - t_all
    clean = _clean(results)
    (out_dir / "lr_oracle.json").write_text(json.dumps(clean, indent=1))
    tmp = out_dir / "lr_oracle.json.tmp"
    if tmp.exists():
        tmp.unlink()
    write_csv(clean, out_dir / "lr_oracle.csv")
    for name in results["tasks"]:
        plot_task(clean, name, fig_dir / f"lr_oracle_{name}.png")
    (fig_dir / "lr_oracle.md").write_text(markdown(clean))
    log(f"done in {results['wall_seconds']:.1f}s; wrote {out_dir / 'lr_oracle.json'}, "
        f"{fig_dir / 'lr_oracle.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The data sets and the models of the LR-oracle benchmark.

Three tasks (:data:`TASKS`), each a :class:`Task` holding its training and test split, its batch
sizes and budget, and the ensemble model trained on it: :class:`DigitsCNN` on scikit-learn's
digits, :class:`TinyLM` on a random Markov chain, :class:`StudentMLP` on a noisy teacher. An
ensemble is M independent copies of one network evaluated together (every parameter has a
leading model dimension), so all LRs × seeds of one batch size train as one model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TASKS", "DigitsCNN", "Ensemble", "StudentMLP", "Task", "TinyLM", "make_digits",
           "index_stream", "make_lm", "make_teacher", "markov_sequences"]


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


def index_stream(task: Task, seed: int, salt: int, n: int) -> Tensor:
    """The data order of one seed: concatenated random permutations of the training set."""
    g = torch.Generator().manual_seed(1_000_003 * int(seed) + 7919 * int(salt) + 17)
    reps = -(-n // task.n_train)
    return torch.cat([torch.randperm(task.n_train, generator=g) for _ in range(reps)])[:n]


TASKS: dict[str, Callable[[bool], Task]] = {
    "digits_cnn": make_digits, "tiny_lm": make_lm, "noisy_teacher": make_teacher,
}

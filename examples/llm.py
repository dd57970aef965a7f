"""A small Llama-style language model with a batch-size ramp, checkpointing and curvature monitoring.

The model is written in plain PyTorch: RMSNorm, rotary position embeddings, SwiGLU MLPs and
causal fused attention (``F.scaled_dot_product_attention``), every block under non-reentrant
activation checkpointing, a tied output head. It learns next-byte prediction on the Python
standard library's own source files (present on every machine with Python: no download) with
AdamW, while ``BatchSizeRamp`` ramps the batch by optimizer steps (through gradient
accumulation) and ``BatchSizeLRCallback`` rescales the LR by the square root (Adam) and logs the
Hessian's λ_max and the critical sharpness. The loss is a token mean over valid labels
(``-100`` on padding), so micro-batches are weighted by their valid tokens. It ends with a
figure: loss, batch size, LR and λ_max against the step.

Run it (about a minute on a CPU)::

    python examples/llm.py
    python examples/llm.py --steps 200 --ramp 0:8,40:16,80:32
    python examples/llm.py --fast      # a few steps (smoke test)
"""

from __future__ import annotations

import argparse
import sysconfig
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset

from _args import example_parser
from common import accelerator, default_run_dir, make_loggers, read_metrics_csv
from lr_batch_callback import BatchSizeLRCallback, BatchSizeRamp, MonitorConfig

VOCAB = 256  # bytes


def stdlib_corpus(max_bytes: int = 2_000_000) -> Tensor:
    """Bytes of the standard library's ``.py`` files, in sorted order, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:  # a stripped Python without sources: fall back to this file
        chunks = [Path(__file__).read_bytes()]
    return torch.tensor(list(b"\n".join(chunks)[:max_bytes]), dtype=torch.long)


class Windows(Dataset):
    """Fixed windows of ``context + 1`` bytes: ``input_ids`` and next-byte ``labels``."""

    def __init__(self, data: Tensor, context: int) -> None:
        self.data, self.context = data, context
        self.count = (data.numel() - 1) // context

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        chunk = self.data[i * self.context : (i + 1) * self.context + 1]
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


class RMSNorm(nn.Module):
    r""":math:`x / \sqrt{\overline{x^2} + \epsilon} \cdot w`."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x: Tensor, base: float = 10_000.0) -> Tensor:
    """Rotate pairs of channels of ``x`` (batch, heads, time, dim) by position-dependent angles."""
    t, d = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=x.dtype) / d)
    angles = torch.arange(t, device=x.device, dtype=x.dtype)[:, None] * inv[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    """Pre-norm block: causal attention with rotary embeddings, then a SwiGLU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        hidden = 8 * dim // 3
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        x = x + self.out(att.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(L.LightningModule):
    """Byte-level Llama-style LM; the loss is the mean over valid (``!= -100``) label tokens."""

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, lr: float = 3e-3,
                 batch_size: int = 8, gradient_checkpointing: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied head: unit-variance logits would be huge
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lr, self.batch_size = lr, batch_size

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            if self.hparams.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return self.norm(h) @ self.embed.weight.T

    def curvature_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The training loss without logging: what the monitor differentiates."""
        logits = self(batch["input_ids"])
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1),
                               ignore_index=-100)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.curvature_loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def parse_ramp(text: str) -> dict[int, int]:
    """``"0:8,40:16"`` → ``{0: 8, 40: 16}`` (optimizer step: samples per step)."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item]
        return {int(step): int(size) for step, size in pairs}
    except ValueError:
        raise SystemExit(f"--ramp {text!r}: expected step:size pairs, e.g. 0:8,40:16,80:32") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, fast="12 steps, ramp 0:8,4:16 (smoke test)",
                            output_dir="runs/llm-<timestamp>")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps")
    parser.add_argument("--ramp", default="0:8,40:16,80:32",
                        help="batch-size ramp, step:samples-per-step pairs (multiples of 8)")
    parser.add_argument("--context", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--monitor-every", type=int, default=20, help="steps between λ_max")
    return parser.parse_args(argv)


def plot(rows: list[dict[str, float]], path: Path) -> None:
    """Loss, LR factor and λ_max against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, label in zip(axes, ("train_loss", "lr_batch/factor", "hessian/lambda_max"),
                              ("training loss", "LR factor (√ of the batch ratio)", "λ_max"),
                              strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
        if key == "lr_batch/factor" and points:  # logged when it changes: a step function
            points.append((rows[-1].get("step", points[-1][0]), points[-1][1]))
            ax.plot(*zip(*points, strict=True), drawstyle="steps-post")
        elif points:
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None)
        ax.set_xlabel("optimizer step")
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    run_dir = args.output_dir or default_run_dir("llm")
    ramp = {0: 8, 4: 16} if args.fast else parse_ramp(args.ramp)
    steps = 12 if args.fast else args.steps

    per_device = 8
    data = Windows(stdlib_corpus(200_000 if args.fast else 2_000_000), args.context)
    loader = DataLoader(data, batch_size=per_device, shuffle=True, drop_last=True)
    model = TinyLlama(batch_size=per_device)
    callback = BatchSizeLRCallback(
        rule="auto", monitor_every_n_steps=4 if args.fast else args.monitor_every,
        monitor=MonitorConfig(max_overhead=None, density_every=0), verbose=False)
    trainer = L.Trainer(max_steps=steps, accelerator=accelerator(args.device), devices=1,
                        default_root_dir=run_dir, logger=make_loggers(run_dir),
                        callbacks=[BatchSizeRamp(ramp), callback], log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, loader)

    rows = read_metrics_csv(run_dir / "metrics.csv")
    spectra = [r for r in rows if "hessian/lambda_max" in r]
    print(f"\n{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{data.data.numel():,} bytes of the standard library, ramp {ramp}.")
    print(f"Final accumulation {trainer.accumulate_grad_batches} "
          f"({trainer.accumulate_grad_batches * per_device} samples per step), "
          f"LR factor {callback.factors[0]:g} (rule {callback.rule_names[0]}), "
          f"final loss {float(trainer.callback_metrics['train_loss']):.3f}.")
    for r in spectra:
        products = "differences" if r.get("hessian/finite_difference") else "exact"
        print(f"step {int(r['step']):4d}: λ_max {r['hessian/lambda_max']:.4g} ({products})")
    figure = run_dir / "llm.png"
    plot(rows, figure)
    print(f"Figure: {figure}\nMetrics: {run_dir / 'metrics.csv'}")


if __name__ == "__main__":
    main()

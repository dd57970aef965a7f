"""Reproduce the claims of Granziol, Zohren & Roberts (arXiv 2006.09092) at small scale.

1. **Spectra.** The batch Hessian is the empirical Hessian plus a noise matrix whose size falls
   like 1/B: its spectrum broadens and its outliers move out as B shrinks. → SLQ densities
   (:func:`spectral_density`) at several B, all at the same weights: ``spectra_vs_batch.png``.
2. **The law.** ``λ_max(B) ≈ a + c (1/B − 1/N)``; the largest stable SGD learning rate is
   ``2(1+μ)/λ(B)``; the critical batch size is ``B* = c/a``. → Lanczos on random sub-batches
   (:func:`estimate_batch_size_law`): ``lambda_vs_inv_batch.png``.
3. **LR scaling.** From an LR tuned at a reference batch size, SGD should scale linearly and Adam
   by the square root while noise dominates (B ≪ B*), both saturating past B*. → runs across
   batch sizes, the same epochs each, with the linear, √, no-scaling and curvature rules (applied
   by :class:`LRScaler`; the curvature rule through the library's ``CurvatureRule``):
   ``accuracy_vs_batch.png``.

Every number lands in ``results.json`` (``paper_results.py`` holds that data model and the
tables, ``paper_figures.py`` the figures). ``results.md`` is a hand-written verdict around tables generated from the data;
a run rewrites only the generated blocks, so reread the prose after one. Usage::

    python examples/reproduce_paper.py                # digits, 2 CPU cores, 3-4 min: examples/results/
    python examples/reproduce_paper.py --fast         # smoke test, well under a minute: runs/
    python examples/reproduce_paper.py --report-only  # figures and tables from results.json
    python examples/reproduce_paper.py --full --data-dir ~/data --arch vgg16_bn --device cuda
    python examples/reproduce_paper.py --full --fake-data 512 --arch wrn10_1 --fast  # smoke

The default problem is scikit-learn's bundled digits (1,797 8×8 images; no download) with
``models.SmallCNN(width=16)`` (38k parameters; width 8 with ``--fast``). ``--full`` is the paper's
setting, for a GPU: CIFAR-100 (torchvision reads ``--data-dir``; nothing is downloaded) with
``models.VGG16`` (``vgg16``, ``vgg16_bn``) or ``models.WideResNet`` (``wrn28_10``).
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import lr_batch_callback  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _args import example_parser
from lr_batch_callback import (
    BatchSizeLaw,
    LRScaler,
    estimate_batch_size_law,
    scaling_factor,
    spectral_density,
)
from lr_batch_callback.scaling import CurvatureRule, resolve_rule
from models import VGG16, SmallCNN, WideResNet
from paper_results import (
    OPTIMIZERS,
    RULES,
    Config,
    Curvature,
    ProblemInfo,
    Quadrature,
    Results,
    Run,
    describe_machine,
    write_report,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------
# Presets (Config is in paper_results.py: it is part of the data)
# ------------------------------------------------------------------------------------------


def digits_config(fast: bool) -> Config:
    if fast:
        return Config((16, 64), 16, epochs=2, seeds=(0,), sgd_lr=0.05, adam_lr=1e-3, momentum=0.9,
                      weight_decay=0.0, curvature_steps=30, trajectory_steps=(0,), law_pool=256,
                      law_batch_sizes=(8, 32, 256), law_draws=2, spectrum_batch_sizes=(8, 256),
                      density_probes=2, density_steps=10, density_draws=1, lanczos_max_iter=30,
                      sgd_lr_grid=(0.025, 0.05), adam_lr_grid=(1e-3, 4e-3))
    return Config((32, 128, 512), 32, epochs=30, seeds=(0, 1, 2), sgd_lr=0.05, adam_lr=1e-3,
                  momentum=0.9, weight_decay=0.0,
                  curvature_steps=90,  # two epochs: most of the task learnt (~96% test accuracy)
                  trajectory_steps=(0, 20, 45, 180, 300, 600),
                  law_pool=10**9,  # capped at N: the whole training set
                  law_batch_sizes=(8, 32, 128, 512, 10**9), law_draws=10,
                  spectrum_batch_sizes=(8, 32, 128, 512, 10**9), density_probes=2, density_steps=40,
                  density_draws=3, sgd_lr_grid=(0.0125, 0.025, 0.05, 0.1, 0.2),
                  adam_lr_grid=(1e-3, 2e-3, 4e-3, 8e-3))


def full_config(fast: bool, arch: str) -> Config:
    if fast:
        return Config((16, 32), 16, epochs=1, seeds=(0,), sgd_lr=0.05, adam_lr=4e-4, momentum=0.9,
                      weight_decay=5e-4, curvature_steps=4, trajectory_steps=(), law_pool=32,
                      law_batch_sizes=(4, 8, 32), law_draws=2, spectrum_batch_sizes=(4, 32),
                      density_probes=1, density_steps=6, density_draws=1, lanczos_max_iter=12,
                      eval_batch_size=256)
    # The paper's pairs (lr, B): VGG-16 (0.05, 128); VGG-16-BN and WRN-28-10 (0.1, 128);
    # AdamW (4e-4, 128). 300 epochs, momentum 0.9; spectra from 100 Lanczos steps, B up to 1024.
    return Config((128, 256, 512), 128, epochs=300, seeds=(0,), sgd_lr=0.05 if arch == "vgg16" else 0.1,
                  adam_lr=4e-4, momentum=0.9, weight_decay=5e-4, curvature_steps=2000,
                  trajectory_steps=(0,), law_pool=1024, law_batch_sizes=(16, 32, 64, 128, 256, 512, 1024),
                  law_draws=10, spectrum_batch_sizes=(16, 64, 256, 1024), density_probes=1,
                  density_steps=80, density_draws=3)


# ------------------------------------------------------------------------------------------
# Data and models
# ------------------------------------------------------------------------------------------


class Problem:
    """A classification data set held as tensors on the device, and the network to train on it.

    Inputs are normalised with the training set's statistics when a batch is taken; with
    ``augment`` training batches get a random 4-pixel-padded crop and a horizontal flip (the
    usual CIFAR augmentation). Curvature batches are never augmented.
    """

    def __init__(self, name: str, model_name: str, data: Sequence[Tensor],
                 build_model: Callable[[], nn.Module], device: torch.device, augment: bool = False) -> None:
        x_train, y_train, x_test, y_test = data
        self.name, self.model_name, self.device, self.augment = name, model_name, device, augment
        self.build_model = build_model
        self.mean = x_train.float().mean(dim=(0, 2, 3), keepdim=True).to(device)
        self.std = x_train.float().std(dim=(0, 2, 3), keepdim=True).to(device)
        self.x_train, self.y_train = x_train.to(device), y_train.to(device)
        self.x_test, self.y_test = x_test.to(device), y_test.to(device)
        self.num_classes = int(torch.cat([y_train, y_test]).max()) + 1
        self.num_train, self.num_test = len(y_train), len(y_test)

    def validation_split(self, fraction: float, seed: int) -> Problem:
        """The same problem on part of the training set, tested on the held-out rest."""
        train, held_out = stratified_split(self.y_train.cpu(), fraction, seed)
        x, y = self.x_train.cpu(), self.y_train.cpu()
        return Problem(f"{self.name} [validation split]", self.model_name,
                       (x[train], y[train], x[held_out], y[held_out]), self.build_model, self.device,
                       self.augment)

    def batch(self, index: Tensor, train: bool = True, generator: torch.Generator | None = None
              ) -> tuple[Tensor, Tensor]:
        x, y = (self.x_train, self.y_train) if train else (self.x_test, self.y_test)
        index = index.to(self.device)
        inputs = (x[index].float() - self.mean) / self.std
        if train and generator is not None and self.augment:
            inputs = _crop_and_flip(inputs, generator)
        return inputs, y[index]

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled pass over the training set (the last batch may be smaller)."""
        order = torch.randperm(self.num_train, generator=generator)
        for start in range(0, self.num_train, batch_size):
            yield self.batch(order[start:start + batch_size], generator=generator)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int) -> tuple[float, float]:
        """Test accuracy and mean cross-entropy."""
        was_training = model.training
        model.eval()
        correct, total_loss = 0, 0.0
        for start in range(0, self.num_test, batch_size):
            x, y = self.batch(torch.arange(start, min(self.num_test, start + batch_size)), train=False)
            logits = model(x)
            correct += int((logits.argmax(1) == y).sum())
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        model.train(was_training)
        return correct / self.num_test, total_loss / self.num_test


def _crop_and_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(x.device)
    left = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(x.device)
    rows = (top + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left + torch.arange(w, device=x.device))[:, None, None, :]
    crops = padded[torch.arange(n, device=x.device)[:, None, None, None],
                   torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, crops.flip(3), crops)


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The loss whose batch Hessian is measured: mean cross-entropy over the batch."""
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def stratified_split(y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """The split of ``common.stratified_split``; repeated here so that this plain-PyTorch script
    does not import Lightning (which ``common`` does)."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in y.unique():
        index = torch.nonzero(y == label).flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        n_test = round(len(index) * test_fraction)
        test.append(index[:n_test])
        train.append(index[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def digits_problem(fast: bool, device: torch.device) -> Problem:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    train, test = stratified_split(y, test_fraction=0.2, seed=0)
    width = 8 if fast else 16
    return Problem(f"scikit-learn digits (8×8 grey-scale, 10 classes): {len(train)} training / "
                   f"{len(test)} test images, stratified split", f"SmallCNN (width {width})",
                   (x[train], y[train], x[test], y[test]), lambda: SmallCNN(width=width), device)


def build_cifar_model(arch: str, num_classes: int = 100) -> nn.Module:
    """``vgg16``, ``vgg16_bn`` (no dropout: it would add its own noise to the batch Hessian) or
    ``wrn<depth>_<k>`` (e.g. ``wrn28_10``)."""
    if arch in ("vgg16", "vgg16_bn"):
        return VGG16(batch_norm=arch == "vgg16_bn", num_classes=num_classes, dropout=0.0)
    match = re.fullmatch(r"wrn(\d+)_(\d+)", arch)
    if match:
        return WideResNet(int(match.group(1)), int(match.group(2)), num_classes)
    raise SystemExit(f"--arch must be vgg16, vgg16_bn or wrn<depth>_<k> (e.g. wrn28_10), got {arch!r}.")


def cifar_problem(data_dir: str | None, fake_size: int | None, arch: str, device: torch.device) -> Problem:
    build_cifar_model(arch)  # fail on a bad --arch before reading any data
    if fake_size:
        generator = torch.Generator().manual_seed(0)
        n_test = max(fake_size // 5, 10)
        x = torch.randint(0, 256, (fake_size + n_test, 3, 32, 32), generator=generator, dtype=torch.uint8)
        y = torch.randint(0, 100, (fake_size + n_test,), generator=generator)
        name = f"FAKE CIFAR-100-shaped data (uniform noise, random labels): {fake_size} / {n_test}"
        data = (x[:fake_size], y[:fake_size], x[fake_size:], y[fake_size:])
    else:
        if data_dir is None:
            raise SystemExit("--full needs --data-dir (a folder holding cifar-100-python/) or --fake-data N.")
        import torchvision

        try:
            sets = [torchvision.datasets.CIFAR100(data_dir, train=t, download=False) for t in (True, False)]
        except RuntimeError as exc:
            raise SystemExit(f"Cannot read CIFAR-100 from {data_dir!r} ({exc}). Put the extracted "
                             "cifar-100-python/ folder there; this script never downloads.") from None
        x_train, x_test = (torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in sets)
        data = (x_train, torch.tensor(sets[0].targets), x_test, torch.tensor(sets[1].targets))
        name = f"CIFAR-100: {len(data[1])} training / {len(data[3])} test images, crop+flip augmentation"
    return Problem(name, arch, data, lambda: build_cifar_model(arch), device, augment=True)


# ------------------------------------------------------------------------------------------
# Curvature: the weights, the law, the spectra
# ------------------------------------------------------------------------------------------


def make_optimizer(name: str, params: Any, cfg: Config) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.sgd_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.adam_lr, weight_decay=cfg.weight_decay)


def reference_trajectory(problem: Problem, cfg: Config, seed: int, checkpoints: Sequence[int]
                         ) -> Iterator[tuple[int, nn.Module]]:
    """The SGD reference run (B_ref, reference LR, constant), paused at each checkpoint step."""
    torch.manual_seed(seed)
    model = problem.build_model().to(problem.device)
    optimizer = make_optimizer("sgd", model.parameters(), cfg)
    generator = torch.Generator().manual_seed(seed)
    pending, step = sorted(set(checkpoints)), 0
    while pending:
        if pending[0] == step:
            yield step, model
            pending.pop(0)
            continue
        for batch in problem.epoch(cfg.reference_batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            optimizer.step()
            step += 1
            if step == pending[0]:
                break


def measure_curvature(problem: Problem, cfg: Config, model: nn.Module, seed: int, step: int,
                      spectra: bool) -> Curvature:
    """λ_max on random sub-batches of one large batch (the law), then SLQ spectra at the same weights."""
    pool_size = min(cfg.law_pool, problem.num_train)
    generator = torch.Generator().manual_seed(seed + 1000)
    pool = problem.batch(torch.randperm(problem.num_train, generator=generator)[:pool_size].sort().values)
    law = estimate_batch_size_law(
        model, loss_fn, pool, batch_sizes=sorted({min(b, pool_size) for b in cfg.law_batch_sizes}),
        draws=cfg.law_draws, dataset_size=problem.num_train, seed=seed, tol=cfg.lanczos_tol,
        max_iter=cfg.lanczos_max_iter)
    curvature = Curvature(step, problem.evaluate(model, cfg.eval_batch_size)[0], law)
    for size in sorted({min(b, pool_size) for b in cfg.spectrum_batch_sizes} if spectra else ()):
        # Several random sub-batches per B, as the paper does; the whole pool is one batch, so it
        # gets the same number of probes in one run instead.
        whole = size == pool_size
        curvature.spectra[size] = []
        for draw in range(1 if whole else cfg.density_draws):
            index = torch.randperm(pool_size, generator=generator)[:size].sort().values.to(problem.device)
            sd = spectral_density(model, loss_fn, (pool[0][index], pool[1][index]),
                                  num_probes=cfg.density_probes * (cfg.density_draws if whole else 1),
                                  num_steps=cfg.density_steps, seed=seed + 7919 * draw + size)
            curvature.spectra[size].append(Quadrature(sd.nodes.tolist(), sd.weights.tolist(), sd.num_products))
    return curvature


# ------------------------------------------------------------------------------------------
# Training runs
# ------------------------------------------------------------------------------------------


def lr_factor(rule: str, optimizer: torch.optim.Optimizer, reference: int, batch_size: int,
              law: BatchSizeLaw | None) -> float:
    """The rule's factor; the curvature rule goes through the library's own ``CurvatureRule``."""
    if rule != "curvature":
        return scaling_factor(rule, reference, batch_size)
    curvature_rule = resolve_rule("curvature", optimizer)
    assert isinstance(curvature_rule, CurvatureRule) and law is not None
    curvature_rule.law = law
    factor = curvature_rule(reference, batch_size)
    expected = law.lr_factor(reference, batch_size, adaptive=curvature_rule.adaptive)
    if not math.isclose(factor, expected, rel_tol=1e-9):
        raise RuntimeError(f"CurvatureRule gave {factor} but BatchSizeLaw.lr_factor {expected}.")
    return factor


def train(problem: Problem, cfg: Config, optimizer_name: str, rule: str, batch_size: int, seed: int,
          law: BatchSizeLaw | None = None) -> Run:
    """One run: the reference LR (cosine-annealed to 0) times the rule's factor, via LRScaler."""
    start = time.perf_counter()
    torch.manual_seed(seed)  # the same initial weights for every rule and batch size
    model = problem.build_model().to(problem.device)
    optimizer = make_optimizer(optimizer_name, model.parameters(), cfg)
    factor = lr_factor("none" if rule == "reference" else rule, optimizer, cfg.reference_batch_size,
                       batch_size, law)
    scaler = LRScaler(optimizer, factor)
    steps_per_epoch = math.ceil(problem.num_train / batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup
                                                  else 0.5 * (1 + math.cos(math.pi * s / total)))
    generator = torch.Generator().manual_seed(seed)
    diverged, steps = False, 0
    for _ in range(cfg.epochs):
        for batch in problem.epoch(batch_size, generator):
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps += 1
        if diverged:
            break
    scaler.remove()
    acc, test_loss = problem.evaluate(model, cfg.eval_batch_size)
    if diverged or not math.isfinite(test_loss):
        diverged, test_loss = True, math.nan
    base = cfg.sgd_lr if optimizer_name == "sgd" else cfg.adam_lr
    return Run(optimizer_name, rule, batch_size, seed, factor, base * factor, steps, acc, test_loss,
               diverged, diverged or acc <= 1.5 / problem.num_classes, time.perf_counter() - start)


def _describe(run: Run) -> str:
    status = " DIVERGED" if run.diverged else " FAILED" if run.failed else ""
    return (f"  {run.optimizer:4s} {run.rule:9s} B={run.batch_size:<5d} seed={run.seed} LR={run.lr:<8.3g} "
            f"steps={run.steps:5d} acc={run.test_acc:.4f} loss={run.test_loss:.4f}{status} ({run.seconds:.1f}s)")


def tune_reference_lrs(problem: Problem, cfg: Config, log: Callable[[str], None]) -> tuple[Config, list[Run]]:
    """Pick each optimizer's reference LR at B_ref: the lowest validation loss over its grid."""
    validation = problem.validation_split(cfg.validation_fraction, seed=1)
    runs: list[Run] = []
    chosen = {"sgd": cfg.sgd_lr, "adam": cfg.adam_lr}
    for optimizer_name, grid in (("sgd", cfg.sgd_lr_grid), ("adam", cfg.adam_lr_grid)):
        trials = [replace(train(validation, replace(cfg, sgd_lr=lr, adam_lr=lr), optimizer_name, "none",
                                cfg.reference_batch_size, cfg.seeds[0]), rule="tuning") for lr in grid]
        for run in trials:
            log(_describe(run))
        usable = [r for r in trials if not r.failed]
        if usable:
            chosen[optimizer_name] = min(usable, key=lambda r: r.test_loss).lr
        runs += trials
    return replace(cfg, sgd_lr=chosen["sgd"], adam_lr=chosen["adam"]), runs


def train_all(problem: Problem, cfg: Config, law: BatchSizeLaw, log: Callable[[str], None]) -> list[Run]:
    settings = [("reference", cfg.reference_batch_size)]
    settings += [(rule, b) for b in cfg.batch_sizes if b != cfg.reference_batch_size for rule in RULES]
    runs = []
    for optimizer_name in OPTIMIZERS:
        for seed in cfg.seeds:
            for rule, batch_size in settings:
                runs.append(train(problem, cfg, optimizer_name, rule, batch_size, seed, law))
                log(_describe(runs[-1]))
    return runs


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def _comma_separated(kind: type) -> Callable[[str], tuple[Any, ...]]:
    return lambda text: tuple(kind(v) for v in text.split(",") if v.strip())


_PARSERS = {"int": int, "float": float, "tuple[int, ...]": _comma_separated(int),
            "tuple[float, ...]": _comma_separated(float)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    # Its own --device: any torch device name (cuda:1, ...), not only Lightning's accelerators.
    p = example_parser(__doc__, fast="tiny sizes and few steps: a smoke test", device=False,
                       output_dir="examples/results, examples/results/cifar100 with --full, "
                                  "runs/reproduce_paper-<time> with --fast; results.json, results.md "
                                  "and the figures go there")
    p.add_argument("--full", action="store_true", help="CIFAR-100 with VGG-16(-BN) / WRN (a GPU job)")
    p.add_argument("--report-only", action="store_true",
                   help="no training: figures and results.md from <output-dir>/results.json")
    p.add_argument("--data-dir", default=None, help="--full: folder holding cifar-100-python/")
    p.add_argument("--fake-data", type=int, default=None, metavar="N",
                   help="--full: N random CIFAR-shaped training images instead of CIFAR-100 (smoke tests)")
    p.add_argument("--arch", default="vgg16_bn", help="--full: vgg16, vgg16_bn or wrn<depth>_<k>, e.g. wrn28_10")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    group = p.add_argument_group("overrides of the preset (the fields of Config; lists comma-separated)")
    for f in fields(Config):
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_PARSERS[str(f.type)], default=None)
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    cfg = full_config(args.fast, args.arch) if args.full else digits_config(args.fast)
    overrides = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    # An LR given on the command line is used as it is, unless a grid is given too.
    for opt in ("sgd", "adam"):
        if f"{opt}_lr" in overrides:
            overrides.setdefault(f"{opt}_lr_grid", ())
    cfg = replace(cfg, **overrides)
    if "reference_batch_size" not in overrides and cfg.reference_batch_size not in cfg.batch_sizes:
        cfg = replace(cfg, reference_batch_size=min(cfg.batch_sizes))
    if cfg.reference_batch_size not in cfg.batch_sizes:
        cfg = replace(cfg, batch_sizes=tuple(sorted({*cfg.batch_sizes, cfg.reference_batch_size})))
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.output_dir or (Path("runs") / f"reproduce_paper-{datetime.now():%Y%m%d-%H%M%S}" if args.fast
                              else RESULTS_DIR / "cifar100" if args.full else RESULTS_DIR)
    if args.report_only:
        write_report(Results.load(out / "results.json"), out)
        print(f"wrote {out / 'results.md'} and the figures from {out / 'results.json'}")
        return 0
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cfg = build_config(args)
    problem = (cifar_problem(args.data_dir, args.fake_data, args.arch, device) if args.full
               else digits_problem(args.fast, device))
    out.mkdir(parents=True, exist_ok=True)
    given = list(sys.argv[1:] if argv is None else argv)
    command = "python examples/reproduce_paper.py" + (" " + shlex.join(given) if given else "")

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    log(f"{problem.name}; {problem.model_name} on {device}")
    timings, tic = {}, time.perf_counter()
    cfg, tuning = tune_reference_lrs(problem, cfg, log)
    timings["tune"] = time.perf_counter() - tic
    log(f"reference LRs at B={cfg.reference_batch_size}: SGD {cfg.sgd_lr:g}, Adam(W) {cfg.adam_lr:g}")
    tic = time.perf_counter()
    trajectory = []
    for step, model in reference_trajectory(problem, cfg, cfg.seeds[0], [*cfg.trajectory_steps, cfg.curvature_steps]):
        trajectory.append(measure_curvature(problem, cfg, model, cfg.seeds[0], step,
                                            spectra=step == cfg.curvature_steps))
        log(f"step {step:5d}: {trajectory[-1].law.summary()}")
        num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    curvature = next(c for c in trajectory if c.step == cfg.curvature_steps)
    timings["law"] = time.perf_counter() - tic
    tic = time.perf_counter()
    runs = train_all(problem, cfg, curvature.law, log)
    timings["train"] = time.perf_counter() - tic
    timings["total"] = time.perf_counter() - start
    # The curvature entry of the trajectory carries the spectra; keep them once, in `curvature`.
    results = Results(command, describe_machine(device), timings,
                      ProblemInfo(problem.name, problem.model_name, num_params, problem.num_train, problem.num_test),
                      cfg, curvature, [replace(c, spectra={}) for c in trajectory], tuning, runs)
    results.save(out / "results.json")
    write_report(results, out)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and the figures; {timings['total']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())

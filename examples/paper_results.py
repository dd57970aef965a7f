"""The results of ``reproduce_paper.py`` as data, and the figures and tables drawn from them.

A reproduction is one :class:`Results` — its settings (:class:`Config`), the curvature measured
along the reference run (:class:`Curvature`) and every training run (:class:`Run`) — saved as
``results.json`` (NaN where a run diverged, as Python's ``json`` writes it). :func:`write_report`
draws the three figures (``paper_figures.py``) and refills the generated blocks of
``results.md``: the text between ``<!-- generated:NAME -->`` and ``<!-- /generated -->`` is
replaced by the table :data:`TABLES` makes for NAME from the data; everything else (the
hand-written verdict) is left alone. A folder without ``results.md`` gets a skeleton.

Not meant to be run; ``reproduce_paper.py`` imports it (``--report-only`` uses it alone).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lr_batch_callback import BatchSizeLaw

OPTIMIZERS = ("sgd", "adam")
NAMES = {"sgd": "SGD", "adam": "Adam"}
RULES = ("linear", "sqrt", "none", "curvature")
#: The header of the training table in results.md (the smoke test looks for it).
TABLE_HEADER = ("| optimizer | rule | B | LR factor | LR | LR / LR_max(B) | LR / LR_max(B), peak | steps "
                "| test accuracy | test loss | failed |")
#: A scaled run "keeps the reference accuracy" when its mean is at most this far below it.
KEEP_TOLERANCE = 0.01


@dataclass
class Config:
    """Everything a reproduction depends on (presets and ``--<field-name>`` overrides: reproduce_paper.py)."""

    batch_sizes: tuple[int, ...]            # training batch sizes (the reference among them)
    reference_batch_size: int               # the batch size the learning rates are tuned for
    epochs: int                             # the same for every run: larger B, fewer steps
    seeds: tuple[int, ...]                  # one run per seed and setting
    sgd_lr: float                           # reference learning rates
    adam_lr: float
    momentum: float                         # SGD heavy-ball momentum
    weight_decay: float                     # SGD: L2; Adam: decoupled (AdamW)
    curvature_steps: int                    # reference-SGD steps before the curvature is measured
    trajectory_steps: tuple[int, ...]       # further steps at which the law alone is measured
    law_pool: int                           # samples of the large batch the sub-batches come from
    law_batch_sizes: tuple[int, ...]        # sub-batch sizes for λ_max(B)
    law_draws: int                          # random sub-batches per size
    spectrum_batch_sizes: tuple[int, ...]   # sub-batch sizes for the spectral densities
    density_probes: int                     # Rademacher probes per sub-batch
    density_steps: int                      # Lanczos steps per probe
    density_draws: int                      # random sub-batches per B for the spectra
    lanczos_tol: float = 1e-3
    lanczos_max_iter: int = 100
    eval_batch_size: int = 1000
    warmup_epochs: float = 0.0              # linear LR warm-up of every run (0: none)
    sgd_lr_grid: tuple[float, ...] = ()     # tune the reference LR over these at B_ref (empty: keep sgd_lr)
    adam_lr_grid: tuple[float, ...] = ()
    validation_fraction: float = 0.2        # of the training set, held out for that tuning


@dataclass
class Quadrature:
    """The SLQ quadrature of one random sub-batch: nodes and weights, one row per probe."""

    nodes: list[list[float]]
    weights: list[list[float]]
    num_products: int

    @property
    def top_ritz_value(self) -> float:
        return float(np.array(self.nodes)[np.array(self.weights) > 0].max())

    @property
    def mean(self) -> float:
        """(Σ weights × nodes) / probes: the estimate of tr(H_B)/P."""
        return float((np.array(self.weights) * np.array(self.nodes)).sum() / len(self.nodes))


@dataclass
class Curvature:
    """The curvature measured at one point of the SGD reference run."""

    step: int                               # reference-SGD steps before the measurement
    test_accuracy: float                    # of the measured weights
    law: BatchSizeLaw                       # every single draw is in law.batch_sizes/eigenvalues
    spectra: dict[int, list[Quadrature]] = field(default_factory=dict)  # B -> one per sub-batch

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Curvature:
        return cls(data["step"], data["test_accuracy"], BatchSizeLaw.from_dict(data["law"]),
                   {int(b): [Quadrature(**q) for q in draws] for b, draws in data["spectra"].items()})


@dataclass
class ProblemInfo:
    """The data set and the network of a reproduction."""

    name: str
    model: str
    num_params: int
    num_train: int
    num_test: int


def per_batch_size(law: BatchSizeLaw) -> dict[int, tuple[float, float, int]]:
    """``B -> (mean, standard deviation, draws)`` of the λ_max measured at each sub-batch size."""
    sizes, values = np.array(law.batch_sizes), np.array(law.eigenvalues)
    out = {}
    for b in sorted({int(s) for s in sizes}):
        v = values[sizes == b]
        out[b] = (float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size))
    return out


@dataclass
class Run:
    """One training run and how it ended."""

    optimizer: str
    rule: str                               # a rule of RULES, "reference" or "tuning"
    batch_size: int
    seed: int
    factor: float
    lr: float
    steps: int
    test_acc: float
    test_loss: float
    diverged: bool                          # the loss became inf or NaN
    failed: bool                            # diverged, or ended near chance accuracy
    seconds: float


@dataclass
class Results:
    """Everything one reproduction measured: written as ``results.json``, read back by ``--report-only``."""

    command: str
    machine: str
    timings: dict[str, float]               # seconds: tune, law, train, total
    problem: ProblemInfo
    config: Config
    curvature: Curvature                    # at cfg.curvature_steps, with spectra
    trajectory: list[Curvature]             # the law along the reference run (that point included), no spectra
    tuning: list[Run]
    runs: list[Run]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Results:
        data = json.loads(path.read_text())
        config = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["config"].items()})
        return cls(data["command"], data["machine"], data["timings"], ProblemInfo(**data["problem"]), config,
                   Curvature.from_json(data["curvature"]), [Curvature.from_json(c) for c in data["trajectory"]],
                   [Run(**r) for r in data["tuning"]], [Run(**r) for r in data["runs"]])

    def select(self, optimizer: str, rule: str, batch_size: int) -> list[Run]:
        return [r for r in self.runs if (r.optimizer, r.rule, r.batch_size) == (optimizer, rule, batch_size)]

    def summary(self, optimizer: str, rule: str, batch_size: int) -> tuple[float, float, float, float, int, int]:
        """(mean accuracy, its std, mean test loss, its std, failed runs, runs) of one setting."""
        chosen = self.select(optimizer, rule, batch_size)
        acc, loss = np.array([r.test_acc for r in chosen]), np.array([r.test_loss for r in chosen])
        return (float(acc.mean()), _std(acc), float(loss.mean()), _std(loss), sum(r.failed for r in chosen),
                len(chosen))

    def peak_max_lr(self, batch_size: int) -> float:
        """2(1+μ)/λ(B) with the largest λ(B) that any law measured along the reference run predicts."""
        peak = max(point.law.predict(batch_size) for point in self.trajectory)
        return 2 * (1 + self.config.momentum) / peak if peak > 0 else math.inf


def describe_machine(device: torch.device) -> str:
    """OS, CPU, torch and the device, for the record."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} logical CPUs, torch "
            f"{torch.__version__} with {torch.get_num_threads()} thread(s), device `{device}`{gpu}")


def _std(values: Any) -> float:
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if values.size > 1 else 0.0


def _pm(mean: float, std: float, digits: int, scale: float = 1.0) -> str:
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}" if math.isfinite(mean) else "—"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    align = align or "-" + ":" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == ":" else "---" for a in align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _n(b: int, n: int) -> str:
    return f"{b} (N)" if b == n else str(b)


def run_block(res: Results) -> str:
    cfg, cur, t = res.config, res.curvature, res.timings
    return "\n".join([
        f"- **Command:** `{res.command}`",
        f"- **Machine:** {res.machine}",
        f"- **Elapsed:** {t['total']:.0f} s in all (reference-LR tuning {t['tune']:.0f} s, curvature along "
        f"the reference run incl. spectra {t['law']:.0f} s, training runs {t['train']:.0f} s)",
        f"- **Data:** {res.problem.name}",
        f"- **Model:** {res.problem.model}, P = {res.problem.num_params:,} parameters",
        f"- **Curvature:** Hessian of the mean cross-entropy at the weights of the SGD reference run (B = "
        f"{cfg.reference_batch_size}, LR {cfg.sgd_lr:g}, momentum {cfg.momentum:g}, constant LR) after "
        f"**{cur.step} steps** (test accuracy {100 * cur.test_accuracy:.1f}%); sub-batches drawn without "
        f"replacement from {min(cfg.law_pool, res.problem.num_train)} training samples, {cfg.law_draws} "
        f"per size; Lanczos tol {cfg.lanczos_tol:g}, at most {cfg.lanczos_max_iter} steps.",
        f"- **Training:** SGD LR {cfg.sgd_lr:g} (momentum {cfg.momentum:g}) and Adam(W) LR {cfg.adam_lr:g} at "
        f"B = {cfg.reference_batch_size}, weight decay {cfg.weight_decay:g}, cosine decay to 0"
        + (f" after {cfg.warmup_epochs:g} warm-up epoch(s)" if cfg.warmup_epochs else ", no warm-up")
        + f", **{cfg.epochs} epochs for every run**, seeds {list(cfg.seeds)}.",
    ])


def spectra_table(res: Results) -> str:
    rows = []
    for b, draws in sorted(res.curvature.spectra.items()):
        tops = [q.top_ritz_value for q in draws]
        rows.append([_n(b, res.problem.num_train), len(draws), _pm(np.mean(tops), _std(tops), 3),
                     f"{np.mean([q.mean for q in draws]):.3g}", sum(q.num_products for q in draws)])
    return _table(["B", "sub-batches", "top Ritz value (SLQ), mean ± std", "spectral mean tr(H_B)/P",
                   "SLQ products"], rows)


def law_block(res: Results) -> str:
    law, mu, n = res.curvature.law, res.config.momentum, res.problem.num_train
    rows = [[_n(b, n), k, _pm(m, s, 3), f"{law.predict(b):.4g}", f"{law.max_learning_rate(b, mu):.3g}"]
            for b, (m, s, k) in per_batch_size(law).items()]
    return "\n".join([
        f"- **a = λ_emp = {law.lambda_emp:.4g} ± {law.lambda_emp_stderr:.2g}**, **c = {law.noise_coefficient:.4g}"
        f" ± {law.noise_coefficient_stderr:.2g}** (HC3 standard errors), **R² = {law.r_squared:.3f}** over "
        f"{len(law.eigenvalues)} single draws, **{law.r_squared_of_means:.3f} against the per-B means**; N = {n}",
        f"- **B\\* = c/a = {law.critical_batch_size:.3g}**; noise scale Pσ² = a·c = {law.noise_scale:.4g}", "",
        _table(["B", "draws", "λ_max mean ± std", "law λ(B)", f"LR_max(B) = 2(1+μ)/λ(B), μ = {mu:g}"], rows)])


def trajectory_table(res: Results) -> str:
    ref_b = res.config.reference_batch_size
    others = [b for b in res.config.batch_sizes if b != ref_b]

    def factor(law: BatchSizeLaw, b: int) -> str:
        try:
            return f"{law.lr_factor(ref_b, b):.3g}"
        except ValueError:  # the law predicts no positive curvature there
            return "—"

    rows = [[f"{p.step}{' **(used)**' if p.step == res.curvature.step else ''}", f"{100 * p.test_accuracy:.1f}%",
             f"{p.law.lambda_emp:.3g}", f"{p.law.noise_coefficient:.3g}", f"{p.law.r_squared:.3f}",
             f"{p.law.r_squared_of_means:.3f}", f"{p.law.critical_batch_size:.3g}",
             *(factor(p.law, b) for b in others)] for p in sorted(res.trajectory, key=lambda p: p.step)]
    return _table(["step", "test acc.", "a", "c", "R² (draws)", "R² (means)", "B*",
                   *(f"SGD factor {ref_b}→{b}" for b in others)], rows)


def tuning_table(res: Results) -> str:
    if not res.tuning:
        return "(no tuning: the reference LRs were given)"
    chosen = {"sgd": res.config.sgd_lr, "adam": res.config.adam_lr}
    rows = [[NAMES[r.optimizer], f"{r.lr:g}", f"{100 * r.test_acc:.1f}%",
             (f"{r.test_loss:.4f}" if math.isfinite(r.test_loss) else "—")
             + (" (diverged)" if r.diverged else " (failed)" if r.failed else ""),
             "**yes**" if r.lr == chosen[r.optimizer] else ""] for r in res.tuning]
    return _table(["optimizer", "LR", "validation accuracy", "validation loss", "chosen"], rows, align="-:::-")


def training_table(res: Results) -> str:
    cfg, law = res.config, res.curvature.law
    others = [b for b in cfg.batch_sizes if b != cfg.reference_batch_size]
    rows = []
    for opt in OPTIMIZERS:
        for rule, b in [("reference", cfg.reference_batch_size)] + [(rule, b) for b in others for rule in RULES]:
            acc, acc_sd, loss, loss_sd, failed, count = res.summary(opt, rule, b)
            run = res.select(opt, rule, b)[0]
            ratios = ([f"{run.lr / law.max_learning_rate(b, cfg.momentum):.2f}", f"{run.lr / res.peak_max_lr(b):.2f}"]
                      if opt == "sgd" else ["—", "—"])
            rows.append([NAMES[opt], rule, b, f"{run.factor:.3g}", f"{run.lr:.3g}", *ratios, run.steps,
                         f"{_pm(acc, acc_sd, 1, 100)} %", _pm(loss, loss_sd, 3), f"{failed}/{count}"])
    return _table(TABLE_HEADER.strip("| ").split(" | "), rows, align="--" + ":" * 9)


def change_table(res: Results) -> str:
    """Final test accuracy of each scaled setting against the reference run's, in percentage points."""
    ref_b = res.config.reference_batch_size
    rows = []
    for opt in OPTIMIZERS:
        ref_acc = res.summary(opt, "reference", ref_b)[0]
        for b in (b for b in res.config.batch_sizes if b != ref_b):
            cells = []
            for rule in RULES:
                acc, *_, failed, _ = res.summary(opt, rule, b)
                kept = acc >= ref_acc - KEEP_TOLERANCE and not failed
                cells.append(f"{100 * (acc - ref_acc):+.1f} {'✓' if kept else '✗'}{' †' if failed else ''}")
            rows.append([NAMES[opt], b, *cells, max(RULES, key=lambda rule: res.summary(opt, rule, b)[0])])
    return _table(["optimizer", "B", *RULES, "best"], rows)


#: The generated blocks of results.md, in the order of a fresh file: name -> table from the data.
TABLES: dict[str, Callable[[Results], str]] = {
    "run": run_block, "spectra": spectra_table, "law": law_block, "trajectory": trajectory_table,
    "tuning": tuning_table, "training": training_table, "change": change_table,
}


#: Headings and figures placed before a block in a fresh results.md.
_SKELETON_HEADINGS = {
    "spectra": "## 1. Batch-Hessian spectra\n\n![spectra](spectra_vs_batch.png)",
    "law": "## 2. The law λ(B) = a + c (1/B − 1/N)\n\n![law](lambda_vs_inv_batch.png)",
    "tuning": "## 3. Learning-rate scaling across batch sizes\n\n![accuracy](accuracy_vs_batch.png)",
}


def skeleton(names: list[str]) -> str:
    """A results.md with every generated block and a place for the hand-written verdict."""
    parts = ["# Reproducing Granziol, Zohren & Roberts (arXiv 2006.09092)", "",
             "Tables generated by `examples/reproduce_paper.py` from `results.json`."]
    for name in names:
        if name in _SKELETON_HEADINGS:
            parts += ["", _SKELETON_HEADINGS[name]]
        parts += ["", f"<!-- generated:{name} -->", "<!-- /generated -->"]
    return "\n".join(parts + ["", "## Verdict", "", "(To be written by hand from the tables.)", ""])


def write_report(res: Results, out: Path) -> None:
    """The figures, and results.md: the generated blocks of the existing file (or a skeleton) refilled."""
    from paper_figures import plot_accuracy, plot_law, plot_spectra  # matplotlib: imported when drawing

    plot_spectra(res, out / "spectra_vs_batch.png")
    plot_law(res, out / "lambda_vs_inv_batch.png")
    plot_accuracy(res, out / "accuracy_vs_batch.png")
    path = out / "results.md"
    blocks = {name: table(res) for name, table in TABLES.items()}
    text = path.read_text() if path.is_file() else skeleton(list(blocks))
    text = re.sub(r"(<!-- generated:(\w+) -->\n).*?(<!-- /generated -->)",
                  lambda m: m.group(1) + (blocks[m.group(2)] + "\n" if m.group(2) in blocks else "") + m.group(3),
                  text, flags=re.DOTALL)
    path.write_text(text)

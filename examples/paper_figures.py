"""The figures of ``reproduce_paper.py``, drawn from its :class:`~paper_results.Results` alone.

- ``spectra_vs_batch.png`` (:func:`plot_spectra`): SLQ densities of the batch Hessian at each B;
- ``lambda_vs_inv_batch.png`` (:func:`plot_law`): λ_max of the sub-batches and the fitted law,
  against 1/B − 1/N and against B;
- ``accuracy_vs_batch.png`` (:func:`plot_accuracy`): final test error per rule and batch size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lr_batch_callback.engine.density import broaden
from paper_results import KEEP_TOLERANCE, OPTIMIZERS, RULES, Results, per_batch_size


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(res: Results, path: Path) -> None:
    plt, cfg, spectra, n = _pyplot(), res.config, res.curvature.spectra, res.problem.num_train
    tensors = {b: [(torch.tensor(q.nodes, dtype=torch.float64), torch.tensor(q.weights, dtype=torch.float64))
                   for q in draws] for b, draws in spectra.items()}
    live = torch.cat([nodes[weights > 0] for draws in tensors.values() for nodes, weights in draws])
    lo, hi = float(live.min()), float(live.max())
    sigma = 0.006 * (hi - lo)  # one broadening width for every B, so the curves compare
    grid = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, 4000, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(9.0, 5.6))
    peak = 0.0
    for color, size in zip(plt.cm.viridis(np.linspace(0.0, 0.85, len(spectra))), sorted(spectra), strict=True):
        # Rows are probes: stacking every draw's rows averages the densities over the draws.
        nodes, weights = (torch.cat([pair[i] for pair in tensors[size]]) for i in (0, 1))
        _, density, _ = broaden(nodes, weights, sigma, grid=grid)
        top = float(np.mean([q.top_ritz_value for q in spectra[size]]))
        label = f"B = {size} (all N)" if size == n else f"B = {size}"
        ax.semilogy(grid.numpy(), density.clamp_min(1e-300).numpy(), color=color, lw=1.6,
                    label=f"{label}: top Ritz value {top:.3g}")
        ax.axvline(top, color=color, ls=":", lw=1.2)
        peak = max(peak, float(density.max()))
    ax.set_ylim(peak * 1e-7, peak * 5)  # outliers weigh ~1/P per probe: 1e-7 of the bulk keeps them
    ax.set_xlabel("eigenvalue λ of the batch Hessian ∇²L_B   [nats / (unit weight)²]")
    ax.set_ylabel("spectral density   [1 / unit of λ, log scale]")
    draws = f"{cfg.density_draws} sub-batches per B × " if cfg.density_draws > 1 else ""
    ax.set_title(f"Batch-Hessian spectral density against batch size B, all at the same weights\n"
                 f"{res.problem.model}, P = {res.problem.num_params:,}, after {res.curvature.step} SGD "
                 f"steps\nSLQ: {draws}{cfg.density_probes} probe(s) × {cfg.density_steps} Lanczos steps, "
                 f"Gaussian broadening σ = {sigma:.3g}", fontsize=10)
    ax.legend(fontsize=8.5, loc="upper right", title_fontsize=8.5, title="dotted: top Ritz value"
              + (", mean over sub-batches" if cfg.density_draws > 1 else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_law(res: Results, path: Path) -> None:
    plt, law, n = _pyplot(), res.curvature.law, res.problem.num_train
    sizes, values = np.array(law.batch_sizes), np.array(law.eigenvalues)
    stats = per_batch_size(law)
    distinct = np.array(sorted(stats))
    means, stds = (np.array([stats[b][i] for b in distinct]) for i in (0, 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.0, 5.0), gridspec_kw={"width_ratios": [1.15, 1]})
    # Left: against 1/B - 1/N, where the law is a straight line.
    x, xm = np.maximum(1 / sizes - 1 / n, 0), np.maximum(1 / distinct - 1 / n, 0)
    left.scatter(x, values, s=14, color="tab:blue", alpha=0.35, label="one random sub-batch (Lanczos)")
    left.errorbar(xm, means, yerr=stds, fmt="o", color="tab:blue", ms=6, capsize=4,
                  label="mean ± std over sub-batches")
    line = np.linspace(0, max(float(x.max()), 1e-12) * 1.03, 200)
    left.plot(line, law.lambda_emp + law.noise_coefficient * line, color="tab:red", lw=1.8,
              label="fit λ(B) = a + c (1/B − 1/N)")
    left.text(0.03, 0.97, f"a = λ_emp = {law.lambda_emp:.3g} ± {law.lambda_emp_stderr:.2g}\n"
              f"c = {law.noise_coefficient:.3g} ± {law.noise_coefficient_stderr:.2g}\n"
              f"R² = {law.r_squared:.3f} over {len(values)} single draws\n"
              f"   ({law.r_squared_of_means:.3f} against the per-B means)\n"
              f"B* = c/a = {law.critical_batch_size:.3g}\nN = {n}, P = {res.problem.num_params:,}",
              transform=left.transAxes, va="top", fontsize=9,
              bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9})
    left.set_xlabel("1/B − 1/N   [1 / samples]")
    left.set_ylabel("top eigenvalue λ_max of the batch Hessian   [nats / (unit weight)²]")
    left.set_title("λ_max against 1/B − 1/N: the law is a straight line", fontsize=10)
    left.legend(fontsize=8.5, loc="lower right")
    # Right: the same against B, where the saturation at a past B* shows.
    right.scatter(sizes, values, s=14, color="tab:blue", alpha=0.35)
    right.errorbar(distinct, means, yerr=stds, fmt="o", color="tab:blue", ms=6, capsize=4)
    grid = np.geomspace(distinct.min(), n, 200)
    right.plot(grid, law.predict(grid), color="tab:red", lw=1.8, label="fitted law λ(B)")
    right.axhline(law.lambda_emp, color="grey", ls="--", lw=1, label=f"a = λ_emp = {law.lambda_emp:.3g}")
    if math.isfinite(law.critical_batch_size) and law.critical_batch_size > 0:
        right.axvline(law.critical_batch_size, color="tab:green", ls=":", lw=1.5,
                      label=f"B* = c/a = {law.critical_batch_size:.3g}")
    right.set_xscale("log", base=2)
    right.set_xlabel("batch size B   [samples, log scale]")
    right.set_ylabel("λ_max   [nats / (unit weight)²]")
    right.set_title("the same against B: λ(B) saturates at a past B*", fontsize=10)
    right.legend(fontsize=8.5, loc="upper right")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"Top batch-Hessian eigenvalue against batch size, all at the same weights "
                 f"({res.problem.model}, after {res.curvature.step} SGD steps)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(res: Results, path: Path) -> None:
    plt, cfg = _pyplot(), res.config
    floor = 100 / (2 * res.problem.num_test)  # half a test image: where 0 errors are drawn
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    styles = {"linear": "o-", "sqrt": "s-", "none": "x--", "curvature": "D-"}
    sizes = [cfg.reference_batch_size] + [b for b in cfg.batch_sizes if b != cfg.reference_batch_size]
    for ax, optimizer_name in zip(axes, OPTIMIZERS, strict=True):
        ref = res.summary(optimizer_name, "reference", cfg.reference_batch_size)
        for i, rule in enumerate(RULES):
            stats = [ref] + [res.summary(optimizer_name, rule, b) for b in sizes[1:]]
            error = np.array([max(100 * (1 - st[0]), floor) for st in stats])
            spread = np.array([100 * st[1] for st in stats])
            shift = 2 ** ((i - 1.5) * 0.04)  # small horizontal offsets so the error bars do not overlap
            ax.errorbar(np.array(sizes) * shift, error, yerr=[np.minimum(spread, error - floor * 0.99), spread],
                        fmt=styles[rule], capsize=3, label=rule, alpha=0.85)
        ax.axhline(max(100 * (1 - ref[0]), floor), color="black", lw=0.8, label="reference (B_ref)")
        ax.axhline(100 * (1 - ref[0] + KEEP_TOLERANCE), color="grey", ls=":", lw=1,
                   label=f"reference + {100 * KEEP_TOLERANCE:g} pp")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("batch size B   [samples, log scale]")
        name = f"SGD (momentum {cfg.momentum:g})" if optimizer_name == "sgd" else "Adam(W)"
        lr = cfg.sgd_lr if optimizer_name == "sgd" else cfg.adam_lr
        ax.set_title(f"{name}: reference LR {lr:g} at B = {cfg.reference_batch_size}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("final test error   [%, log scale]")
    axes[1].legend(fontsize=8, title="LR rule", loc="upper left")
    fig.suptitle(f"{res.problem.model}: final test error after {cfg.epochs} epochs per run (larger B = "
                 f"fewer steps), mean ± std over {len(cfg.seeds)} seed(s); 90% error = chance", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

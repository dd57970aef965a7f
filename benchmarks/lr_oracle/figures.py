"""The figures: per task, final loss against LR for every batch size, and LR*(B) against the rules."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lr_oracle.rules import RULES
from benchmarks.lr_oracle.scoring import lattice_k, lattice_lr

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


"""The oracle of one lattice curve and the scores of the rules against it.

LRs live on the lattice LR_k = anchor · 2^(k/2) (:func:`lattice_lr`, :func:`lattice_k`).
:func:`analyze_curve` reads the oracle LR*, its band and the stability edge off the mean final
losses of a lattice; :func:`score_rule` measures one rule LR against them and
:func:`score_protocol` tables every rule over the batch sizes of one protocol. :func:`rescore`
re-applies the rules to the measurements and curves stored in a full results JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.lr_oracle.rules import RULES, rules_for
from lr_batch_callback import BatchSizeLaw

BAND_SE = 2.0


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




def curve_of(points: dict[int, dict[str, Any]], budget: str, L0: float) -> dict[str, Any]:
    ks = sorted(points)
    loss = np.array([points[k][budget]["train"] for k in ks], dtype=float)
    failed = np.array([points[k][budget]["failed"] for k in ks], dtype=bool)
    return analyze_curve(ks, loss, failed, L0)


def score_protocol(kind: str, runs: dict[int, Any], rules_at: dict[int, Any], anchor: float,
                   L_fail: float) -> dict[str, Any]:
    """Every rule's cell (B ≠ B0, budget) against the oracle, and the per-rule means."""
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



def rescore(results: dict[str, Any]) -> dict[str, Any]:
    """Recompute every rule's LR and score from the stored measurements and loss curves.

    The training runs are not repeated: a rule added to RULES (a pure function of the stored
    measurements) is scored on the lattices already trained; a rule LR outside a lattice is
    scored with the loss at the nearest lattice end (flagged ``outside_grid``). Needs a full
    results JSON (the measurements); the result is not yet JSON-safe (``report.clean``).
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
            proto["scores"] = score_protocol(kind, runs, rules_at, tr["anchor_lr"], task_info["L_fail"])
    return results

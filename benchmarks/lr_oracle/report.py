"""The outputs: the results JSON, its compact summary, the CSV of scored cells, the markdown.

A run writes the full results (``lr_oracle.json``: every training run's per-seed losses, every
measurement; megabytes, not committed), the CSV of every scored cell, and the summary
(``lr_oracle_summary.json``, committed, :func:`summarize`): the per-rule score tables with their
cells, the oracle curves (mean and standard error per lattice LR) and the measurements the report
shows, the cells and curves rounded to :data:`DIGITS` significant digits. :func:`markdown`, the
figures and :func:`write_csv` read either file (:func:`load_results`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from benchmarks.lr_oracle.rules import ADAM_THRESHOLD, FIXED, RULES, SGD_THRESHOLD
from benchmarks.lr_oracle.scoring import lattice_lr

SUMMARY_FORMAT = "lr_oracle_summary/1"
DIGITS = 6  # significant digits of the summary's cells and curves
WIDTH = 2000  # the longest line of the summary that holds more than one value
PACK = 100  # short entries are packed into lines of at most this many characters
TIE = 1e-9  # octaves: differences of |log2 error| this close to the half-step are rounding
# One summary line per rule and budget: the score and its cells, one entry per batch size.
CELL_FIELDS = ("B", "lr_rule", "log2_err", "in_band", "diverged", "loss_gap")
# What the report reads of an oracle curve (its lattice: coordinates, mean and standard error of
# the final loss, no failed seed; the oracle, its band and the largest non-diverging LR).
CURVE_FIELDS = ("k", "mean", "se", "ok", "k_star", "best_mean", "band_k", "k_stable", "stable_at_top")
MEASUREMENT_FIELDS = ("seed", "law_r_squared_of_means", "law_critical_batch_size", "law_edge",
                      "lambda", "lambda_precond", "lanczos_converged", "critical", "critical_update",
                      "critical_converged", "noise", "noise_hess",
                      "seconds")


# -- JSON ------------------------------------------------------------------------------------------
def clean(obj: Any) -> Any:
    """JSON-safe: str keys, no NaN/inf (null), no tensors; keys starting with _ are dropped."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Tensor):
        return clean(obj.tolist())
    return obj


def _rounded(obj: Any, in_list: bool = False) -> Any:
    """The numbers of lists (curves, cells) to DIGITS significant digits, whole ones (lattice
    coordinates) as integers; single numbers (scores, measurements) as they are."""
    if isinstance(obj, float):
        if obj.is_integer() and abs(obj) < 2**53:
            return int(obj)
        return float(f"{obj:.{DIGITS}g}") if in_list else obj
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, True) for v in obj]
    return obj


def dumps_compact(obj: Any, indent: int = 0) -> str:
    """JSON with every object or list that fits in :data:`WIDTH` characters on one line (a
    score with its cells, a lattice run with its curves, a measurement), and the short entries
    of the others packed together: few lines, each a unit that a rerun changes as a whole."""
    line = json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))
    if len(line) <= WIDTH or not isinstance(obj, (dict, list)) or not obj:
        return line
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, list):
        items = [dumps_compact(v, indent + 1) for v in obj]
    else:
        items = [f"{json.dumps(k, ensure_ascii=False)}: {dumps_compact(v, indent + 1)}"
                 for k, v in obj.items()]
    lines: list[str] = []
    for item in items:  # consecutive short one-line entries share a line
        if lines and "\n" not in item and len(item) <= PACK and "\n" not in lines[-1] \
                and len(lines[-1]) + len(item) + 2 <= PACK:
            lines[-1] += ", " + item
        else:
            lines.append(item)
    opening, closing = ("[", "]") if isinstance(obj, list) else ("{", "}")
    return opening + "\n" + ",\n".join(inner + x for x in lines) + "\n" + pad + closing


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The compact summary of JSON-safe full results (see the module docstring).

    Left out: the per-seed losses of every lattice point, the per-seed rule factors, the raw
    data of each fitted law and its warnings, and what can be recomputed from what is kept (the
    rule LRs' factors, each cell's LR*): :func:`expand_summary` restores those.
    """
    out: dict[str, Any] = {"format": SUMMARY_FORMAT}
    out.update({k: v for k, v in results.items() if k not in ("results", "format")})
    out["results"] = []
    for tr in results["results"]:
        t = {k: v for k, v in tr.items() if k not in ("measurements", "protocols")}
        t["measurements"] = [{k: m[k] for k in MEASUREMENT_FIELDS if k in m} for m in tr["measurements"]]
        t["protocols"] = {}
        for name, p in tr["protocols"].items():
            runs = {B: {"budget_steps": run["budget_steps"], "rounds": run["rounds"], "seconds": run["seconds"],
                        "curves": {b: {k: c[k] for k in CURVE_FIELDS if k in c} for b, c in run["curves"].items()}}
                    for B, run in p["runs"].items()}
            scores: dict[str, Any] = {}
            for budget, per_rule in p["scores"]["summary"].items():
                scores[budget] = {}
                for rule, score in per_rule.items():
                    cells = [c for c in p["scores"]["cells"] if c["budget"] == budget and c["rule"] == rule]
                    scores[budget][rule] = {**score, **{f: [c[f] for c in cells] for f in CELL_FIELDS}}
            t["protocols"][name] = {"seconds": p.get("seconds"),
                                    "base_lr": {B: r["base_lr"] for B, r in p["rules"].items()},
                                    "scores": scores, "runs": runs}
        out["results"].append(t)
    return _rounded(out)


def expand_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary in the layout of the full results, as far as the report reads them."""
    results = {k: v for k, v in summary.items() if k not in ("format", "results")}
    results["results"] = []
    for t in summary["results"]:
        tr = {k: v for k, v in t.items() if k != "protocols"}
        tr["protocols"] = {}
        for name, p in t["protocols"].items():
            cells: list[dict[str, Any]] = []
            score_summary: dict[str, Any] = {}
            rules = {B: {"base_lr": base, "factor": {}, "lr": {}} for B, base in p["base_lr"].items()}
            for budget, per_rule in p["scores"].items():
                score_summary[budget] = {}
                for rule, entry in per_rule.items():
                    score_summary[budget][rule] = {k: v for k, v in entry.items() if k not in CELL_FIELDS}
                    for values in zip(*(entry[f] for f in CELL_FIELDS), strict=True):
                        c = dict(zip(CELL_FIELDS, values, strict=True))
                        curve = p["runs"][str(c["B"])]["curves"][budget]
                        c.update(budget=budget, rule=rule, lr_star=None if curve.get("k_star") is None
                                 else lattice_lr(t["anchor_lr"], curve["k_star"]))
                        cells.append(c)
                        r = rules[str(c["B"])]
                        lr, base = c["lr_rule"], r["base_lr"][budget]
                        r["lr"].setdefault(budget, {})[rule] = lr
                        r["factor"].setdefault(budget, {})[rule] = None if lr is None else lr / base
            # the cells in the order score_protocol makes them: B, budget, rule
            order = {B: i for i, B in enumerate(p["base_lr"])}
            budgets, rule_names = list(p["scores"]), RULES[t["optimizer"]]
            cells.sort(key=lambda c: (order[str(c["B"])], budgets.index(c["budget"]),
                                      rule_names.index(c["rule"]) if c["rule"] in rule_names else 99))
            tr["protocols"][name] = {"runs": p["runs"], "rules": rules, "seconds": p.get("seconds"),
                                     "scores": {"cells": cells, "summary": score_summary}}
        results["results"].append(tr)
    return results


def write_json(results: dict[str, Any], path: Path) -> None:
    """The full results (JSON-safe) as ``path``."""
    path.write_text(json.dumps(results, indent=1))


def write_summary(results: dict[str, Any], path: Path) -> None:
    """The summary of JSON-safe full results as ``path``."""
    path.write_text(dumps_compact(summarize(results)) + "\n")


def load_results(path: Path) -> dict[str, Any]:
    """Full results or a summary (expanded), from a JSON file."""
    data = json.loads(path.read_text())
    return expand_summary(data) if data.get("format") == SUMMARY_FORMAT else data


def is_summary(path: Path) -> bool:
    with path.open() as fh:
        return f'"format": "{SUMMARY_FORMAT}"' in fh.read(200)


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


# -- markdown --------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    text = format(v, spec)
    # A signed value that rounds to zero is written +0.00 whatever the sign of its rounding error,
    # so that the summary's rounded numbers give the same report as the full results.
    return text.replace("-", "+") if "+" in spec and float(text) == 0 else text


def markdown(results: dict[str, Any]) -> str:
    """The score tables, generated from the results (full or expanded summary)."""
    lines = _header(results)
    for kind in ("sgd", "adam"):
        trs = [t for t in results["results"] if t["optimizer"] == kind]
        if trs:
            for budget in ("fixed_step", "fixed_epoch"):
                lines += _score_table(kind, budget, trs)
    lines += _against_fixed(results)
    lines += _oracle_table(results)
    lines += _measurements_table(results)
    lines += _stability_table(results)
    lines += _timing_table(results)
    return "\n".join(lines) + "\n"


def _header(results: dict[str, Any]) -> list[str]:
    """Title, command, notes, definitions and the tasks."""
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
    lines.append("Definitions are in the docstring of `benchmarks/lr_oracle/__init__.py`. Each score is over the "
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
    return lines


def _score_table(kind: str, budget: str, trs: list[dict[str, Any]]) -> list[str]:
    """One optimizer and budget: every rule's err · band · div · gap per task and protocol, and pooled."""
    lines: list[str] = []
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
    return lines


def _against_fixed(results: dict[str, Any]) -> list[str]:
    """Each rule against the fixed rule, cell by cell."""
    lines: list[str] = []
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
                lines.append(f"| {kind} | {budget} | `{r}` | {int((d < -0.25 - TIE).sum())} / {int((d > 0.25 + TIE).sum())} "
                             f"of {len(d)} | {_fmt(float(d.mean()), '+.2f')} | {_fmt(float(band), '+.2f')} | {div:+d} | "
                             f"{_fmt(float(np.mean(gaps)) if gaps else None, '+.3f')} |")
    lines.append("")
    return lines


def _oracle_table(results: dict[str, Any]) -> list[str]:
    """LR*(B) relative to the rules' base, its band and the stability edge."""
    lines: list[str] = []
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
                    parts.append(f"{B}: {_fmt(o(c['k_star']), '+.2f')} [{_fmt(o(c['band_k'][0]), '+.2f')}, "
                                 f"{_fmt(o(c['band_k'][1]), '+.2f')}] ({_fmt(o(c['k_stable']), '+.1f')}"
                                 f"{'+' if c['stable_at_top'] else ''})")
                lines.append(f"| {t['task']} | {t['optimizer']} | {p} | {budget} | " + "; ".join(parts) + " |")
    return lines


def _measurements_table(results: dict[str, Any]) -> list[str]:
    """The switch-point measurements (means over seeds)."""
    lines: list[str] = []
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
    return lines


def _stability_table(results: dict[str, Any]) -> list[str]:
    """Largest non-diverging LR × sharpness / threshold."""
    lines: list[str] = []
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
    return lines


def _timing_table(results: dict[str, Any]) -> list[str]:
    """Wall time per task and optimizer."""
    lines: list[str] = []
    lines.append("\n## Timing\n")
    lines.append("| task | opt | total s | of which switch-point measurements s |")
    lines.append("|---|---|---|---|")
    for t in results["results"]:
        lines.append(f"| {t['task']} | {t['optimizer']} | {t['seconds']:.0f} | {t['measure_seconds']:.0f} |")
    return lines

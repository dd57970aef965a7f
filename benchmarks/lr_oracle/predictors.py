"""Which signal, measured right after a batch-size change, predicts that the continuation fails?

Samples are the switch runs of protocol (b): the state after S steps at B0 with LR*(B0), then
continued at a larger batch B > B0 with a lattice LR η (fixed-step budget), one sample per task ×
optimizer × B × η × seed. A continuation **fails** if it diverged or ended above the constant
predictor (the oracle's failure flag), or if its final training loss is above the loss at the
switch (the run got worse by changing the batch size and LR).

Signals, each from the measurements at the switch point (per seed, on batches of size B; η the
LR after the change, η0 = LR*(B0) the LR before it):

* ``factor``: η/η0, the LR multiplier alone — the baseline a curvature signal has to beat;
* ``lambda_ratio``: η·λ_max(H_B)/T, with T = 2(1+μ) (heavy-ball SGD) or 2 (Adam: the plain-GD
  edge) — what ``hessian/stability`` is for SGD;
* ``precond_ratio`` (Adam): η·λ_max(P⁻¹H_B)/T, T = (2+2β1)/(1−β1) = 38 — ``hessian/stability``
  for Adam;
* ``critical_ratio`` and ``critical_ratio_update``: η·λ_c/2 along −g (−P⁻¹g for Adam) and along
  the optimizer's actual next update — ``hessian/critical_ratio*`` (only when the measurements
  have them: ``--remeasure``);
* ``relative_*``: a signal after the change over its value before it (η0 and B0): how much the
  change moved it.

Per task (optimizers pooled, and per optimizer) it reports the AUC (probability that a failed run
scores above a good one, ties counting half), the largest threshold that catches ≥ 90 % of the
failures with its false-alarm rate, the hits and false alarms of the warning's threshold (1 for
the ratios), and whether one threshold catches ≥ 90 % with ≤ 10 % false alarms on every task.

Usage::

    python -m benchmarks.lr_oracle.predictors FULL_JSON [--out predictors.json] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.lr_oracle.rules import ADAM_THRESHOLD, FIXED, SGD_THRESHOLD

HIT_TARGET = 0.9
FALSE_ALARM_TARGET = 0.1
SIGNALS = ("factor", "lambda_ratio", "precond_ratio", "critical_ratio", "critical_ratio_update",
           "relative_lambda", "relative_precond", "relative_critical",
           "relative_critical_update")
#: The threshold each signal's warning would use (the ratios' edge is 1; the factor has none).
NATURAL = {s: 1.0 for s in SIGNALS if s.endswith("ratio") or s.endswith("update")} | {
    "factor": math.nan}


def _value(measure: dict[str, Any], key: str, B: int) -> float | None:
    table = measure.get(key) or {}
    v = table.get(str(B))
    if v is None:
        return None
    v = float(v)
    return v if not math.isnan(v) else None


def _signals(kind: str, measure: dict[str, Any], B: int, B0: int, lr: float, lr0: float
             ) -> dict[str, float]:
    """Every signal that the measurements of one seed allow, for LR ``lr`` at batch ``B``."""
    out: dict[str, float] = {"factor": lr / lr0}
    plain_edge = SGD_THRESHOLD if kind == "sgd" else 2.0
    pairs = {"lambda": ("lambda", plain_edge), "precond": ("lambda_precond", ADAM_THRESHOLD),
             "critical": ("critical", 2.0), "critical_update": ("critical_update", 2.0)}
    for name, (key, edge) in pairs.items():
        after, before = _value(measure, key, B), _value(measure, key, B0)
        if after is None:
            continue
        ratio_name = {"lambda": "lambda_ratio", "precond": "precond_ratio"}.get(name, name + "_ratio")
        if name == "critical_update":
            ratio_name = "critical_ratio_update"
        out[ratio_name] = lr * after / edge
        if before is not None and before > 0 and math.isfinite(before):
            out[f"relative_{name}"] = (lr * after) / (lr0 * before)
    return out


def samples(results: Iterable[dict[str, Any]], *, increases_only: bool = True
            ) -> list[dict[str, Any]]:
    """One dict per switch run: task, optimizer, B, lr, seed, failed, and the signals."""
    out = []
    for res in results:
        kind, B0 = res["optimizer"], int(res["B0"])
        anchor, lr0 = float(res["anchor_lr"]), float(res["prefix_lr"])
        switch = res["protocols"]["a"]["runs"][str(B0)]["points"]["0"]["fixed_step"]["train"]
        by_seed = {int(m["seed"]): m for m in res["measurements"]}
        seeds = sorted(by_seed)
        for b_key, run in res["protocols"]["b"]["runs"].items():
            B = int(b_key)
            if B == B0 or (increases_only and B < B0):
                continue
            for k_key, point in run["points"].items():
                lr = anchor * 2.0 ** (int(k_key) / 2.0)
                cell = point["fixed_step"]
                for i, seed in enumerate(seeds):
                    final = cell["train"][i]
                    failed = bool(cell["failed"][i]) or not math.isfinite(final) or (
                        final > switch[i])
                    out.append({"task": res["task"], "optimizer": kind, "B": B, "lr": lr,
                                "seed": seed, "failed": failed,
                                "signals": _signals(kind, by_seed[seed], B, B0, lr, lr0)})
    return out


def auc(bad: Sequence[float], good: Sequence[float]) -> float:
    """P(a failed run's signal > a good run's), ties half (Mann–Whitney); NaN if a side is empty."""
    if not bad or not good:
        return math.nan
    ranked = sorted([(v, 1) for v in bad] + [(v, 0) for v in good])
    total, i, rank_sum = len(ranked), 0, 0.0
    while i < total:
        j = i
        while j < total and ranked[j][0] == ranked[i][0]:
            j += 1
        mid = (i + j + 1) / 2.0  # mean rank of the tie block (1-based)
        rank_sum += mid * sum(flag for _, flag in ranked[i:j])
        i = j
    n_bad, n_good = len(bad), len(good)
    return (rank_sum - n_bad * (n_bad + 1) / 2.0) / (n_bad * n_good)


def rates(bad: Sequence[float], good: Sequence[float], threshold: float) -> tuple[float, float]:
    """(hit rate, false-alarm rate) of warning when the signal is at least ``threshold``."""
    hit = sum(v >= threshold for v in bad) / len(bad) if bad else math.nan
    alarm = sum(v >= threshold for v in good) / len(good) if good else math.nan
    return hit, alarm


def catching(bad: Sequence[float], good: Sequence[float], target: float = HIT_TARGET
             ) -> tuple[float, float]:
    """The largest threshold that catches ``target`` of the failures, and its false-alarm rate."""
    if not bad:
        return math.nan, math.nan
    ordered = sorted(bad, reverse=True)
    threshold = ordered[max(0, math.ceil(target * len(ordered)) - 1)]
    return threshold, rates(bad, good, threshold)[1]


def _split(rows: Sequence[dict[str, Any]], signal: str) -> tuple[list[float], list[float]]:
    bad = [r["signals"][signal] for r in rows if r["failed"] and signal in r["signals"]]
    good = [r["signals"][signal] for r in rows if not r["failed"] and signal in r["signals"]]
    return bad, good


def table(rows: Sequence[dict[str, Any]], signal: str) -> dict[str, Any] | None:
    """A signal's score on ``rows``: counts, AUC, the 90 % threshold, the natural threshold."""
    bad, good = _split(rows, signal)
    if not bad and not good:
        return None
    threshold, alarms = catching(bad, good)
    hit1, alarm1 = rates(bad, good, NATURAL.get(signal, math.nan))
    return {"failed": len(bad), "good": len(good), "auc": auc(bad, good),
            "threshold_90": threshold, "false_alarms_90": alarms,
            "hits_at_1": hit1, "false_alarms_at_1": alarm1}


def common_threshold(groups: dict[str, Sequence[dict[str, Any]]], signal: str
                     ) -> dict[str, Any] | None:
    """The threshold whose worst task is best: max over t of min over tasks (hits − alarms).

    ``meets`` says whether it catches ≥ 90 % with ≤ 10 % false alarms on every task.
    """
    split = {name: _split(rows, signal) for name, rows in groups.items()}
    split = {n: s for n, s in split.items() if s[0] and s[1]}
    if not split:
        return None
    candidates = sorted({v for bad, _ in split.values() for v in bad})
    best: dict[str, Any] | None = None
    for t in candidates:
        per = {n: rates(bad, good, t) for n, (bad, good) in split.items()}
        worst = min(h - a for h, a in per.values())
        if best is None or worst > best["worst_margin"]:
            best = {"threshold": t, "worst_margin": worst,
                    "per_task": {n: {"hits": h, "false_alarms": a} for n, (h, a) in per.items()},
                    "meets": all(h >= HIT_TARGET and a <= FALSE_ALARM_TARGET
                                 for h, a in per.values())}
    return best


def score(results: Sequence[dict[str, Any]], *, increases_only: bool = True) -> dict[str, Any]:
    """Every signal's tables per task × optimizer, per optimizer over tasks, and the verdict."""
    rows = samples(results, increases_only=increases_only)
    out: dict[str, Any] = {"samples": len(rows), "failed": sum(r["failed"] for r in rows),
                           "increases_only": increases_only, "by_task": {}, "common": {}}
    for kind in ("sgd", "adam"):
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["optimizer"] == kind:
                groups.setdefault(r["task"], []).append(r)
        for task, group in groups.items():
            out["by_task"][f"{task}/{kind}"] = {s: t for s in SIGNALS
                                                if (t := table(group, s)) is not None}
        out["common"][kind] = {s: c for s in SIGNALS
                               if (c := common_threshold(groups, s)) is not None}
    return out


def best_signal(scores: dict[str, Any], kind: str) -> str | None:
    """The signal whose common threshold has the best worst-task margin for ``kind``."""
    common = scores["common"].get(kind, {})
    if not common:
        return None
    return max(common, key=lambda s: common[s]["worst_margin"])


CLOSER = 0.25  # octaves: a cell moved by less is "the same"


def guard_table(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The guard (the fixed rule capped at the edge measured after the change) against the fixed
    rule, per optimizer, over the switch protocol's increases and both budgets.

    A cell *binds* when the guard's LR is below the fixed rule's; it is *closer* or *farther*
    when its |log2(LR/LR*)| moved by more than a quarter octave.
    """
    out: dict[str, Any] = {}
    for res in results:
        kind = res["optimizer"]
        cells = {(c["B"], c["budget"], c["rule"]): c
                 for c in res["protocols"]["b"]["scores"]["cells"]}
        row = out.setdefault(kind, {"cells": 0, "binds": 0, "closer": 0, "farther": 0,
                                    "fixed_divergences": 0, "guard_divergences": 0,
                                    "binding": []})
        for (B, budget, rule), guard in cells.items():
            if rule != "guard" or B <= res["B0"]:
                continue
            fixed = cells[(B, budget, FIXED[kind])]
            row["cells"] += 1
            row["fixed_divergences"] += int(bool(fixed["diverged"]))
            row["guard_divergences"] += int(bool(guard["diverged"]))
            if not guard["lr_rule"] < fixed["lr_rule"] * (1 - 1e-9):
                continue
            row["binds"] += 1
            moved = abs(fixed["log2_err"]) - abs(guard["log2_err"])
            row["closer"] += int(moved > CLOSER)
            row["farther"] += int(moved < -CLOSER)
            row["binding"].append({"task": res["task"], "B": B, "budget": budget,
                                   "fixed_log2_err": fixed["log2_err"],
                                   "guard_log2_err": guard["log2_err"],
                                   "fixed_diverged": bool(fixed["diverged"]),
                                   "guard_diverged": bool(guard["diverged"])})
    return out


def guard_markdown(table: dict[str, Any]) -> str:
    """The guard's score, and the default it earns (never farther where it binds, removes
    divergences)."""
    lines = ["| optimizer | cells (B > B0, 2 budgets) | binds | closer | farther | "
             "divergences: fixed rule → guard | default? |", "|---" * 7 + "|"]
    for kind, r in table.items():
        earns = r["farther"] == 0 and r["guard_divergences"] < r["fixed_divergences"]
        lines.append(f"| {kind} | {r['cells']} | {r['binds']} | {r['closer']} | {r['farther']} | "
                     f"{r['fixed_divergences']} → {r['guard_divergences']} | "
                     f"{'yes' if earns else 'no'} |")
    return "\n".join(lines) + "\n"


def _f(x: float, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(scores: dict[str, Any]) -> str:
    """The predictor tables and the common-threshold verdict."""
    lines = [f"Switch runs to B > B0: {scores['samples']} runs, {scores['failed']} failed "
             "(diverged, or ended above the loss at the switch).", ""]
    for name, signals in scores["by_task"].items():
        lines += [f"#### {name}", "",
                  "| signal | failed / good | AUC | threshold catching 90 % | false alarms there "
                  "| hits at 1 | false alarms at 1 |", "|---" * 7 + "|"]
        for s, t in signals.items():
            lines.append(f"| `{s}` | {t['failed']} / {t['good']} | {_f(t['auc'])} | "
                         f"{_f(t['threshold_90'], 3)} | {_f(t['false_alarms_90'])} | "
                         f"{_f(t['hits_at_1'])} | {_f(t['false_alarms_at_1'])} |")
        lines.append("")
    for kind, common in scores["common"].items():
        lines += [f"#### One threshold for every task — {kind}", "",
                  "| signal | threshold | worst task: hits − false alarms | ≥ 90 % hits, ≤ 10 % "
                  "false alarms everywhere |", "|---" * 4 + "|"]
        for s, c in sorted(common.items(), key=lambda kv: -kv[1]["worst_margin"]):
            lines.append(f"| `{s}` | {_f(c['threshold'], 3)} | {_f(c['worst_margin'])} | "
                         f"{'yes' if c['meets'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a full lr_oracle.json (not the summary)")
    parser.add_argument("--out", type=Path, default=None, help="write the scores here (JSON)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    parser.add_argument("--all-sizes", action="store_true", help="also B < B0")
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    if "results" not in data or "protocols" not in data["results"][0]:
        raise SystemExit(f"{args.results} is not a full lr_oracle.json (it has no runs); "
                         "regenerate one with `python -m benchmarks.lr_oracle`.")
    scores = score(data["results"], increases_only=not args.all_sizes)
    scores["guard"] = guard_table(data["results"])
    text = markdown(scores) + "\n#### The guard on batch-size increases\n\n" + guard_markdown(
        scores["guard"])
    if args.out:
        args.out.write_text(json.dumps(scores, indent=1, allow_nan=True))
    if args.markdown:
        args.markdown.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

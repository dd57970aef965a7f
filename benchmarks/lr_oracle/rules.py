"""The batch-size LR rules: small pure functions of quantities measured at the switch point.

Each rule maps the measurements of one seed (:mod:`benchmarks.lr_oracle.measure`) and a change
of batch size B0 → B to a factor of the learning rate; :func:`rule_factors` evaluates all of an
optimizer's rules (:data:`RULES`), :func:`rules_for` their geometric mean over seeds and the LRs
they give. The definitions are in the package docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lr_batch_callback import scaling_factor

MOMENTUM = 0.9
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
SGD_THRESHOLD = 2.0 * (1.0 + MOMENTUM)  # heavy-ball stability: lr·λ < 2(1+μ)
ADAM_THRESHOLD = (2.0 + 2.0 * BETAS[0]) / (1.0 - BETAS[0])  # Cohen et al. 2022: 38 for β1=0.9

RULES = {
    "sgd": ["linear", "sqrt", "none", "curvature", "direct", "law_edge", "noise", "noise_hess",
            "guard", "noise_guard"],
    "adam": ["sqrt", "linear", "none", "curvature", "direct", "direct_precond", "law_edge",
             "surge", "noise_sqrt", "noise_hess_sqrt", "guard"],
}
FIXED = {"sgd": "linear", "adam": "sqrt"}


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



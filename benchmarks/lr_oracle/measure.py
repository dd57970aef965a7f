"""What the rules measure at the switch point, with the library's curvature engine.

:func:`measure_switch_point` takes the state after S steps at B0 and, per seed, fits the
library's batch-size law (``estimate_batch_size_law``, as the callback does), measures λ_max of
batch Hessians (``hessian_eigenvalues``), Adam's preconditioned sharpness (``lanczos`` on a
``CurvatureOperator.from_function`` around the library's ``HessianOperator``), the critical
sharpness on the same batches (the library's forward-only line search, ``critical_sharpness``:
along the (preconditioned) gradient and along the optimizer's actual next update) and the
gradient noise scales of McCandlish et al. (2018).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.lr_oracle.rules import ADAM_EPS, BETAS, MOMENTUM, fit_law_edge
from benchmarks.lr_oracle.tasks import Ensemble, Task, index_stream
from lr_batch_callback import (
    CurvatureOperator,
    HessianOperator,
    estimate_batch_size_law,
    hessian_eigenvalues,
    lanczos,
)
from lr_batch_callback.engine.critical import CriticalStep, LineLoss, critical_sharpness


def flat_params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def extract(task: Task, state: dict[str, Any], m: int, seed: int) -> Ensemble:
    """Copy m of an ensemble snapshot as a one-copy ensemble (for the curvature engine)."""
    single = task.new_model([seed])
    with torch.no_grad():
        for k, v in single.state_dict().items():
            v.copy_(state["model"][k][m:m + 1])
    single.train()
    return single


def seed_optimizer_state(state: dict[str, Any], m: int, model: Ensemble) -> dict[str, Any]:
    """Copy m's slice of an :class:`~benchmarks.lr_oracle.oracle.EnsembleOptimizer` snapshot:
    ``{"t": steps taken, "state": {parameter name: {slot: tensor shaped like the parameter}}}``,
    in the order of ``model``'s trainable parameters (views of the snapshot: read, never written)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {"t": int(state["opt"]["t"]),
            "state": {n: {k: v[m:m + 1] for k, v in state["opt"]["state"][n].items()} for n in names}}


def gradient_direction(kind: str, grad: Sequence[Tensor], opt: dict[str, Any]) -> list[Tensor]:
    """The step without momentum per unit LR: −g (SGD) or −P⁻¹g (Adam), P = √v̂ + ε with
    v̂ = v/(1 − β2^t) from the optimizer state (t its step count)."""
    if kind == "sgd":
        return [-g for g in grad]
    bias2 = 1 - BETAS[1] ** opt["t"]
    return [-g / ((st["v"] / bias2).sqrt() + ADAM_EPS)
            for g, st in zip(grad, opt["state"].values(), strict=True)]


def update_direction(kind: str, grad: Sequence[Tensor], opt: dict[str, Any]) -> list[Tensor]:
    """The optimizer's next update per unit LR with gradient g, out of place (the state is not
    touched): SGD buf' = μ·buf + g, −buf'; Adam m' = β1·m + (1−β1)g, v' = β2·v + (1−β2)g²,
    t' = t + 1, −(m'/(1−β1^t'))/(√(v'/(1−β2^t')) + ε) — :class:`EnsembleOptimizer`'s step."""
    out = []
    for g, st in zip(grad, opt["state"].values(), strict=True):
        if kind == "sgd":
            out.append(-(MOMENTUM * st["buf"] + g))
        else:
            b1, b2 = BETAS
            t = opt["t"] + 1
            m = b1 * st["m"] + (1 - b1) * g
            v = b2 * st["v"] + (1 - b2) * g * g
            out.append(-(m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + ADAM_EPS))
    return out


def critical_sharpnesses(model: Ensemble, loss_fn, batch, kind: str, opt: dict[str, Any],
                         lr: float) -> dict[str, CriticalStep]:
    """The critical sharpness 2/η_c of the batch loss (the one ``hessian_eigenvalues`` is given:
    the model as it is, train mode, BatchNorm on the batch's statistics; ``LineLoss`` restores
    parameters and buffers) along :func:`gradient_direction` (``critical``) and
    :func:`update_direction` (``critical_update``), both from this batch's gradient; the line
    search starts at ``lr`` (the LR in use)."""
    with LineLoss(model, loss_fn, [batch], [1.0]) as line:
        grad = line.gradient()
        return {"critical": critical_sharpness(line, grad, gradient_direction(kind, grad, opt), first=lr),
                "critical_update": critical_sharpness(line, grad, update_direction(kind, grad, opt),
                                                      first=lr)}


def preconditioned_sharpness(model: Ensemble, loss_fn, batch, scale: Sequence[Tensor], *,
                             max_iter: int, tol: float, seed: int) -> tuple[float, bool]:
    """λ_max(D H_B D), D = diag(scale), and whether Lanczos converged.

    With D = P^(-1/2) this is λ_max(P⁻¹H_B) (a similar matrix). H_B is the library's
    ``HessianOperator`` on the batch (its graph built once; BatchNorm on the batch's statistics,
    its buffers left as they were); Lanczos runs in float64 on whole blocks of vectors.
    """
    d = torch.cat([s.reshape(-1) for s in scale])
    with HessianOperator(model, loss_fn, [batch]) as H:
        op = CurvatureOperator.from_function(lambda V: (H.matmat(V.float() * d) * d).double(), H.dim,
                                             dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = lanczos(op, tol=tol, max_iter=min(max_iter, H.dim), seed=seed)
    return float(res.eigenvalues[0]), bool(res.converged)


def grads(model: Ensemble, loss_fn, batch) -> tuple[Tensor, ...]:
    """The gradient of the batch loss, per parameter (BatchNorm's buffers left as they are)."""
    model.use_batch_stats_only = True
    g = torch.autograd.grad(loss_fn(model, batch), flat_params(model))
    model.use_batch_stats_only = False
    return g


def flat_grad(model: Ensemble, loss_fn, batch) -> Tensor:
    return torch.cat([x.reshape(-1) for x in grads(model, loss_fn, batch)]).detach()


def grad_sq_norm(model: Ensemble, loss_fn, batch) -> float:
    return float(sum((x.double() ** 2).sum() for x in grads(model, loss_fn, batch)))


def noise_scale(model: Ensemble, loss_fn, pool: tuple[Tensor, Tensor], b_small: int,
                dataset_size: int) -> dict[str, float]:
    """McCandlish et al. (2018, App. A): unbiased |G|² and tr Σ from mean squared gradient norms
    at two batch sizes (disjoint micro-batches of b_small, and the whole pool), with the
    finite-population factor x = 1/B − 1/N; B_simple = tr Σ / |G|² (inf if |G|² ≤ 0)."""
    x, y = pool
    n = x.shape[0]
    small = [grad_sq_norm(model, loss_fn, (x[i:i + b_small], y[i:i + b_small]))
             for i in range(0, n - b_small + 1, b_small)]
    g_small = float(np.mean(small))
    g_big = grad_sq_norm(model, loss_fn, pool)
    xs, xb = 1 / b_small - 1 / dataset_size, 1 / n - 1 / dataset_size
    tr_sigma = (g_small - g_big) / (xs - xb)
    g2 = g_big - tr_sigma * xb
    b_simple = tr_sigma / g2 if g2 > 0 and tr_sigma > 0 else (math.inf if tr_sigma > 0 else 0.0)
    return {"g_small_sq": g_small, "g_big_sq": g_big, "b_small": b_small, "b_big": n,
            "G_sq": g2, "tr_sigma": tr_sigma, "B_simple": b_simple}


def noise_scale_hessian(model: Ensemble, loss_fn, pool: tuple[Tensor, Tensor], b_small: int,
                        dataset_size: int, max_micro: int = 64) -> dict[str, float]:
    """McCandlish et al.'s Hessian-weighted noise scale B_noise = tr(HΣ) / (GᵀHG).

    H is the Hessian of the pool (the library's ``HessianOperator``, its graph reused); the same two-size estimator as
    :func:`noise_scale`, with |g|² replaced by gᵀHg: E[g_Bᵀ H g_B] = GᵀHG + tr(HΣ)·(1/B − 1/N).
    Uses the first ``max_micro`` micro-batches. B_noise = inf where GᵀHG ≤ 0 (no curvature
    along the gradient: nothing bounds the step) and 0 where tr(HΣ) ≤ 0.
    """
    x, y = pool
    n = x.shape[0]
    with HessianOperator(model, loss_fn, [pool]) as H:
        quad = lambda v: float(v.double() @ H.matvec(v).double())  # noqa: E731
        small = [quad(flat_grad(model, loss_fn, (x[i:i + b_small], y[i:i + b_small])))
                 for i in range(0, min(n, max_micro * b_small) - b_small + 1, b_small)]
        q_small = float(np.mean(small))
        q_big = quad(flat_grad(model, loss_fn, pool))
    xs, xb = 1 / b_small - 1 / dataset_size, 1 / n - 1 / dataset_size
    tr_hs = (q_small - q_big) / (xs - xb)
    ghg = q_big - tr_hs * xb
    if ghg <= 0:
        b_noise = math.inf
    else:
        b_noise = tr_hs / ghg if tr_hs > 0 else 0.0
    return {"gHg_small": q_small, "gHg_big": q_big, "micro_batches": len(small), "GHG": ghg,
            "tr_H_sigma": tr_hs, "B_noise": b_noise}



def measure_switch_point(task: Task, kind: str, state: dict[str, Any], seeds: Sequence[int],
                         quick: bool, *, lr: float | None = None) -> list[dict[str, Any]]:
    """Everything the rules need, per seed, at the state after S steps at B0.

    ``lr``: the LR of those steps (the prefix LR), where the critical-sharpness line searches
    start (default: the task's guess; it changes where the search starts, not its result).
    """
    if lr is None:
        lr = task.lr_guess[kind]
    loss_fn = task.single_loss_fn()
    S, B0, N = task.steps, task.B0, task.n_train
    out = []
    for m, seed in enumerate(seeds):
        t0 = time.perf_counter()
        single = extract(task, state, m, seed)
        stream = index_stream(task, seed, 0, S * B0)
        recent = stream[S * B0 - task.law_samples: S * B0]
        pool = (task.x_train[recent], task.y_train[recent])
        rec: dict[str, Any] = {"seed": seed}
        rec.update(measure_law(single, loss_fn, pool, N, seed=S + 1000 * seed, quick=quick))
        scale = None
        if kind == "adam":  # D = P^(-1/2), P = diag(√v̂) + ε from the optimizer state
            opt_v = [state["opt"]["state"][n]["v"][m:m + 1] / (1 - BETAS[1] ** state["opt"]["t"])
                     for n, _ in single.named_parameters()]
            scale = [1.0 / (v.sqrt() + ADAM_EPS).sqrt() for v in opt_v]
        opt = seed_optimizer_state(state, m, single)
        critical = functools.partial(critical_sharpnesses, single, loss_fn, kind=kind, opt=opt, lr=lr)
        rec.update(measure_sharpness(task, single, loss_fn, seed, scale, quick, critical=critical))
        # 3. gradient noise scale
        rec["noise"] = noise_scale(single, loss_fn, pool, min(task.batch_sizes), N)
        rec["noise_hess"] = noise_scale_hessian(single, loss_fn, pool, min(task.batch_sizes), N,
                                                max_micro=8 if quick else 64)
        rec["seconds"] = time.perf_counter() - t0
        out.append(rec)
    return out


def measure_law(model: Ensemble, loss_fn, pool, N: int, *, seed: int, quick: bool) -> dict[str, Any]:
    """1. The library's law, exactly as the callback fits it, and the law_edge fit of its data."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        law = estimate_batch_size_law(
            model, loss_fn, pool, draws=2 if quick else 3, dataset_size=N, seed=seed,
            tol=1e-3, max_iter=10 if quick else 50,
        )
    return {"law": law.to_dict(), "law_r_squared_of_means": law.r_squared_of_means,
            "law_critical_batch_size": law.critical_batch_size,
            "law_warnings": [str(w.message)[:200] for w in caught], "_law": law,
            "law_edge": fit_law_edge(law.batch_sizes, law.eigenvalues, N)}


def measure_sharpness(task: Task, model: Ensemble, loss_fn, seed: int,
                      scale: Sequence[Tensor] | None, quick: bool, *,
                      critical: Callable[[Any], dict[str, CriticalStep]] | None = None) -> dict[str, Any]:
    """2. λ_max on random batches of each size (and, given ``scale``, the preconditioned
    sharpness λ_max(D H_B D) on the same batches), averaged over draws; given ``critical``
    (batch → {name: CriticalStep}, :func:`critical_sharpnesses`), each name's critical sharpness
    on the same batches, averaged over draws the same way (inf if one draw is uphill), and
    whether every search converged (``critical_converged``)."""
    N = task.n_train
    g = torch.Generator().manual_seed(99 + seed)
    lam, lam_p, conv = {}, {}, {}
    crit: dict[str, dict[int, float]] = {}
    crit_conv: dict[str, dict[int, bool]] = {}
    for B in sorted(set(task.batch_sizes) | {task.B0}):
        draws = 1 if quick else (3 if B <= 64 else 2)
        vals, pvals, cv = [], [], []
        cvals: dict[str, list[CriticalStep]] = {}
        for d in range(draws):
            idx = torch.randperm(N, generator=g)[:B]
            batch = (task.x_train[idx], task.y_train[idx])
            r = hessian_eigenvalues(model, loss_fn, batch, k=1, tol=1e-3,
                                    max_iter=10 if quick else 100, seed=1000 * seed + d)
            vals.append(float(r.eigenvalues[0]))
            cv.append(bool(r.converged))
            if scale is not None:
                top, ok = preconditioned_sharpness(model, loss_fn, batch, scale, tol=1e-3,
                                                   max_iter=10 if quick else 80, seed=2000 * seed + d)
                pvals.append(top)
                cv.append(ok)
            if critical is not None:
                for name, res in critical(batch).items():
                    cvals.setdefault(name, []).append(res)
        lam[B] = float(np.mean(vals))
        for name, results in cvals.items():
            crit.setdefault(name, {})[B] = float(np.mean([r.sharpness for r in results]))
            crit_conv.setdefault(name, {})[B] = all(r.converged for r in results)
        if pvals:
            lam_p[B] = float(np.mean(pvals))
        conv[B] = all(cv)
    out: dict[str, Any] = {"lambda": lam, "lambda_precond": lam_p, "lanczos_converged": conv}
    out.update(crit)
    if crit_conv:
        out["critical_converged"] = crit_conv
    return out

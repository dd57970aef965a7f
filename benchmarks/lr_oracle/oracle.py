"""The oracle: the LR lattice search, and the training runs it is made of.

:func:`run_task_optimizer` is one task × optimizer: the from-scratch search at B0 (protocol a),
the switch-point measurements, then for each protocol and batch size a :func:`search` on the
lattice LR_k = anchor · 2^(k/2), widened until the oracle is interior and the top LR fails.
Every lattice point × seed of one batch size trains as one ensemble (:func:`train_group`) with
per-copy learning rates (:class:`EnsembleOptimizer`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from benchmarks.lr_oracle.measure import measure_switch_point
from benchmarks.lr_oracle.rules import ADAM_EPS, BETAS, MOMENTUM, rules_for
from benchmarks.lr_oracle.scoring import curve_of, lattice_k, lattice_lr, score_protocol
from benchmarks.lr_oracle.tasks import Ensemble, Task, index_stream

KILL_FACTOR = 20.0  # a batch loss above KILL_FACTOR·max(L0, L_fail) ends the run (diverged)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class EnsembleOptimizer:
    """SGD with heavy-ball momentum (PyTorch's form: buf = μ·buf + g; p -= lr·buf) or Adam
    (PyTorch's defaults, bias-corrected), with one learning rate per model copy."""

    def __init__(self, model: Ensemble, kind: str, lrs: Tensor) -> None:
        self.kind, self.lr, self.t = kind, lrs.clone().float(), 0
        self.params = dict(model.named_parameters())
        slots = ("buf",) if kind == "sgd" else ("m", "v")
        self.state = {n: {s: torch.zeros_like(p) for s in slots} for n, p in self.params.items()}

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        for name, p in self.params.items():
            g, st = p.grad, self.state[name]
            lr = self.lr.view(-1, *([1] * (p.dim() - 1)))
            if self.kind == "sgd":
                st["buf"].mul_(MOMENTUM).add_(g)
                p.sub_(lr * st["buf"])
            else:
                b1, b2 = BETAS
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (st["v"] / (1 - b2 ** self.t)).sqrt_().add_(ADAM_EPS)
                p.sub_(lr * (st["m"] / (1 - b1 ** self.t)) / denom)

    def snapshot(self) -> dict[str, Any]:
        return {"t": self.t, "state": {n: {k: v.clone() for k, v in s.items()}
                                       for n, s in self.state.items()}}

    def load(self, snap: dict[str, Any], index: Tensor) -> None:
        self.t = snap["t"]
        for n, s in snap["state"].items():
            for k, v in s.items():
                self.state[n][k].copy_(v[index])


@torch.no_grad()
def _kill(model: Ensemble, opt: EnsembleOptimizer, dead: Tensor) -> None:
    """Freeze diverged copies at finite values (all-zero weights) so they cost nothing odd."""
    for p in model.parameters():
        p[dead] = 0.0
    for name, b in model.named_buffers():
        b[dead] = 1.0 if name.endswith("_rv") else 0.0
    for s in opt.state.values():
        for v in s.values():
            v[dead] = 0.0
    opt.lr[dead] = 0.0


def model_state(model: Ensemble) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_group(task: Task, kind: str, B: int, lrs: Sequence[float], seeds: Sequence[int],
                eval_steps: Sequence[int], *, start: dict[str, Any] | None = None, salt: int = 0,
                keep_state: bool = False) -> dict[str, Any]:
    """Train len(lrs)·len(seeds) copies at batch size B; evaluate at each step in eval_steps.

    Copy index = i_lr · n_seeds + i_seed. ``start``: per-seed model and optimizer snapshots
    (protocol b) — otherwise every copy starts from its seed's initialisation. Returns final
    losses (train objective and test) per eval step, shaped (n_lr, n_seeds), and the failure
    flags (killed, or a final train loss that is not finite or above the constant predictor's).
    """
    n_lr, n_seed = len(lrs), len(seeds)
    seed_of = torch.arange(n_lr * n_seed) % n_seed
    model = task.new_model([seeds[i] for i in seed_of.tolist()])
    model.train()
    lr_t = torch.tensor([lr for lr in lrs for _ in seeds], dtype=torch.float32)
    opt = EnsembleOptimizer(model, kind, lr_t)
    if start is not None:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(start["model"][k][seed_of])
        opt.load(start["opt"], seed_of)
    total = max(eval_steps)
    streams = torch.stack([index_stream(task, s, salt, total * B) for s in seeds])
    alive = torch.ones(model.M, dtype=torch.bool)
    out: dict[str, Any] = {"train": {}, "test": {}, "failed": {}}
    for step in range(1, total + 1):
        idx = streams[:, (step - 1) * B: step * B]  # (n_seed, B)
        x, y = task.x_train[idx][seed_of], task.y_train[idx][seed_of]
        losses = task.losses(model, x, y)
        bad = alive & (~torch.isfinite(losses) | (losses > KILL_FACTOR * max(task.L0, task.L_fail)))
        alive &= ~bad
        for p in model.parameters():
            p.grad = None
        torch.where(alive, losses, torch.zeros(())).sum().backward()
        opt.step()
        if bad.any():  # after the step: the graph needed the weights as they were
            _kill(model, opt, ~alive)
        if step in eval_steps:
            tr = task.objective(model, "train")
            te = task.objective(model, "test")
            failed = ~alive | ~torch.isfinite(tr) | (tr > task.L_fail)
            out["train"][step] = tr.view(n_lr, n_seed).tolist()
            out["test"][step] = te.view(n_lr, n_seed).tolist()
            out["failed"][step] = failed.view(n_lr, n_seed).tolist()
    if keep_state:
        out["state"] = {"model": model_state(model), "opt": opt.snapshot()}
    return out



@dataclass
class Config:
    seeds: list[int]
    quick: bool
    max_rounds: int = 3
    extend_by: int = 3


def budgets(task: Task, B: int) -> dict[str, int]:
    return {"fixed_step": task.steps, "fixed_epoch": max(1, round(task.steps * task.B0 / B))}


def search(task: Task, kind: str, B: int, anchor: float, ks: Sequence[int], cfg: Config, *,
           start: dict[str, Any] | None, salt: int, keep_state: bool = False) -> dict[str, Any]:
    """Train the lattice points ks at B; widen until the oracle is interior and the top fails
    (for both budgets). Returns per-k results and the curves."""
    bud = budgets(task, B)
    steps = sorted(set(bud.values()))
    points: dict[int, dict[str, Any]] = {}
    states: dict[int, dict[str, Any]] = {}
    todo = sorted(set(int(k) for k in ks))
    rounds = 0
    wall = 0.0
    while todo:
        t0 = time.perf_counter()
        res = train_group(task, kind, B, [lattice_lr(anchor, k) for k in todo], cfg.seeds, steps,
                          start=start, salt=salt, keep_state=keep_state)
        wall += time.perf_counter() - t0
        for i, k in enumerate(todo):
            points[k] = {b: {"train": res["train"][s][i], "test": res["test"][s][i],
                             "failed": res["failed"][s][i]} for b, s in bud.items()}
            if keep_state:
                n = len(cfg.seeds)
                states[k] = {"model": {kk: v[i * n:(i + 1) * n] for kk, v in res["state"]["model"].items()},
                             "opt": {"t": res["state"]["opt"]["t"],
                                     "state": {p: {s: v[i * n:(i + 1) * n] for s, v in st.items()}
                                               for p, st in res["state"]["opt"]["state"].items()}}}
        rounds += 1
        todo = []
        if cfg.quick or rounds > cfg.max_rounds:
            break
        kk = sorted(points)
        up = down = False
        for b in bud:
            curve = curve_of(points, b, task.L_fail)
            if curve.get("k_star") is None:
                down = True
                continue
            top_mean = curve["mean"][-1]
            # the top must fail, or have lost more than half the achievable improvement
            top_failed = curve["n_failed"][-1] > 0 or top_mean > 0.5 * (task.L_fail + curve["best_mean"])
            up |= (not top_failed) or curve["best_at_high_edge"]
            down |= curve["best_at_low_edge"]
        if up:
            todo += list(range(kk[-1] + 1, kk[-1] + 1 + cfg.extend_by))
        if down:
            todo += list(range(kk[0] - cfg.extend_by, kk[0]))
    curves = {b: curve_of(points, b, task.L_fail) for b in bud}
    return {"B": B, "anchor": anchor, "budget_steps": bud, "points": {str(k): v for k, v in sorted(points.items())},
            "curves": curves, "rounds": rounds, "seconds": wall, "_states": states}



def scratch_ks(cfg: Config) -> range:
    """The first lattice of protocol a's search at B0 (around the task's guess)."""
    return range(-2 if cfg.quick else -8, (2 if cfg.quick else 8) + 1)


def train_prefix(task: Task, kind: str, lr: float, seeds: Sequence[int]) -> tuple[dict[str, Any], list[float]]:
    """The switch-point state again, trained alone: the B0 run at ``lr`` from scratch (salt 0,
    as protocol a's search trains it) for S steps, one copy per seed, in the layout
    :func:`search` keeps (``keep_state``), and its final training objective per seed.

    The copies of an ensemble are independent, but the kernels of an ensemble of one copy (one
    seed) may round differently from those of a lattice: compare the objective with the stored
    one, and replay the search where it differs (:func:`prefix_state`).
    """
    S = task.steps
    res = train_group(task, kind, task.B0, [lr], seeds, sorted(set(budgets(task, task.B0).values())),
                      start=None, salt=0, keep_state=True)
    return res["state"], res["train"][S][0]


def prefix_state(task: Task, kind: str, k_best: int, cfg: Config) -> tuple[dict[str, Any], list[float]]:
    """The switch-point state as :func:`run_task_optimizer` makes it: protocol a's search at B0
    replayed (the same lattice and rounds), the state of lattice point ``k_best`` (LR =
    the guess · 2^(k/2)), and its final training objective per seed."""
    a0 = search(task, kind, task.B0, task.lr_guess[kind], scratch_ks(cfg), cfg, start=None, salt=0,
                keep_state=True)
    return a0["_states"][k_best], a0["points"][str(k_best)]["fixed_step"]["train"]


def initial_ks(center_k: float, rule_ks: Sequence[float], half_width: int, span_cap: int) -> list[int]:
    lo, hi = math.floor(center_k) - half_width, math.ceil(center_k) + half_width
    finite = [k for k in rule_ks if math.isfinite(k)]
    if finite:
        lo = max(min(lo, math.floor(min(finite)) - 1), math.floor(center_k) - span_cap)
        hi = min(max(hi, math.ceil(max(finite)) + 1), math.ceil(center_k) + span_cap)
    return list(range(lo, hi + 1))


def run_task_optimizer(task: Task, kind: str, cfg: Config) -> dict[str, Any]:
    B0, S = task.B0, task.steps
    out: dict[str, Any] = {"task": task.name, "optimizer": kind, "B0": B0, "steps": S}
    t_start = time.perf_counter()
    half, cap = (1, 3) if cfg.quick else (4, 10)
    # (a) from scratch at B0, on a wide lattice around the guess
    guess = task.lr_guess[kind]
    a0 = search(task, kind, B0, guess, scratch_ks(cfg), cfg, start=None, salt=0, keep_state=True)
    c0 = a0["curves"]["fixed_step"]
    if c0.get("k_star") is None:
        raise RuntimeError(f"{task.name}/{kind}: every LR failed at B0={B0}")
    k_best0 = int(c0["k_best"])
    lr_prefix = lattice_lr(guess, k_best0)
    anchor = lr_prefix  # every later lattice: LR = LR*_a(B0) · 2^(k/2)
    prefix = a0["_states"][k_best0]
    log(f"{task.name}/{kind}: LR*_a(B0={B0}) = {lr_prefix:.4g} (lattice), {a0['seconds']:.0f}s")
    # the prefix state is the B0 run at that LR after S steps (fixed-step = fixed-epoch at B0)
    t0 = time.perf_counter()
    meas = measure_switch_point(task, kind, prefix, cfg.seeds, cfg.quick, lr=lr_prefix)
    out["measure_seconds"] = time.perf_counter() - t0
    log(f"{task.name}/{kind}: switch-point measurements {out['measure_seconds']:.0f}s; "
        f"law R²(means) {[round(m['law_r_squared_of_means'], 2) for m in meas]}, "
        f"B_simple {[round(m['noise']['B_simple'], 1) for m in meas]}, "
        f"B_noise(H) {[round(m['noise_hess']['B_noise'], 1) for m in meas]}")
    # re-express the B0 scratch search on the new anchor (shift of k_best0)
    a0["anchor"] = anchor
    a0["points"] = {str(int(k) - k_best0): v for k, v in a0["points"].items()}
    a0["curves"] = {b: curve_of({int(k): v for k, v in a0["points"].items()}, b, task.L_fail)
                    for b in a0["budget_steps"]}
    a0.pop("_states")
    protocols: dict[str, Any] = {}
    for proto in ("a", "b"):
        t_proto = time.perf_counter()
        start = None if proto == "a" else prefix
        salt = 0 if proto == "a" else 1
        if proto == "a":
            s0 = a0
        else:
            s0 = search(task, kind, B0, anchor, range(-2 if cfg.quick else -4, (2 if cfg.quick else 4) + 1),
                        cfg, start=start, salt=salt)
            s0.pop("_states")
        runs = {B0: s0}
        rules_at: dict[int, dict[str, Any]] = {}
        for B in task.batch_sizes:
            if B == B0:
                continue
            # protocol a: LR*_a(B0) (refined; the same run for both budgets) — pure scaling error;
            # protocol b: the LR actually used before the switch (the callback multiplies it)
            if proto == "a":
                base = {b: lattice_lr(anchor, s0["curves"][b]["k_star"]) for b in s0["budget_steps"]}
            else:
                base = {b: lr_prefix for b in s0["budget_steps"]}
            rules_at[B] = rules_for(kind, meas, task.B0, task.n_train, B, base)
            rule_lr = rules_at[B]["lr"]
            expo = 0.25 if kind == "adam" else 0.5
            center = lattice_k(anchor, base["fixed_step"] * (B / B0) ** expo)
            rule_ks = [lattice_k(anchor, v) for v in rule_lr["fixed_step"].values() if v > 0 and math.isfinite(v)]
            ks = initial_ks(center, rule_ks, half, cap)
            runs[B] = search(task, kind, B, anchor, ks, cfg, start=start, salt=salt)
            runs[B].pop("_states")
            c = runs[B]["curves"]["fixed_step"]
            log(f"{task.name}/{kind}/{proto} B={B}: {len(runs[B]['points'])} LRs in "
                f"{runs[B]['rounds']} round(s), {runs[B]['seconds']:.0f}s; LR*/LR*(B0) = "
                f"{2 ** ((c['k_star'] - s0['curves']['fixed_step']['k_star']) / 2) if c.get('k_star') is not None else float('nan'):.3g}")
        scores = score_protocol(kind, runs, rules_at, anchor, task.L_fail)
        protocols[proto] = {"runs": {str(B): r for B, r in runs.items()},
                            "rules": {str(B): r for B, r in rules_at.items()},
                            "scores": scores, "seconds": time.perf_counter() - t_proto}
    out["anchor_lr"] = anchor
    out["prefix_lr"] = lr_prefix
    out["measurements"] = [{k: v for k, v in m.items() if not k.startswith("_")} for m in meas]
    out["protocols"] = protocols
    out["seconds"] = time.perf_counter() - t_start
    return out



"""The command line of the LR-oracle benchmark (``python -m benchmarks.lr_oracle --help``)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if not __package__:
    # ``python benchmarks/lr_oracle``: the folder itself is sys.path[0], where its modules would
    # shadow top-level names. Reach the package through the repository instead, appended, so
    # that an installed lr_batch_callback (or one on PYTHONPATH) still comes first.
    sys.path[:1] = []
    sys.path.append(str(REPO))

import torch  # noqa: E402

import benchmarks.lr_oracle  # noqa: E402
from benchmarks.lr_oracle.figures import plot_task  # noqa: E402
from benchmarks.lr_oracle.measure import measure_switch_point  # noqa: E402
from benchmarks.lr_oracle.oracle import (  # noqa: E402
    KILL_FACTOR,
    Config,
    log,
    prefix_state,
    run_task_optimizer,
    train_prefix,
)
from benchmarks.lr_oracle.report import (  # noqa: E402
    clean,
    is_summary,
    load_results,
    markdown,
    write_csv,
    write_json,
    write_summary,
)
from benchmarks.lr_oracle.rules import ADAM_EPS, BETAS, MOMENTUM, RULES  # noqa: E402
from benchmarks.lr_oracle.scoring import BAND_SE, lattice_k, lattice_lr, rescore  # noqa: E402
from benchmarks.lr_oracle.tasks import TASKS, Task  # noqa: E402

COMMAND = "python -m benchmarks.lr_oracle"
NOISE_FIELDS = ("g_small_sq", "g_big_sq", "G_sq", "tr_sigma")  # compared by --remeasure


def package_commit() -> str:
    import lr_batch_callback

    root = Path(lr_batch_callback.__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() + (
            "" if root == REPO else f" (package imported from {root})")
    except Exception:
        return "unknown"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=COMMAND, description=(benchmarks.lr_oracle.__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny grids, 1 seed, 8 steps (smoke test)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: benchmarks/results; figures and markdown to "
                         "examples/results in the full run)")
    ap.add_argument("--fig-dir", type=Path, default=None, help="figure/markdown folder (default: --out, "
                    "or examples/results for the full run without --out)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {list(TASKS)}")
    ap.add_argument("--optimizers", default="sgd,adam")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    ap.add_argument("--steps", type=int, default=None, help="override S (steps per budget)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown-only", type=Path, default=None, metavar="JSON",
                    help="regenerate the markdown (and figures) from a results JSON, full or "
                         "summary (lr_oracle_summary.json), and exit")
    ap.add_argument("--rescore", type=Path, default=None, metavar="JSON",
                    help="recompute the rules and scores of a full results JSON from its stored "
                         "measurements and curves (no training), rewrite it, its CSV, its summary, "
                         "figures, markdown")
    ap.add_argument("--remeasure", type=Path, default=None, metavar="JSON",
                    help="redo the switch-point measurements of a full results JSON (the B0 prefix "
                         "retrained at its LR, no lattice), write --out/lr_oracle.json: the same "
                         "runs and scores with the new measurements")
    args = ap.parse_args(argv)
    for flag, path in (("--rescore", args.rescore), ("--remeasure", args.remeasure)):
        if path is not None and is_summary(path):
            ap.error(f"{flag} needs the full results (lr_oracle.json, written by a run); "
                     f"{path} is a summary without the measurements")
    if args.remeasure is not None and args.out is None:
        ap.error("--remeasure needs --out (the folder for the new lr_oracle.json)")
    return args


def report(results: dict[str, Any], fig_dir: Path) -> None:
    """The markdown and the figures of JSON-safe results."""
    (fig_dir / "lr_oracle.md").write_text(markdown(results))
    for name in results["tasks"]:
        plot_task(results, name, fig_dir / f"lr_oracle_{name}.png")


def new_task(name: str, args: argparse.Namespace, seeds: list[int]) -> tuple[Task, dict[str, Any]]:
    """The task, its initial and failure losses set, and what the results say about it."""
    task = TASKS[name](args.quick)
    if args.steps:
        task.steps = args.steps
    init = task.new_model(seeds)
    task.L0 = float(task.objective(init, "train").mean())
    task.L_fail = task.constant_predictor_loss()
    info = {"description": task.description, "B0": task.B0,
            "batch_sizes": task.batch_sizes, "steps": task.steps,
            "n_train": task.n_train, "n_test": int(task.x_test.shape[0]),
            "parameters": sum(p[0].numel() for p in init.parameters()),
            "L0": task.L0, "L_fail": task.L_fail, "law_samples": task.law_samples,
            "lr_guess": task.lr_guess, **task.info}
    return task, info


def _rel_diffs(new: dict[Any, float], old: dict[str, float | None],
               keys: Sequence[str] | None = None) -> list[float]:
    """|new − old|/|old| per key (batch size) of a stored measurement, over ``keys`` (default:
    all of either); inf where one side lacks a value."""
    new = {str(k): v for k, v in new.items()}
    out = []
    for k in keys if keys is not None else sorted(set(new) | set(old)):
        v, o = new.get(k), old.get(k)
        if v is None or o is None:
            out.append(0.0 if v is None and o is None else float("inf"))
        else:
            out.append(abs(v - o) / abs(o) if o != 0 else (0.0 if v == 0 else float("inf")))
    return out


def remeasure(path: Path, out_dir: Path, threads: int, argv: Sequence[str] | None) -> int:
    """``--remeasure``: the measurements of a full results JSON redone on the retrained prefix.

    Per result, the B0 run at the prefix LR is trained again alone (``train_prefix``; the copies
    of an ensemble are independent: with ≥ 2 seeds its state is the lattice's bit for bit) and
    its final training objective compared with the stored one, bit for bit. With one seed (an
    ensemble of one copy runs other kernels, which round differently), or where the objective
    differs, the B0 search of protocol a is replayed instead (``prefix_state``: the same lattice
    and rounds).
    ``measure_switch_point`` runs on that state and the result's ``measurements`` are replaced;
    its runs, rules and scores are kept. The recomputed λ, λ_precond and the noise scale's
    gradient norms are compared with the stored ones: the largest relative differences go into
    the note and ``remeasure``.
    """
    results = json.loads(path.read_text())
    config = results["config"]
    seeds, quick = [int(s) for s in config["seeds"]], bool(config["quick"])
    started = datetime.datetime.now().isoformat(timespec="seconds")
    t_all = time.perf_counter()
    tasks: dict[str, Task] = {}
    per_result = []
    worst = {"lambda": 0.0, "lambda_precond": 0.0, "noise": 0.0}
    out_dir.mkdir(parents=True, exist_ok=True)
    for tr in results["results"]:
        name, kind = tr["task"], tr["optimizer"]
        if name not in tasks:
            ns = argparse.Namespace(quick=quick, steps=tr["steps"])
            tasks[name], info = new_task(name, ns, seeds)
            known = results["tasks"][name]
            for key in ("B0", "steps", "n_train", "parameters"):
                if info[key] != known[key]:
                    raise RuntimeError(f"{name}: {key} = {info[key]} rebuilt, {known[key]} stored")
            if abs(info["L0"] - known["L0"]) > 1e-6 * abs(known["L0"]):
                raise RuntimeError(f"{name}: L0 = {info['L0']} rebuilt, {known['L0']} stored")
        task = tasks[name]
        guess = task.lr_guess[kind]
        k_best = round(lattice_k(guess, tr["prefix_lr"]))
        lr = lattice_lr(guess, k_best)  # as the search made it
        if abs(lr - tr["prefix_lr"]) > 1e-12 * tr["prefix_lr"]:
            raise RuntimeError(f"{name}/{kind}: prefix LR {tr['prefix_lr']} is not on the lattice of {guess}")
        # the stored final objective of that run, per seed (protocol a at B0, keyed k - k_best)
        stored = tr["protocols"]["a"]["runs"][str(tr["B0"])]["points"]["0"]["fixed_step"]["train"]
        t0 = time.perf_counter()
        train = None
        if len(seeds) > 1:  # one copy per seed: ≥ 2 copies, the lattice's kernels
            state, train = train_prefix(task, kind, lr, seeds)
            how = "alone"
            if train != stored:
                log(f"{name}/{kind}: the prefix trained alone ends at {train}, stored {stored}: "
                    f"replaying the B0 search")
        if train != stored:  # the same lattice and rounds as the original
            state, train = prefix_state(task, kind, k_best, Config(seeds=seeds, quick=quick))
            how = "in the replayed B0 search"
            if train != stored:
                raise RuntimeError(f"{name}/{kind}: the replayed B0 search ends at {train}, stored {stored}")
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        meas = measure_switch_point(task, kind, state, seeds, quick, lr=lr)
        t_meas = time.perf_counter() - t0
        # λ, λ_precond: Lanczos to tol 1e-3; the noise scale's gradient norms: no iteration, so
        # they test the retrained state itself
        diffs = {key: max([d for m, old in zip(meas, tr["measurements"], strict=True)
                            for d in _rel_diffs(m[key], old.get(key) or {},
                                                NOISE_FIELDS if key == "noise" else None)], default=0.0)
                 for key in worst}
        for key, d in diffs.items():
            worst[key] = max(worst[key], d)
        tr["measurements"] = [{k: v for k, v in m.items() if not k.startswith("_")} for m in meas]
        per_result.append({"task": name, "optimizer": kind, "prefix_trained": how, "train_seconds": t_train,
                           "measure_seconds": t_meas, "max_rel_diff": diffs})
        first = meas[0]
        log(f"{name}/{kind}: prefix retrained {how} in {t_train:.1f}s (final objective = stored, "
            f"bit for bit), measured in {t_meas:.1f}s; max rel. diff vs stored: lambda "
            f"{diffs['lambda']:.2e}, lambda_precond {diffs['lambda_precond']:.2e}, noise-scale "
            f"gradient norms {diffs['noise']:.2e}; seed {seeds[0]}: critical "
            f"{[round(v, 2) for v in first['critical'].values()]}, critical_update "
            f"{[round(v, 2) for v in first['critical_update'].values()]}; "
            f"{time.perf_counter() - t_all:.0f}s so far")
        (out_dir / "lr_oracle.json.tmp").write_text(json.dumps(clean(results)))  # progress
    wall = time.perf_counter() - t_all
    command = " ".join([COMMAND, *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])
    results["remeasure"] = {"command": command, "source": str(path), "started": started,
                            "wall_seconds": wall, "threads": threads, "torch": torch.__version__,
                            "package_commit": package_commit(), "max_rel_diff": worst,
                            "results": per_result}
    hows = sorted({r["prefix_trained"] for r in per_result})
    verdict = ("equal: the state is the stored one, so differences of lambda are the measurement "
               "code's" if worst["noise"] == 0 else "not equal: the state differs")
    results.setdefault("notes", []).append(
        f"Measurements redone on {started} by `{command}` (package commit {package_commit()}, "
        f"torch {torch.__version__}, {threads} thread(s), {wall:.0f} s): the B0 prefix retrained "
        f"at its LR with the same seeds ({' / '.join(hows)}; its final training objective equal "
        f"to the stored one bit for bit, every result), measure_switch_point rerun, adding the critical "
        f"sharpness along -g / -P^-1 g (`critical`) and along the optimizer's next update "
        f"(`critical_update`) on the batches of `lambda`; runs, rules and scores are those of the "
        f"original run. Recomputed vs stored, max relative difference: lambda "
        f"{worst['lambda']:.3g}, lambda_precond {worst['lambda_precond']:.3g} (Lanczos, tol 1e-3), "
        f"the gradient norms of the noise scale {worst['noise']:.3g} (no iteration: a check of the "
        f"state; {verdict}).")
    final = clean(results)
    write_json(final, out_dir / "lr_oracle.json")
    write_summary(final, out_dir / "lr_oracle_summary.json")
    tmp = out_dir / "lr_oracle.json.tmp"
    if tmp.exists():
        tmp.unlink()
    log(f"remeasured {len(per_result)} results in {wall:.1f}s; max rel. diff lambda {worst['lambda']:.3g}, "
        f"lambda_precond {worst['lambda_precond']:.3g}, noise {worst['noise']:.3g}; wrote {out_dir / 'lr_oracle.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.remeasure is not None:
        return remeasure(args.remeasure, args.out, args.threads, argv)
    if args.rescore is not None:
        results = clean(rescore(json.loads(args.rescore.read_text())))
        write_json(results, args.rescore)
        write_csv(results, args.rescore.with_suffix(".csv"))
        summary = args.rescore.with_name(args.rescore.stem + "_summary.json")
        write_summary(results, summary)
        args.markdown_only = args.rescore
    if args.markdown_only is not None:
        report(load_results(args.markdown_only), args.fig_dir or args.markdown_only.parent)
        return 0
    out_dir = args.out or (REPO / "benchmarks" / "results")
    fig_dir = args.fig_dir or (args.out if args.out is not None else REPO / "examples" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick else [0, 1, 2])
    cfg = Config(seeds=seeds, quick=args.quick)
    t_all = time.perf_counter()
    results: dict[str, Any] = {
        "config": {"command": " ".join([COMMAND, *(shlex.quote(a) for a in (
                       sys.argv[1:] if argv is None else argv))]),
                   "quick": args.quick, "seeds": seeds, "threads": args.threads,
                   "torch": torch.__version__, "python": platform.python_version(),
                   "machine": f"{platform.machine()} {os.cpu_count()} CPU(s)",
                   "package_commit": package_commit(),
                   "started": datetime.datetime.now().isoformat(timespec="seconds"),
                   "momentum": MOMENTUM, "adam_betas": BETAS, "adam_eps": ADAM_EPS,
                   "band_se": BAND_SE, "kill_factor": KILL_FACTOR, "rules": RULES},
        "tasks": {}, "results": [],
    }
    for name in args.tasks.split(","):
        task, results["tasks"][name] = new_task(name, args, seeds)
        for kind in args.optimizers.split(","):
            log(f"== {name} / {kind} ==")
            results["results"].append(run_task_optimizer(task, kind, cfg))
            results["wall_seconds"] = time.perf_counter() - t_all
            (out_dir / "lr_oracle.json.tmp").write_text(json.dumps(clean(results)))  # progress
    results["wall_seconds"] = time.perf_counter() - t_all
    final = clean(results)
    write_json(final, out_dir / "lr_oracle.json")
    tmp = out_dir / "lr_oracle.json.tmp"
    if tmp.exists():
        tmp.unlink()
    write_csv(final, out_dir / "lr_oracle.csv")
    write_summary(final, out_dir / "lr_oracle_summary.json")
    report(final, fig_dir)
    log(f"done in {results['wall_seconds']:.1f}s; wrote {out_dir / 'lr_oracle.json'}, "
        f"{out_dir / 'lr_oracle_summary.json'}, {fig_dir / 'lr_oracle.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

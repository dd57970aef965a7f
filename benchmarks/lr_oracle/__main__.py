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
from benchmarks.lr_oracle.oracle import KILL_FACTOR, Config, log, run_task_optimizer  # noqa: E402
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
from benchmarks.lr_oracle.scoring import BAND_SE, rescore  # noqa: E402
from benchmarks.lr_oracle.tasks import TASKS, Task  # noqa: E402

COMMAND = "python -m benchmarks.lr_oracle"


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
    args = ap.parse_args(argv)
    if args.rescore is not None and is_summary(args.rescore):
        ap.error(f"--rescore needs the full results (lr_oracle.json, written by a run); "
                 f"{args.rescore} is a summary without the measurements")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
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

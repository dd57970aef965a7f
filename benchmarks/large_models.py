"""What a measurement costs where models are large: training steps, products, peak memory.

Usage::

    python benchmarks/large_models.py                  # all sections, JSON + Markdown tables
    python benchmarks/large_models.py --quick          # smoke test (fewer rounds)
    python benchmarks/large_models.py --sections cost --models gpt

Sections:

- ``cost``: a *default* measurement as ``SpectrumMonitor`` runs it — ``measure_spectrum`` with
  ``MonitorConfig()``, the problem's own optimizer and LR in the training state (so AdamW gets
  the preconditioned sharpness, and both critical line searches run) and the JSON record written
  to disk — in plain training steps (forward, backward, optimizer step) timed in the same
  process; and where its time goes, attributed by timers around the functions
  ``measure_spectrum`` itself calls (graph build, λ_max Lanczos, preconditioned Lanczos,
  line searches, record and file);
- ``products``: the cost of one curvature product in training steps, exact (double backward on
  the kept graph) and forward differences of first-order gradients, and the build of each;
- ``memory``: peak memory of a λ_max measurement with each product against a training step, on
  the GPT-like model at 32 and at 2,048 tokens and on ResNet-18 (differences with the kink check
  off: refused there, measured for comparison) (one subprocess each, :mod:`benchmarks.memory`).

Problems (:mod:`benchmarks.problems`): ``gpt`` (AdamW), ``digits_cnn`` and ``resnet18`` (SGD with
momentum). Output: ``benchmarks/results/large_models.json`` and Markdown on stdout (or
``--markdown FILE``), pasted into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from benchmarks import memory as memory_mod  # noqa: E402
from benchmarks.problems import Problem, build_problem  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "large_models.json"
PARTS = ("graph build", "λ_max Lanczos", "preconditioned Lanczos", "line searches",
         "record and file")


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _step_seconds(problem: Problem, n: int) -> float:
    """Median wall time of ``n`` plain training steps (each on a fresh batch)."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        problem.train_step()
        times.append(time.perf_counter() - start)
    return _median(times)


@contextlib.contextmanager
def _attributed(timers: dict[str, float]) -> Iterator[None]:
    """Timers around what ``measure_spectrum`` calls, in its own module namespace."""
    from lr_batch_callback.monitoring import measurement as meas

    originals = {name: getattr(meas, name) for name in
                 ("build_operator", "lanczos", "_preconditioned_sharpness", "LineLoss",
                  "measure_critical")}
    depth = {"pre": 0}

    def timing(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[part] = timers.get(part, 0.0) + time.perf_counter() - start
        return wrapped

    def lanczos(*args: Any, **kwargs: Any) -> Any:
        # The preconditioned eigenproblem calls lanczos too: counted as its own part.
        return (originals["lanczos"] if depth["pre"] else
                timing("λ_max Lanczos", originals["lanczos"]))(*args, **kwargs)

    def pre(*args: Any, **kwargs: Any) -> Any:
        depth["pre"] += 1
        try:
            return timing("preconditioned Lanczos", originals["_preconditioned_sharpness"])(
                *args, **kwargs)
        finally:
            depth["pre"] -= 1

    meas.build_operator = timing("graph build", originals["build_operator"])  # type: ignore[assignment]
    meas.lanczos = lanczos  # type: ignore[assignment]
    meas._preconditioned_sharpness = pre  # type: ignore[assignment]
    meas.LineLoss = timing("line searches", originals["LineLoss"])  # type: ignore[assignment]
    meas.measure_critical = timing("line searches", originals["measure_critical"])  # type: ignore[assignment]
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(meas, name, fn)


def default_measurement(problem: Problem, seed: int, folder: str, config: Any = None
                        ) -> tuple[float, dict[str, float], Any]:
    """One measurement as the monitor runs it (record written); seconds, parts, record."""
    from lr_batch_callback import MonitorConfig
    from lr_batch_callback.monitoring.measurement import Parts, TrainingState, measure_spectrum
    from lr_batch_callback.monitoring.reporting import write_record

    lr = float(problem.optimizer.param_groups[0]["lr"])
    state = TrainingState(step=seed, epoch=0, effective_batch_size=problem.batch_size,
                          optimizer=problem.optimizer, lr=lr, lr_factor=1.0)
    timers: dict[str, float] = {}
    start = time.perf_counter()
    with _attributed(timers):
        record, _ = measure_spectrum(problem.model, problem.loss_fn, problem.batch,
                                     config or MonitorConfig(), state=state, parts=Parts(),
                                     seed=seed)
    written = time.perf_counter()
    write_record(folder, record)
    end = time.perf_counter()
    timers["record and file"] = (written - start - sum(timers.values())) + (end - written)
    return end - start, timers, record


def cost(problem: Problem, rounds: int, steps: int, configs: dict[str, Any]) -> dict[str, Any]:
    """Each configuration's measurement against the median step of the same round."""
    for _ in range(3):
        problem.train_step()
    out: dict[str, Any] = {"description": problem.description, "params": problem.num_params,
                           "optimizer": type(problem.optimizer).__name__, "configs": {}}
    unit_all: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        for label, config in configs.items():
            default_measurement(problem, 0, folder, config)  # warm-up
            acc: dict[str, Any] = {"seconds": [], "steps": [], "parts": {p: [] for p in PARTS},
                                   "products": [], "converged": [], "product": None}
            for r in range(rounds):
                unit = _step_seconds(problem, steps)
                unit_all.append(unit)
                seconds, parts, record = default_measurement(problem, r, folder, config)
                acc["seconds"].append(seconds)
                acc["steps"].append(seconds / unit)
                for p in PARTS:
                    acc["parts"][p].append(parts.get(p, 0.0) / unit)
                acc["products"].append(record.estimate.num_products)
                acc["converged"].append(record.estimate.converged)
                acc["product"] = record.estimate.product
                acc["critical_passes"] = record.estimate.critical_passes
                acc["preconditioned"] = record.estimate.preconditioned_lambda_max is not None
            out["configs"][label] = {
                "ms": 1e3 * _median(acc["seconds"]), "training_steps": _median(acc["steps"]),
                "parts_steps": {p: _median(v) for p, v in acc["parts"].items()},
                "products": _median(acc["products"]), "converged": all(acc["converged"]),
                "product": acc["product"], "critical_passes": acc["critical_passes"],
                "preconditioned": acc["preconditioned"], "rounds": rounds,
            }
            print(f"  {problem.name} {label}: {out['configs'][label]['training_steps']:.1f} steps",
                  file=sys.stderr)
    out["train_step_ms"] = 1e3 * _median(unit_all)
    return out


@contextlib.contextmanager
def _kinks_ignored() -> Iterator[None]:
    """Let finite differences run on a piecewise-linear model, to time them (not to trust them)."""
    from lr_batch_callback.engine import finite_difference as fd

    original = fd.kinks_on_the_way
    fd.kinks_on_the_way = lambda *a, **k: []  # type: ignore[assignment]
    try:
        yield
    finally:
        fd.kinks_on_the_way = original  # type: ignore[assignment]


def products(problem: Problem, rounds: int, steps: int, n: int) -> dict[str, Any]:
    """Build and per-product seconds of each product kind, in training steps of the round."""
    from lr_batch_callback.engine.products import build_operator
    from lr_batch_callback.engine.smoothness import kinks_on_the_way

    for _ in range(3):
        problem.train_step()
    kinks = sorted(set(kinks_on_the_way(problem.loss_fn(problem.model, problem.batch), None)))
    out: dict[str, Any] = {"kinks": kinks, "kinds": {}}
    for kind in ("exact", "finite_difference"):
        builds, per = [], []
        for _ in range(rounds):
            unit = _step_seconds(problem, steps)
            guard = _kinks_ignored() if kinks and kind != "exact" else contextlib.nullcontext()
            with guard:
                start = time.perf_counter()
                op = build_operator("hessian", kind, problem.model, problem.loss_fn,
                                    [problem.batch])
                built = time.perf_counter()
                with op:
                    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
                    op.matvec(v)  # first product (FD: the base gradient lives in the build)
                    first = time.perf_counter()
                    for _ in range(n):
                        op.matvec(v)
                    end = time.perf_counter()
            builds.append((built - start) / unit)  # differences: the base gradient is in the build
            per.append((end - first) / n / unit)
        out["kinds"][kind] = {"build_steps": _median(builds), "product_steps": _median(per)}
        print(f"  {problem.name} {kind}: product {out['kinds'][kind]['product_steps']:.2f} steps",
              file=sys.stderr)
    return out


PIECEWISE_LINEAR = {"digits_cnn", "resnet18"}  # ReLU / max-pooling: differences are refused


def memory(models: tuple[str, ...], weights_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in models:
        problem = build_problem(name)
        path = os.path.join(weights_dir, f"{name}.pt")
        torch.save(problem.model.state_dict(), path)
        fd_task = "fd_lambda_max_kinks_ignored" if name in PIECEWISE_LINEAR else "fd_lambda_max"
        out[name] = memory_mod.measure_all(
            name, ["train_step", "exact_lambda_max", fd_task], path, threads=1)
        for row in out[name]:
            print(f"  {name} {row['task']}: {row.get('x_train_step', row.get('error'))}",
                  file=sys.stderr)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for name, res in results.get("cost", {}).items():
        lines += [f"### A measurement as the monitor runs it — `{name}` ({res['optimizer']})", "",
                  f"{res['description']}; {res['params']:,} parameters. Unit: a plain training "
                  f"step (forward, backward, {res['optimizer']} step), "
                  f"{res['train_step_ms']:.1f} ms.", "",
                  "| configuration | product | products | ms | training steps | "
                  + " | ".join(PARTS) + " |",
                  "|---" * (5 + len(PARTS)) + "|"]
        for label, c in res["configs"].items():
            parts = " | ".join(f"{c['parts_steps'][p]:.2f}" for p in PARTS)
            lines.append(f"| `{label}` | {c['product']} | {c['products']:g} | {c['ms']:.0f} | "
                         f"**{c['training_steps']:.1f}** | {parts} |")
        lines.append("")
    if results.get("products"):
        lines += ["### One curvature product, in training steps", "",
                  "| model | exact build | exact product | differences build | "
                  "differences product | kinks (differences refused) |", "|---" * 6 + "|"]
        for name, res in results["products"].items():
            e, f = res["kinds"]["exact"], res["kinds"]["finite_difference"]
            kinks = ", ".join(res["kinks"][:4]) or "none"
            lines.append(f"| {name} | {e['build_steps']:.2f} | {e['product_steps']:.2f} | "
                         f"{f['build_steps']:.2f} | {f['product_steps']:.2f} | {kinks} |")
        lines.append("")
    if results.get("memory"):
        lines += ["### Peak memory of a λ_max measurement ÷ a training step", "",
                  "| model | training step | exact | ÷ step | differences | ÷ step |",
                  "|---" * 6 + "|"]
        for name, rows in results["memory"].items():
            by = {r["task"]: r for r in rows}

            def mib(task: str, by: dict[str, Any] = by) -> str:
                r = by.get(task, {})
                return f"{r['peak_bytes'] / 2**20:.1f} MiB" if "peak_bytes" in r else r.get(
                    "error", "–")

            def ratio(task: str, by: dict[str, Any] = by) -> str:
                r = by.get(task, {})
                return f"{r['x_train_step']:.2f}×" if "x_train_step" in r else "–"

            fd = "fd_lambda_max" if "fd_lambda_max" in by else "fd_lambda_max_kinks_ignored"
            note = "" if fd == "fd_lambda_max" else " ¹"
            lines.append(f"| {name} | {mib('train_step')} | {mib('exact_lambda_max')} | "
                         f"{ratio('exact_lambda_max')} | {mib(fd)}{note} | {ratio(fd)}{note} |")
        lines += ["", "¹ ReLU network: the monitor refuses differences there (kinks); measured "
                  "with the kink check switched off, to compare the memory of the two products."
                  if any("fd_lambda_max_kinks_ignored" in {r["task"] for r in rows}
                         for rows in results["memory"].values()) else "", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="cost,products,memory")
    parser.add_argument("--models", default="gpt,digits_cnn,resnet18")
    parser.add_argument("--memory-models", default="gpt,gpt_long,resnet18")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--markdown", default="-")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sections, models = args.sections.split(","), tuple(args.models.split(","))
    rounds = 2 if args.quick else 5
    from lr_batch_callback import MonitorConfig

    configs = {"MonitorConfig()": MonitorConfig(),
               "MonitorConfig(product='finite_difference')":
                   MonitorConfig(product="finite_difference")}
    results: dict[str, Any] = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                               "load_average": os.getloadavg()[0]}
    if "cost" in sections:
        results["cost"] = {}
        for name in models:
            problem = build_problem(name)
            use = configs if name == "gpt" else {"MonitorConfig()": configs["MonitorConfig()"]}
            results["cost"][name] = cost(problem, rounds if name != "resnet18" else 2,
                                         20 if name != "resnet18" else 5, use)
    if "products" in sections:
        results["products"] = {n: products(build_problem(n), rounds if n != "resnet18" else 2,
                                           20 if n != "resnet18" else 5, 10 if n != "resnet18" else 3)
                               for n in models if n != "digits_cnn"}
    if "memory" in sections:
        with tempfile.TemporaryDirectory() as folder:
            results["memory"] = memory(tuple(args.memory_models.split(",")), folder)
    if not args.quick:
        # A run of some sections or models keeps the other stored figures; "dates" says when
        # each model of each section was measured.
        stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        for section in ("cost", "products", "memory"):
            for model, figures in results.get(section, {}).items():
                stored.setdefault(section, {})[model] = figures
                stored.setdefault("dates", {})[f"{section}/{model}"] = results["date"]
        results = {**stored, **{k: v for k, v in results.items()
                                if k not in ("cost", "products", "memory")}}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
    text = markdown(results)
    if args.markdown == "-":
        print(text)
    else:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory of a measurement against a training step, each in its own subprocess.

Each task runs in a fresh subprocess (``python -m benchmarks.memory SPEC``), so that no allocator
cache or earlier peak is shared. The subprocess rebuilds the problem with the parent's weights
(its first batch is the same), imports every library, runs one no-grad forward pass, records a
baseline, runs the task once and reports the peak *increase* of the *anonymous* resident memory
(``/proc/self/statm``: resident − shared pages), sampled every 0.5 ms by a thread. The kernel's
high-water mark (``VmHWM`` = ``ru_maxrss``) also counts file-backed pages — the libtorch code a
task touches first, whose amount moved by 100+ MiB with what other processes had run — and
``tracemalloc`` does not see torch's allocator. glibc's mmap threshold is fixed at 64 KiB so that
freed blocks leave the resident set and a repeated allocation is seen again.

The training step is the problem's optimizer (SGD with momentum 0.9, AdamW for the transformers)
in steady state: one step first (momentum buffers
exist, ``.grad`` is then freed as ``zero_grad(set_to_none=True)`` does), then the measured step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

TASKS = {
    "train_step": "training step (forward, backward, optimizer step)",
    "default_measurement": "ours: default measurement (λ_max)",
    "lambda_min_measurement": "ours: measurement with λ_min",
    "density_measurement": "ours: measurement with density",
    "exact_lambda_max": "ours: λ_max, product='exact'",
    "fd_lambda_max": "ours: λ_max, product='finite_difference'",
    "fd_lambda_max_kinks_ignored": "ours: λ_max, product='finite_difference', kinks ignored "
                                   "(memory of a refused product, for comparison only)",
    "pyhessian": "PyHessian: eigenvalues(tol=1e-3)",
    "eigenthings_power": "hessian-eigenthings: power_iteration_one(tol=1e-3)",
    "curvlinops_eigsh": "curvlinops: eigsh(k=1, which='LA', tol=1e-3)",
}
PEER_TASKS = {"pyhessian": "PyHessian", "eigenthings_power": "hessian-eigenthings",
              "curvlinops_eigsh": "curvlinops"}


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _anon_bytes() -> int:
    """Resident memory that is not file-backed (``statm``: resident − shared pages)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * _PAGE


class _AnonPeak:
    """Samples the anonymous resident set every ``interval`` seconds in a thread; the maximum.

    The kernel's own high-water mark (``VmHWM``, ``ru_maxrss``) also counts file-backed pages:
    the code of libtorch that a task touches for the first time, whose amount depends on the page
    cache (what other processes ran before). Anonymous memory is what tensors and graphs use.
    """

    def __init__(self, interval: float = 5e-4) -> None:
        self.interval = interval
        self.peak = _anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _anon_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> _AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_bytes())


def _import_for(task: str) -> None:
    """Import everything the task needs *before* the baseline: imports are not the task's memory
    (``lr_batch_callback`` pulls in Lightning, hundreds of MiB of resident modules)."""
    import lr_batch_callback  # noqa: F401
    import lr_batch_callback.monitoring.measurement  # noqa: F401
    from benchmarks import methods  # noqa: F401

    if task == "pyhessian":
        import pyhessian  # noqa: F401
    elif task == "eigenthings_power":
        import hessian_eigenthings  # noqa: F401
    elif task == "curvlinops_eigsh":
        import curvlinops  # noqa: F401
        import scipy.sparse.linalg  # noqa: F401


def _run_task(task: str, problem: Any) -> None:
    from benchmarks import methods as M

    batch = problem.batch
    if task == "train_step":
        problem.optimizer.zero_grad(set_to_none=True)
        problem.loss_fn(problem.model, batch).backward()
        problem.optimizer.step()
    elif task == "default_measurement":
        M.ours_measurement(problem, batch, parts=(False, False))
    elif task == "lambda_min_measurement":
        M.ours_measurement(problem, batch, parts=(True, False))
    elif task == "density_measurement":
        M.ours_measurement(problem, batch, parts=(False, True))
    elif task in ("exact_lambda_max", "fd_lambda_max", "fd_lambda_max_kinks_ignored"):
        from lr_batch_callback import MonitorConfig
        from lr_batch_callback.engine import finite_difference as fd

        product = "exact" if task == "exact_lambda_max" else "finite_difference"
        check = fd.kinks_on_the_way
        if task == "fd_lambda_max_kinks_ignored":  # a ReLU network: differences are refused
            fd.kinks_on_the_way = lambda *a, **k: []  # type: ignore[assignment]
        try:
            M.ours_measurement(problem, batch, config=MonitorConfig(product=product,
                                                                    critical_sharpness=False))
        finally:
            fd.kinks_on_the_way = check  # type: ignore[assignment]
    elif task == "pyhessian":
        M.pyhessian(problem, batch, tol=1e-3)
    elif task == "eigenthings_power":
        M.eigenthings_power(problem, batch, tol=1e-3)
    elif task == "curvlinops_eigsh":
        M.curvlinops_eigsh(problem, batch, tol=1e-3)
    else:
        raise ValueError(f"unknown task {task!r}")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in the subprocess: build the problem, measure the task, return the peak increase."""
    from benchmarks.problems import build_problem

    torch.set_num_threads(spec.get("threads") or 1)
    state_dict = torch.load(spec["weights"]) if spec.get("weights") else None
    problem = build_problem(spec["model"], state_dict=state_dict, seed=spec.get("seed", 0))
    _import_for(spec["task"])
    with torch.no_grad():
        problem.model(problem.batch[0])
    if spec["task"] == "train_step":
        _run_task("train_step", problem)  # steady state: momentum buffers exist
        problem.optimizer.zero_grad(set_to_none=True)
    base = _anon_bytes()
    with _AnonPeak() as sampler:
        _run_task(spec["task"], problem)
    peak = max(sampler.peak - base, 0)
    return {"peak_bytes": peak, "param_bytes": problem.num_params * 4}


def measure(spec: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """Run one measurement in a fresh subprocess; an error is returned, not raised."""
    env = dict(os.environ)
    # A fixed mmap threshold stops glibc from keeping freed blocks resident (its dynamic
    # threshold would hide a repeated allocation's peak inside the baseline RSS).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("MEMORY_RESULT "):
            return json.loads(line[len("MEMORY_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return {"error": tail[-1][:160] if tail else f"exit code {proc.returncode}"}


def measure_all(model: str, tasks: list[str], weights: str, threads: int,
                timeout: float = 900.0) -> list[dict[str, Any]]:
    """One subprocess per task; ``x_train_step`` divides each peak by the training step's."""
    rows = []
    for task in tasks:
        result = measure({"model": model, "task": task, "weights": weights, "threads": threads},
                         timeout)
        rows.append({"task": task, "label": TASKS[task], **result})
    train = next((r["peak_bytes"] for r in rows if r["task"] == "train_step" and "peak_bytes" in r),
                 None)
    for r in rows:
        if train and "peak_bytes" in r:
            r["x_train_step"] = r["peak_bytes"] / train
    return rows


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        result = worker(spec)
    except Exception as exc:  # reported to the parent as a table entry
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"}
    print("MEMORY_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""Peak memory of one estimate, as a multiple of one training step's peak.

Each measurement runs in a fresh subprocess (``python -m benchmarks.memory SPEC``) so that no
allocator cache or earlier peak is shared between measurements. The subprocess builds the problem
(model, weights, batch), runs one no-grad forward pass to initialise the libraries, records a
baseline, runs the measured task once and reports the peak *increase* over the baseline:

- CPU: the peak of the *anonymous* resident memory (``/proc/self/statm``: resident − shared pages),
  sampled every 0.5 ms by a thread while the task runs, minus its value at the baseline. The
  kernel's high-water mark (``VmHWM`` = ``ru_maxrss``, resettable through ``/proc/self/clear_refs``)
  was tried first and rejected: it also counts file-backed pages, i.e. the libtorch code a task
  touches for the first time, and that amount changed by 100+ MiB with what other processes had
  run before (page-cache fault-around). ``tracemalloc`` does not see torch's allocator.
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` at the baseline.

The training step is SGD with momentum 0.9 in steady state: one step is taken first (so momentum
buffers exist, as in training), then the second step is measured. Every library is imported
before the baseline (``lr_batch_callback`` pulls in Lightning). The subprocess runs with glibc's
mmap threshold fixed at 64 KiB, so that freed blocks leave the resident set and a repeated
allocation is seen again.
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
    "train_step": "training step (forward, backward, SGD step)",
    "ours_eig": "ours: hessian_eigenvalues(k=1, tol=1e-4)",
    "ours_eig_ggn": "ours: hessian_eigenvalues(k=1, tol=1e-4, curvature='ggn')",
    "ours_density": "ours: spectral_density(8 probes × 30 steps, batched)",
    "ours_density_seq": "ours: spectral_density(8 × 30, batched=False)",
    "pyhessian_eig": "PyHessian: eigenvalues() defaults",
    "eigenthings_lanczos": "hessian-eigenthings: lanczos(k=1, max_iter=20, which='LA')",
    "curvlinops_eigsh": "curvlinops: eigsh(k=1, which='LA', tol=1e-4)",
}


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
    from benchmarks import methods  # noqa: F401

    if task == "pyhessian_eig":
        import pyhessian  # noqa: F401
    elif task == "eigenthings_lanczos":
        import hessian_eigenthings  # noqa: F401
    elif task == "curvlinops_eigsh":
        import curvlinops  # noqa: F401
        import scipy.sparse.linalg  # noqa: F401


def _run_task(task: str, problem: Any, spec: dict[str, Any]) -> None:
    from benchmarks import methods
    from lr_batch_callback import hessian_eigenvalues, spectral_density

    if task == "train_step":
        optimizer = spec["_optimizer"]
        optimizer.zero_grad(set_to_none=True)
        problem.loss_fn(problem.model, problem.batch).backward()
        optimizer.step()
    elif task in ("ours_eig", "ours_eig_ggn"):
        hessian_eigenvalues(problem.model, problem.loss_fn, problem.batch, k=1, tol=1e-4, seed=0,
                            curvature="ggn" if task == "ours_eig_ggn" else "hessian")
    elif task in ("ours_density", "ours_density_seq"):
        spectral_density(problem.model, problem.loss_fn, problem.batch, num_probes=8,
                         num_steps=30, seed=0, batched=task == "ours_density")
    elif task == "pyhessian_eig":
        from pyhessian.hessian import hessian

        torch.manual_seed(0)
        hessian(problem.model, problem.criterion, data=problem.batch,
                cuda=problem.device.type == "cuda").eigenvalues()
    elif task == "eigenthings_lanczos":
        methods.eigenthings_lanczos(problem, 0, k=1, max_iter=20, which="LA")
    elif task == "curvlinops_eigsh":
        methods.curvlinops_eigsh(problem, methods.eigenthings_start(problem.num_params, 0), 1000,
                                 tol=1e-4)
    else:
        raise ValueError(f"unknown task {task!r}")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in the subprocess: build the problem, measure the task, return the peak increase."""
    from benchmarks.problems import build_problem

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    state_dict = torch.load(spec["weights"], map_location="cpu") if spec.get("weights") else None
    problem = build_problem(spec["model"], device, batch_size=spec.get("batch_size"),
                            pretrain_steps=spec.get("pretrain_steps", 300), state_dict=state_dict)
    _import_for(spec["task"])
    with torch.no_grad():
        problem.model(problem.batch[0])
    if spec["task"] == "train_step":
        spec["_optimizer"] = torch.optim.SGD(problem.model.parameters(), lr=1e-3, momentum=0.9)
        _run_task("train_step", problem, spec)  # steady state: momentum buffers exist
        spec["_optimizer"].zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _run_task(spec["task"], problem, spec)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        method = "torch.cuda.max_memory_allocated − baseline"
    else:
        base = _anon_bytes()
        with _AnonPeak() as sampler:
            _run_task(spec["task"], problem, spec)
        peak = max(sampler.peak - base, 0)
        method = ("peak anonymous resident memory (statm resident − shared, sampled every 0.5 ms) "
                  "− baseline, glibc mmap threshold fixed at 64 KiB")
    return {"peak_bytes": peak, "method": method, "param_bytes": problem.num_params * 4}


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


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        result = worker(spec)
    except Exception as exc:  # reported to the parent as a table entry
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"}
    print("MEMORY_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""Adapters that call lr_batch_callback and each peer the way its own sources intend.

Peers (the project's optional ``bench`` extra): PyHessian 0.1, hessian-eigenthings 1.0.0a5 and
curvlinops-for-pytorch. A peer that is not installed is reported as such; every call to a peer is
wrapped by the caller so that its failure becomes a table entry, not a crash.

Each product adapter returns ``(product, teardown)``: ``product()`` computes one operator product
(or ``vectors`` of them) on the fixed batch; ``teardown()`` frees graphs and clears any ``.grad``
the peer left behind (PyHessian stores a differentiable gradient graph in ``.grad``).

Eigenvalue "traces" record, for every operator product of a capped run, the elapsed wall time and
the value the method would return if its own stopping rule fired right there. Replaying a peer's
stopping rule on its trace gives the products and time that run would have taken with any ``tol``:
the arithmetic up to the stop is identical, so this is exact, and it costs one run instead of one
per ``tol``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.problems import Problem, sync

PEERS = {
    "PyHessian": ("pyhessian", "pyhessian"),
    "hessian-eigenthings": ("hessian_eigenthings", "hessian-eigenthings"),
    "curvlinops": ("curvlinops", "curvlinops-for-pytorch"),
}

Product = tuple[Callable[[], Any], Callable[[], None]]


class PeerMissing(RuntimeError):
    """The peer package is not installed."""


class CapReached(RuntimeError):
    """A run used up its product budget before stopping."""


class _TraceDone(Exception):
    """Raised from inside a recorded run once every stopping rule of interest has decided."""


Done = Callable[["Trace"], bool]


def installed(peer: str) -> bool:
    return importlib.util.find_spec(PEERS[peer][0]) is not None


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def peer_versions() -> dict[str, str]:
    return {peer: version(dist) for peer, (_, dist) in PEERS.items()}


def _require(peer: str) -> None:
    if not installed(peer):
        raise PeerMissing(f"{peer} not installed")


def split_like(v: Tensor, params: list[Tensor]) -> list[Tensor]:
    """A flat vector as a list of tensors shaped like ``params``."""
    return [c.reshape(p.shape) for c, p in zip(torch.split(v, [p.numel() for p in params]), params,
                                                strict=True)]


# -- product adapters ----------------------------------------------------------------------------


def ours_product(problem: Problem, v: Tensor, curvature: str, vectors: int = 1,
                 batched: bool = True) -> Product:
    """Products on our operator, used inside ``isolated()`` as the estimates use it (leaving the
    guard restores buffers, which invalidates a graph that saved them, e.g. eval-mode BN)."""
    from lr_batch_callback.isolation import isolated
    from lr_batch_callback.operators import make_operator

    guard = contextlib.ExitStack()
    guard.enter_context(isolated(problem.model))
    try:
        op = make_operator(curvature, problem.model, problem.loss_fn, [problem.batch],
                           batched_products=batched)
    except BaseException:
        guard.close()
        raise

    def teardown() -> None:
        guard.close()
        problem.clear_grads()

    if vectors == 1:
        return (lambda: op.matvec(v)), teardown
    V = torch.randn(vectors, v.numel(), generator=torch.Generator().manual_seed(1)).to(v)
    return (lambda: op.matmat(V)), teardown


def ours_graph_build(problem: Problem, curvature: str) -> Product:
    """Building the operator: one forward and one backward pass with ``create_graph=True``."""
    from lr_batch_callback.isolation import isolated
    from lr_batch_callback.operators import make_operator

    def build() -> None:
        with isolated(problem.model):
            make_operator(curvature, problem.model, problem.loss_fn, [problem.batch])

    return build, problem.clear_grads


def _free_operator(problem: Problem) -> Any:
    """A diagonal operator of the problem's size: products cost nothing, so timing Lanczos on it
    measures our bookkeeping alone (reorthogonalisation, float64 coefficients, stopping test)."""
    from lr_batch_callback.operators import CurvatureOperator

    class Diagonal(CurvatureOperator):
        def __init__(self, d: Tensor) -> None:
            super().__init__([d])
            self.d = d

        def _local_matmat(self, V: Tensor) -> Tensor:
            return V * self.d

    d = torch.linspace(1.0, 2.0, problem.num_params, device=problem.device)
    return Diagonal(d)


def ours_lanczos_overhead(problem: Problem, steps: int) -> Product:
    """``steps`` Lanczos steps (k=1) of ours on a free operator: the per-run bookkeeping."""
    from lr_batch_callback.lanczos import lanczos

    op = _free_operator(problem)
    return (lambda: lanczos(op, 1, tol=1e-30, max_iter=steps, seed=0,
                            warn_unconverged=False)), problem.clear_grads


def ours_slq_overhead(problem: Problem, probes: int, steps: int, batched: bool) -> Product:
    """Our SLQ (``probes`` × ``steps``) on a free operator: the per-run bookkeeping."""
    from lr_batch_callback.density import rademacher_probes, slq_quadrature

    op = _free_operator(problem)
    Q = rademacher_probes(probes, op.dim, torch.Generator().manual_seed(0))
    return (lambda: slq_quadrature(op, Q, steps, batched=batched)), problem.clear_grads


def pyhessian_product(problem: Problem, v: Tensor, dataloader: bool = False) -> Product:
    _require("PyHessian")
    from pyhessian.hessian import hessian
    from pyhessian.utils import hessian_vector_product

    cuda = problem.device.type == "cuda"
    vs = split_like(v, problem.params)
    if dataloader:  # recomputes forward and backward for every product
        h = hessian(problem.model, problem.criterion, dataloader=[problem.batch], cuda=cuda)
        return (lambda: h.dataloader_hv_product(vs)), problem.clear_grads
    h = hessian(problem.model, problem.criterion, data=problem.batch, cuda=cuda)
    return (lambda: hessian_vector_product(h.gradsH, h.params, vs)), problem.clear_grads


def eigenthings_operator(problem: Problem, curvature: str) -> Any:
    _require("hessian-eigenthings")
    import hessian_eigenthings as he

    if curvature == "hessian":
        return he.HessianOperator(problem.model, [problem.batch], problem.loss_fn)
    return he.GGNOperator(problem.model, [problem.batch], he.supervised_forward,
                          he.supervised_loss_of_output(problem.criterion))


def eigenthings_product(problem: Problem, v: Tensor, curvature: str) -> Product:
    op = eigenthings_operator(problem, curvature)
    return (lambda: op.matvec(v)), problem.clear_grads


def curvlinops_operator(problem: Problem, curvature: str) -> Any:
    _require("curvlinops")
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    cls = HessianLinearOperator if curvature == "hessian" else GGNLinearOperator
    # check_deterministic=False skips curvlinops' construction-time self-test (extra products).
    return cls(problem.model, problem.criterion, problem.params, [problem.batch],
               check_deterministic=False)


def curvlinops_product(problem: Problem, v: Tensor, curvature: str) -> Product:
    op = curvlinops_operator(problem, curvature)
    return (lambda: op @ v), problem.clear_grads


@dataclass(frozen=True)
class ProductMethod:
    """One row of the product-cost table."""

    method: str
    curvature: str
    setup: Callable[[Problem, Tensor], Product]
    vectors: int = 1
    note: str = ""
    peer: str | None = None


PRODUCT_METHODS = [
    ProductMethod("ours", "hessian", lambda p, v: ours_product(p, v, "hessian"),
                  note="graph reused"),
    ProductMethod("ours, 8 vectors batched", "hessian",
                  lambda p, v: ours_product(p, v, "hessian", 8, batched=True), 8,
                  note="per vector; is_grads_batched"),
    ProductMethod("ours, 8 vectors looped", "hessian",
                  lambda p, v: ours_product(p, v, "hessian", 8, batched=False), 8,
                  note="per vector; batched_products=False"),
    ProductMethod("ours: operator build (once)", "hessian",
                  lambda p, v: ours_graph_build(p, "hessian"),
                  note="forward + create_graph backward, paid once per estimate"),
    ProductMethod("ours: Lanczos bookkeeping per step", "hessian",
                  lambda p, v: ours_lanczos_overhead(p, 30), 30,
                  note="30 steps on a free operator; averaged per step"),
    ProductMethod("ours: SLQ bookkeeping per probe-step", "hessian",
                  lambda p, v: ours_slq_overhead(p, 8, 30, True), 240,
                  note="8 probes × 30 steps batched, free operator; per probe-step"),
    ProductMethod("PyHessian (data=)", "hessian", lambda p, v: pyhessian_product(p, v),
                  note="graph reused", peer="PyHessian"),
    ProductMethod("PyHessian (dataloader=)", "hessian",
                  lambda p, v: pyhessian_product(p, v, dataloader=True),
                  note="recomputes forward+backward", peer="PyHessian"),
    ProductMethod("hessian-eigenthings", "hessian",
                  lambda p, v: eigenthings_product(p, v, "hessian"),
                  note="recomputes forward+backward", peer="hessian-eigenthings"),
    ProductMethod("curvlinops", "hessian", lambda p, v: curvlinops_product(p, v, "hessian"),
                  note="torch.func jvp(jacrev)", peer="curvlinops"),
    ProductMethod("ours", "ggn", lambda p, v: ours_product(p, v, "ggn"), note="graph reused"),
    ProductMethod("ours, 8 vectors batched", "ggn",
                  lambda p, v: ours_product(p, v, "ggn", 8, batched=True), 8,
                  note="per vector; is_grads_batched"),
    ProductMethod("ours, 8 vectors looped", "ggn",
                  lambda p, v: ours_product(p, v, "ggn", 8, batched=False), 8,
                  note="per vector; batched_products=False"),
    ProductMethod("hessian-eigenthings", "ggn", lambda p, v: eigenthings_product(p, v, "ggn"),
                  note="torch.func jvp + vjp, recomputes forward", peer="hessian-eigenthings"),
    ProductMethod("curvlinops", "ggn", lambda p, v: curvlinops_product(p, v, "ggn"),
                  peer="curvlinops"),
]


# -- λ_max: traces, replays and real runs ----------------------------------------------------------


@dataclass
class Trace:
    """Per product: elapsed seconds since the method was called (set-up included) and estimate."""

    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)
    setup_seconds: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """What one configured run returned."""

    value: float | None
    products: int
    seconds: float
    config: str
    note: str = ""


def pyhessian_trace(problem: Problem, seed: int, cap: int, done: Done | None = None) -> Trace:
    """PyHessian's ``eigenvalues()`` power iteration for ``cap`` products, recorded; ended early
    once ``done(trace)`` (every replayed stopping rule has decided)."""
    _require("PyHessian")
    import pyhessian.hessian  # noqa: F401 - the package re-exports the class under the same name

    ph = sys.modules["pyhessian.hessian"]
    original = ph.hessian_vector_product
    trace = Trace()
    start = [0.0]

    def recording(grads: Any, params: Any, v: Any) -> Any:
        hv = original(grads, params, v)
        # exactly PyHessian's own estimate: group_product(Hv, v).cpu().item()
        trace.values.append(sum(torch.sum(a * b) for a, b in zip(hv, v, strict=True)).cpu().item())
        trace.times.append(time.perf_counter() - start[0])
        if done is not None and done(trace):
            raise _TraceDone
        return hv

    ph.hessian_vector_product = recording
    try:
        torch.manual_seed(seed)  # PyHessian draws its start vector from the global generator
        sync(problem.device)
        start[0] = time.perf_counter()
        h = ph.hessian(problem.model, problem.criterion, data=problem.batch,
                       cuda=problem.device.type == "cuda")
        trace.setup_seconds = time.perf_counter() - start[0]
        h.eigenvalues(maxIter=cap, tol=0.0)  # tol=0 never stops early: the full trace
    except _TraceDone:
        pass
    finally:
        ph.hessian_vector_product = original
        problem.clear_grads()
    return trace


def replay_pyhessian(trace: Trace, tol: float, max_iter: int = 100) -> Outcome | None:
    """PyHessian's stop: relative change of consecutive estimates below ``tol``; it returns the
    *previous* estimate. ``None`` when the trace ended before the rule decided."""
    eigenvalue = None
    for i, tmp in enumerate(trace.values[:max_iter]):
        if eigenvalue is not None and abs(eigenvalue - tmp) / (abs(eigenvalue) + 1e-6) < tol:
            return Outcome(eigenvalue, i + 1, trace.times[i], f"eigenvalues(maxIter={max_iter}, "
                           f"tol={tol:g})")
        eigenvalue = tmp
    if len(trace.values) >= max_iter:
        return Outcome(eigenvalue, max_iter, trace.times[max_iter - 1],
                       f"eigenvalues(maxIter={max_iter}, tol={tol:g})", "hit maxIter")
    return None


class _Recorder:
    """A hessian-eigenthings operator that records every product of the wrapped one."""

    def __init__(self, op: Any, trace: Trace, start: list[float], residual: bool,
                 done: Done | None = None) -> None:
        self.op, self.trace, self.start, self.residual = op, trace, start, residual
        self.done = done

    def make(self) -> Any:
        import hessian_eigenthings as he

        def matvec(v: Tensor) -> Tensor:
            av = self.op.matvec(v)
            lam = torch.dot(v, av)
            self.trace.values.append(lam.item())
            if self.residual:
                self.trace.residuals.append(torch.linalg.vector_norm(av - lam * v).item())
            self.trace.times.append(time.perf_counter() - self.start[0])
            if self.done is not None and self.done(self.trace):
                raise _TraceDone
            return av

        return he.LambdaOperator(matvec, self.op.size, self.op.device, self.op.dtype)


def eigenthings_power_trace(problem: Problem, seed: int, cap: int,
                            done: Done | None = None) -> Trace:
    """hessian-eigenthings' ``power_iteration_one`` for ``cap`` products, recorded."""
    import hessian_eigenthings as he

    trace, start = Trace(), [0.0]
    sync(problem.device)
    start[0] = time.perf_counter()
    op = eigenthings_operator(problem, "hessian")
    trace.setup_seconds = time.perf_counter() - start[0]
    try:
        he.power_iteration_one(_Recorder(op, trace, start, True, done).make(), max_iter=cap,
                               tol=0.0, seed=seed)
    except _TraceDone:
        pass
    finally:
        problem.clear_grads()
    return trace


def replay_eigenthings_power(trace: Trace, tol: float, max_iter: int = 100) -> Outcome | None:
    """``power_iteration_one``'s stop: relative change and relative residual both below ``tol``;
    it returns the current estimate."""
    previous = 0.0
    n = min(max_iter, len(trace.values))
    for it in range(n):
        lam, res = trace.values[it], trace.residuals[it]
        denom = max(abs(lam), 1e-12)
        if it > 0 and abs(lam - previous) / denom < tol and res / denom < tol:
            return Outcome(lam, it + 1, trace.times[it],
                           f"power_iteration_one(max_iter={max_iter}, tol={tol:g})")
        previous = lam
    if len(trace.values) >= max_iter:
        return Outcome(trace.values[max_iter - 1], max_iter, trace.times[max_iter - 1],
                       f"power_iteration_one(max_iter={max_iter}, tol={tol:g})", "hit max_iter")
    return None


def eigenthings_lanczos_prefix(problem: Problem, seed: int, cap: int) -> Trace:
    """The top Ritz value after each step of one reorthogonalised Lanczos run (the same start
    vector ``lanczos(seed=...)`` draws): the fewest steps ``max_iter`` needs for an error level."""
    import hessian_eigenthings as he

    op = eigenthings_operator(problem, "hessian")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v0 = torch.randn(op.size, dtype=op.dtype, generator=gen).to(op.device)
    trace, start = Trace(), [time.perf_counter()]
    try:
        td = he.lanczos_tridiagonal(_Recorder(op, Trace(), start, False).make(), v0, cap,
                                    reorthogonalize=True)
    finally:
        problem.clear_grads()
    trace.values = top_ritz_prefix(td.alphas.double().cpu().numpy(),
                                   td.betas.double().cpu().numpy())
    return trace


def eigenthings_lanczos(problem: Problem, seed: int, **kwargs: Any) -> Outcome:
    """A real ``hessian_eigenthings.lanczos`` run; the first returned eigenvalue is the answer."""
    import hessian_eigenthings as he

    count = [0]
    sync(problem.device)
    start = time.perf_counter()
    op = eigenthings_operator(problem, "hessian")
    base = op.matvec

    def counting(v: Tensor) -> Tensor:
        count[0] += 1
        return base(v)

    op.matvec = counting
    try:
        result = he.lanczos(op, seed=seed, **kwargs)
        value = float(result.eigenvalues[0])
        converged = bool(result.converged[0])
        sync(problem.device)
    finally:
        problem.clear_grads()
    config = "lanczos(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    return Outcome(value, count[0], time.perf_counter() - start, config,
                   "converged" if converged else "")


def eigenthings_start(dim: int, seed: int) -> Tensor:
    """The start vector hessian-eigenthings' ``lanczos``/``power_iteration_one`` draw for ``seed``."""
    return torch.randn(dim, dtype=torch.float32, generator=torch.Generator().manual_seed(seed))


def curvlinops_eigsh(problem: Problem, v0: Tensor, cap: int, **kwargs: Any) -> Outcome:
    """scipy's ``eigsh`` (ARPACK) on curvlinops' operator, ``which="LA"``, stopped after ``cap``
    products (``CapReached``)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    count = [0]
    sync(problem.device)
    start = time.perf_counter()
    scipy_op = curvlinops_operator(problem, "hessian").to_scipy()

    def matvec(x: np.ndarray) -> np.ndarray:
        count[0] += 1
        if count[0] > cap:
            raise CapReached(f"no answer within {cap} products")
        return scipy_op.matvec(x)

    op = LinearOperator(scipy_op.shape, matvec=matvec, dtype=scipy_op.dtype)
    try:
        values = eigsh(op, k=1, which="LA", v0=v0.detach().double().cpu().numpy(),
                       return_eigenvectors=False, **kwargs)
    finally:
        problem.clear_grads()
    config = "eigsh(k=1, which='LA'" + "".join(f", {k}={v!r}" for k, v in kwargs.items()) + ")"
    return Outcome(float(values[-1]), count[0], time.perf_counter() - start, config)


def relative_error(value: float | None, reference: float) -> float:
    if value is None or not math.isfinite(value):
        return math.inf
    return abs(value - reference) / abs(reference)


# -- spectral density ------------------------------------------------------------------------------


def pyhessian_density(problem: Problem, num_probes: int, num_steps: int) -> int:
    _require("PyHessian")
    from pyhessian.hessian import hessian

    try:
        h = hessian(problem.model, problem.criterion, data=problem.batch,
                    cuda=problem.device.type == "cuda")
        h.density(iter=num_steps, n_v=num_probes)
    finally:
        problem.clear_grads()
    return num_probes * num_steps


def eigenthings_density(problem: Problem, num_probes: int, num_steps: int, seed: int) -> int:
    import hessian_eigenthings as he

    op = eigenthings_operator(problem, "hessian")
    try:
        he.spectral_density(op, num_runs=num_probes, lanczos_steps=num_steps, seed=seed)
    finally:
        problem.clear_grads()
    return num_probes * num_steps


def top_ritz_prefix(alpha: np.ndarray, beta: np.ndarray) -> list[float]:
    """The largest Ritz value after each Lanczos step, from one run's tridiagonal."""
    values = []
    for m in range(1, len(alpha) + 1):
        T = np.diag(alpha[:m]) + np.diag(beta[: m - 1], 1) + np.diag(beta[: m - 1], -1)
        values.append(float(np.linalg.eigvalsh(T)[-1]))
    return values


def eigenthings_lanczos_doubling(problem: Problem, seed: int, tol: float,
                                 cap: int) -> tuple[Outcome, bool]:
    """How a user without the answer drives ``lanczos``: ``max_iter`` = 2, 4, 8, ... until the
    result says ``converged`` (its residual test at ``tol``); products summed over all runs."""
    products, seconds, steps = 0, 0.0, 2
    while True:
        o = eigenthings_lanczos(problem, seed, k=1, max_iter=min(steps, cap), which="LA", tol=tol)
        products += o.products
        seconds += o.seconds
        if o.note == "converged" or steps >= cap:
            return (Outcome(o.value, products, seconds, f"lanczos(k=1, which='LA', tol={tol:g}), "
                            f"max_iter doubled up to {min(steps, cap)}",
                            "" if o.note == "converged" else "never converged"),
                    o.note == "converged")
        steps *= 2

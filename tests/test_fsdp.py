"""FSDP2 (``fully_shard``) on 2 CPU processes with gloo: the engine on sharded parameters and
``SpectrumMonitor`` under Lightning's ``ModelParallelStrategy``.

References are computed here, in one process, on the concatenated global batch with the dense
row-by-row Hessian of ``tests/reference.py`` at the gathered weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lr_batch_callback.engine.critical import LineLoss, critical_sharpness
from lr_batch_callback.monitoring.directions import gradient_direction, update_direction
from tests import fsdp_worker
from tests.reference import dense_hessian, eigvalsh
from tests.test_distributed import _env, _free_port, _Run

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with the gloo backend",
    ),
]
WORKER = Path(fsdp_worker.__file__)


def _ranks(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("fsdp-engine")
    port = str(_free_port())
    run = _Run(out, [[sys.executable, str(WORKER), "engine", "--rank", str(r), "--port", port,
                      "--out", str(out)] for r in (0, 1)], _env())
    try:
        return _ranks(run.wait())
    finally:
        run.kill()


@pytest.fixture(scope="module")
def lightning(tmp_path_factory) -> tuple[list[dict[str, Any]], list[dict[int, Any]]]:
    out = tmp_path_factory.mktemp("fsdp-lightning")
    run = _Run(out, [[sys.executable, str(WORKER), "lightning", "--out", str(out)]],
               _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())))
    try:
        run.wait()
    finally:
        run.kill()
    saved = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return _ranks(out), saved


def test_sharded_eigenvalues_are_the_global_batch_ones_on_every_rank(engine) -> None:
    model = fsdp_worker.engine_model()
    H = dense_hessian(model, fsdp_worker.mse, fsdp_worker.global_batch())
    expected = eigvalsh(H).flip(0)[:2].tolist()
    for rank in engine:
        for product in ("auto", "finite_difference"):
            result = rank[product]
            assert result["product"] == "finite_difference" and result["converged"]
            assert result["eigenvalues"] == pytest.approx(expected, rel=1e-6)
    assert engine[0]["auto"]["eigenvalues"] == engine[1]["auto"]["eigenvalues"]  # bit for bit
    assert [r["auto"]["num_samples"] for r in engine] == list(fsdp_worker.SPLIT)


def test_sharded_parameters_stay_sharded_restored_and_without_grads(engine) -> None:
    for rank in engine:
        assert rank["restored"] and rank["still_sharded"] and rank["grads_untouched"]
        assert "no exact product" in rank["exact_error"]
        assert "product='finite_difference' or 'auto'" in rank["exact_error"]


def test_sharded_critical_sharpness_is_the_global_batch_one_on_every_rank(engine) -> None:
    # Reference: one process, the whole model, the concatenated global batch.
    model = fsdp_worker.engine_model()
    batch = fsdp_worker.global_batch()
    line = LineLoss(model, fsdp_worker.mse, [batch], [1.0])
    with line:
        g = line.gradient()
        expected = critical_sharpness(line, g, [-t for t in g], fsdp_worker.CRITICAL_FIRST,
                                      rtol=1e-6, max_passes=40)
    # (The single-process line search is checked against g'Hg/g'g on quadratics in
    # tests/test_critical.py; this tanh network is not quadratic over the step.)
    assert expected.converged
    for rank in engine:
        assert rank["critical"]["converged"]
        assert rank["critical"]["slope"] == pytest.approx(expected.slope, rel=1e-9)
        assert rank["critical"]["sharpness"] == pytest.approx(expected.sharpness, rel=1e-6)
    assert engine[0]["critical"] == engine[1]["critical"]


def _global_lambda_max(saved: list[dict[int, Any]], step: int) -> float:
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    state = {k.removeprefix("net."): v.double() for k, v in saved[0][step]["state"].items()}
    net.load_state_dict(state)
    x = torch.cat([s[step]["batch"][0] for s in saved]).double()
    y = torch.cat([s[step]["batch"][1] for s in saved])
    H = dense_hessian(net, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
    return float(eigvalsh(H)[-1])


def test_monitor_under_model_parallel_strategy_logs_the_global_lambda_max(lightning) -> None:
    ranks, saved = lightning
    logged = {step: m["hessian/lambda_max"] for step, m in ranks[0]["logged"]
              if "hessian/lambda_max" in m}
    assert sorted(logged) == [2, 4, 6]
    assert all(r["measurements"] == 3 and r["skipped"] == 0 for r in ranks)
    # Identical on every rank, computed by differences of the shards' gradients.
    assert ranks[0]["last"] == {**ranks[1]["last"], "estimate": {
        **ranks[1]["last"]["estimate"], "seconds": ranks[0]["last"]["estimate"]["seconds"]}}
    assert ranks[0]["last"]["estimate"]["product"] == "finite_difference"
    for step, value in logged.items():
        assert saved[0][step]["sharded"] and saved[1][step]["sharded"]
        # The bound is 2 %; float32 differences land within 1e-3.
        assert value == pytest.approx(_global_lambda_max(saved, step), rel=1e-3)
        assert ranks[0]["logged"] and all(
            m.get("hessian/finite_difference", 1.0) == 1.0 for _, m in ranks[0]["logged"])


def _global_critical(saved: list[dict[int, Any]], step: int) -> tuple[float, float]:
    """Critical sharpness along -P^-1 g and the AdamW update, one process, gathered state."""
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    net.load_state_dict({k.removeprefix("net."): v for k, v in saved[0][step]["state"].items()})
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for name, p in net.named_parameters():
        optimizer.state[p] = dict(saved[0][step]["moments"][f"net.{name}"])
    x = torch.cat([s[step]["batch"][0] for s in saved])
    y = torch.cat([s[step]["batch"][1] for s in saved])
    line = LineLoss(net, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(x, y)], [1.0])
    with line:
        g = line.gradient()
        along = [critical_sharpness(line, g, build(optimizer, line.params, g), 1e-2).sharpness
                 for build in (gradient_direction, update_direction)]
    return along[0], along[1]


def test_monitor_under_model_parallel_strategy_logs_the_critical_sharpness(lightning) -> None:
    ranks, saved = lightning
    logged = {step: m for step, m in ranks[0]["logged"] if "hessian/critical_sharpness" in m}
    assert sorted(logged) == [2, 4, 6]
    for step, metrics in logged.items():
        gradient, update = _global_critical(saved, step)
        # The search stops within 2 % of eta_c; float32 losses summed in another order.
        assert metrics["hessian/critical_sharpness"] == pytest.approx(gradient, rel=0.05)
        assert metrics["hessian/critical_sharpness_update"] == pytest.approx(update, rel=0.05)
        assert metrics["hessian/critical_ratio"] == pytest.approx(
            1e-2 * metrics["hessian/critical_sharpness"] / 2)


def test_the_line_search_moves_the_root_groups_parameters_too() -> None:
    import subprocess

    worker = Path(__file__).with_name("fsdp_root_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(_free_port())], capture_output=True,
                          text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["sharded"] == pytest.approx(out["dense"], rel=1e-12)
    assert out["sharded"] != pytest.approx(out["dense_head_frozen"], rel=1e-6)
    assert out["root_param_is_dtensor_after"] == "DTensor"  # resharded when the search ends

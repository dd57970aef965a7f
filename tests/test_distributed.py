"""Real multi-process runs on CPU (gloo, 2 ranks): the engine and the callback under DDP.

Every run is a subprocess of ``tests/ddp_worker.py`` (never pytest itself, which Lightning's DDP
launcher would otherwise re-run for rank 1), started when the first test that reads it asks for
it, one run at a time (two cores). The references are computed here, in one process, on the
concatenated global batch with the dense row-by-row Hessian of ``tests/reference.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lr_batch_callback import BatchSizeLRCallback, scaling_factor
from lr_batch_callback.engine.critical import LineLoss, critical_sharpness
from tests import ddp_worker
from tests.lightning_helpers import LRRecorder
from tests.reference import dense_ggn, dense_hessian, eigvalsh

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with the gloo backend",
    ),
]

WORKER = Path(ddp_worker.__file__)
ROOT = WORKER.parent.parent
TIMEOUT = 240  # seconds per run; a hang in a collective fails the test instead of the session


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class _Run:
    """Subprocesses writing into ``out``; :meth:`wait` fails the test with their output."""

    def __init__(self, out: Path, commands: list[list[str]], env: dict[str, str]) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.logs = [open(out / f"proc{i}.log", "w") for i in range(len(commands))]
        self.procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                      for cmd, log in zip(commands, self.logs)]
        self.codes: list[int] | None = None

    def wait(self) -> Path:
        if self.codes is None:
            codes = []
            for proc in self.procs:
                try:
                    codes.append(proc.wait(timeout=TIMEOUT))
                except subprocess.TimeoutExpired:
                    proc.kill()  # only the processes this test started
                    codes.append(-9)
            for log in self.logs:
                log.close()
            self.codes = codes
        if any(self.codes):
            output = "\n".join((self.out / f"proc{i}.log").read_text()[-4000:]
                               for i in range(len(self.procs)))
            pytest.fail(f"worker exited with {self.codes}:\n{output}")
        return self.out

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp")


def _run_engine(base: Path) -> Path:
    out = base / "engine"
    port = str(_free_port())
    run = _Run(out, [[sys.executable, str(WORKER), "engine", "--rank", str(r), "--port", port,
                      "--out", str(out)] for r in (0, 1)], _env())
    try:
        return run.wait()
    finally:
        run.kill()


def _run_lightning(base: Path, name: str, *args: str) -> Path:
    out = base / name
    run = _Run(out, [[sys.executable, str(WORKER), "lightning", "--out", str(out), *args]],
               _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())))
    try:
        return run.wait()
    finally:
        run.kill()


def _run_loggers(base: Path, kind: str) -> Path:
    out = base / f"loggers-{kind}"
    run = _Run(out, [[sys.executable, str(WORKER), "loggers", "--out", str(out), "--logger", kind]],
               _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())))
    try:
        return run.wait()  # a hang in a collective is killed after TIMEOUT and fails the test
    finally:
        run.kill()


def _ranks(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


# -- the functional engine under torch.distributed ------------------------------------------------

@pytest.fixture(scope="module")
def engine(ddp_dir):
    return _ranks(_run_engine(ddp_dir))


@pytest.fixture(scope="module")
def global_spectra():
    model = ddp_worker.engine_model()
    x, y = ddp_worker.global_batch()
    H = dense_hessian(model, ddp_worker.ce_loss, (x, y))
    G = dense_ggn(model, lambda f: F.cross_entropy(f, y), x)
    return eigvalsh(H).flip(0), eigvalsh(G).flip(0)


@pytest.mark.parametrize("split", list(ddp_worker.ENGINE_SPLITS))
def test_distributed_eigenvalues_equal_global_dense_hessian(engine, global_spectra, split) -> None:
    hessian, ggn = global_spectra
    rank0, rank1 = engine[0][split], engine[1][split]
    assert rank0["converged"] and rank1["converged"]
    assert rank0["num_samples"] + rank1["num_samples"] == 24
    for key, expected in (("eigenvalues", hessian[:2]), ("micro", hessian[:2]),
                          ("ggn", ggn[:2]), ("unseeded", hessian[:1]),
                          ("both", torch.cat([hessian[:2], hessian[-2:]]))):
        got = torch.tensor(rank0[key], dtype=torch.float64)
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12), (split, key, got, expected)
        # Both ranks see the same all-reduced products: the same numbers to the last bit.
        assert rank1[key] == rank0[key], (split, key)


@pytest.mark.parametrize("split", list(ddp_worker.ENGINE_SPLITS))
def test_distributed_spectral_density_identical_on_ranks(engine, split) -> None:
    rank0, rank1 = engine[0][split], engine[1][split]
    for key in ("sd_nodes", "sd_weights", "sd_sigma", "sd_unseeded_nodes"):
        assert rank1[key] == rank0[key], key
    assert rank0["sd_integral"] == pytest.approx(1.0, abs=1e-3)
    # The density is of the global batch: the same nodes however the samples are split.
    assert engine[0]["equal"]["sd_nodes"] == pytest.approx(engine[0]["unequal"]["sd_nodes"],
                                                          rel=1e-9, abs=1e-12)


def test_distributed_estimates_leave_model_unchanged(engine) -> None:
    for rank in engine:
        assert rank["state_unchanged"] and rank["state_unchanged_after_faults"] and rank["done"]


def test_fault_on_one_rank_raises_on_every_rank_without_hanging(engine) -> None:
    rank0, rank1 = engine
    # NaN loss on rank 1: it names the cause, rank 0 learns that another rank failed.
    assert rank1["fault_loss"]["raised"] == "NonFiniteCurvatureError"
    assert "not finite" in rank1["fault_loss"]["message"]
    assert rank0["fault_loss"]["raised"] == "NonFiniteCurvatureError"
    assert "Another rank" in rank0["fault_loss"]["message"]
    # NaN products (finite loss) on rank 1 only: both ranks raise (no 30 s collective timeout).
    for rank in engine:
        assert rank["fault_products"]["raised"] == "NonFiniteCurvatureError", rank["fault_products"]
        assert "product is not finite" in rank["fault_products"]["message"]


# -- Lightning DDP ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def linear_run(ddp_dir):
    out = _run_lightning(ddp_dir, "linear")
    ranks = _ranks(out)
    steps = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return out, ranks, steps


def test_ddp_every_rank_uses_the_same_scaled_lr(linear_run) -> None:
    _, ranks, _ = linear_run
    factor = scaling_factor("linear", 16 * 2, 64 * 2)
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["batch_sizes"] == [16] * 8 + [64] * 2  # 128 samples per rank and epoch
        assert rank["used"] == [0.05] * 8 + [pytest.approx(0.05 * factor, rel=1e-12)] * 2
        assert rank["factors"] == [factor]
    assert ranks[0]["used"] == ranks[1]["used"]
    assert ranks[0]["final_state_sum"] == ranks[1]["final_state_sum"]


def test_ddp_effective_batch_size_counts_world_size(linear_run) -> None:
    _, ranks, steps = linear_run
    for rank in ranks:
        assert rank["reference_batch_size"] == 16 * 2
        assert rank["effective_batch_size"] == 64 * 2
    for step, saved in steps[1].items():
        assert saved["effective_batch_size"] == (32 if step <= 8 else 128), step
    logged = [m for _, m in ranks[0]["logged"] if "lr_batch/effective_batch_size" in m]
    assert [m["lr_batch/effective_batch_size"] for m in logged] == [32.0, 128.0]
    assert ranks[1]["logged"] == []  # only rank 0 logs


def test_ddp_lambda_max_equals_dense_hessian_of_global_batch(linear_run) -> None:
    _, ranks, steps = linear_run
    measured = {step: m for step, m in ranks[0]["logged"] if "hessian/lambda_max" in m}
    assert set(measured) >= {4, 9}  # the periodic one, and the one forced by the batch change
    DDPModule = ddp_worker._lightning_classes()[0]
    for step, metrics in measured.items():
        (state0, batch0), (state1, batch1) = (
            (s[step]["state"], s[step]["batch"]) for s in steps)
        for key in state0:
            assert torch.equal(state0[key], state1[key]), (step, key)  # replicas in sync
        model = DDPModule().double()
        model.load_state_dict(state0)
        batch = tuple(torch.cat([a, b]) for a, b in zip(batch0, batch1))
        assert len(batch[0]) == metrics["hessian/batch_size"]  # 2 x 16 or 2 x 64 samples
        H = dense_hessian(model, lambda m, b: m.curvature_loss(b),
                          (batch[0].double(), batch[1]))
        expected = float(eigvalsh(H)[-1])
        assert metrics["hessian/lambda_max"] == pytest.approx(expected, rel=1e-4), step
        # Critical sharpness of the global batch along -g (plain SGD): an independent float64
        # line search on the concatenated batch.
        with LineLoss(model, lambda m, b: m.curvature_loss(b), [(batch[0].double(), batch[1])],
                      [1.0]) as line:
            g = line.gradient()
            reference = critical_sharpness(line, g, [-t for t in g], first=0.05, rtol=1e-4,
                                           max_passes=40).sharpness
        assert metrics["hessian/critical_sharpness"] == pytest.approx(reference, rel=0.03), step
        if step != min(measured):
            continue
        # ... and not the value of either rank's half alone
        half = float(eigvalsh(dense_hessian(
            model, lambda m, b: m.curvature_loss(b), (batch0[0].double(), batch0[1])))[-1])
        assert abs(half - expected) > 1e-3 * expected


def test_ddp_checkpoint_resumes_on_one_process_relative_to_original_reference(
        linear_run, tmp_path) -> None:
    from lightning.pytorch import Trainer, seed_everything

    out, _, _ = linear_run
    ckpt = out / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == 0.05  # reference units
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("BatchSizeLRCallback"))
    assert saved["reference_batch_size"] == 32 and saved["effective_batch_size"] == 128

    DDPModule = ddp_worker._lightning_classes()[0]
    seed_everything(0)
    cb = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=None)
    rec = LRRecorder()
    trainer = Trainer(max_epochs=3, accelerator="cpu", devices=1, callbacks=[cb, rec],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(DDPModule(batch_size=64), ckpt_path=str(ckpt))
    assert trainer.world_size == 1
    assert cb.reference_batch_size == 32  # 16 per device x 2 devices, from the checkpoint
    assert cb.effective_batch_size == 64
    assert cb.factors == [scaling_factor("linear", 32, 64)] == [2.0]
    assert len(rec.used) == 256 // 64
    assert all(u == pytest.approx(0.05 * 2.0, rel=1e-12) for u in rec.used)


def test_ddp_curvature_rule_is_the_same_on_every_rank(ddp_dir) -> None:
    ranks = _ranks(_run_lightning(ddp_dir, "curvature", "--rule", "curvature",
                                  "--optimizer", "adamw"))
    assert ranks[0]["law"] is not None
    assert ranks[0]["law"] == ranks[1]["law"]  # rank 0's fit, broadcast
    assert ranks[0]["factors"] == ranks[1]["factors"]
    assert ranks[0]["used"] == ranks[1]["used"]
    assert ranks[0]["used"][-1] != pytest.approx(0.05)  # the law did change the LR
    assert ranks[0]["final_state_sum"] == ranks[1]["final_state_sum"]  # replicas did not drift


# -- DDP with a logger attached (0.1 hung at the first measurement) --------------------------------

@pytest.mark.parametrize("kind", ["default", "csv"])
def test_ddp_with_a_logger_and_spectra_files_finishes_and_writes_them(ddp_dir, kind) -> None:
    import csv

    from lr_batch_callback import load_spectra

    out = _run_loggers(ddp_dir, kind)
    ranks = _ranks(out)
    assert [r["measurements"] for r in ranks] == [2, 2]  # 128 / (16 x 2) = 4 steps, every 2nd
    log_dir = Path(ranks[0]["log_dir"])
    records = load_spectra(log_dir)
    assert [r.step for r in records] == [2, 4]
    assert [r.density is not None for r in records] == [False, True]
    assert all(r.context.effective_batch_size == 32 for r in records)
    if kind == "csv":
        with open(log_dir / "metrics.csv") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("hessian/lambda_max")]
        assert [int(r["step"]) for r in rows] == [2, 4]
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(log_dir))
        acc.Reload()
        assert [e.step for e in acc.Scalars("hessian/lambda_max")] == [2, 4]

"""Standalone FSDP2 worker for ``tests/test_fsdp.py`` (never collected, never run inside pytest).

``engine``
    One process per rank (the test starts both), gloo on localhost. A float64 tanh MLP sharded
    with ``fully_shard``; ``hessian_eigenvalues`` on this rank's share of a global batch.
``lightning``
    ``Trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    accelerator="cpu", devices=2)`` with ``fully_shard`` in ``configure_model``; Lightning starts
    rank 1 by re-running this file. Each rank writes, at every measured step, the full weights
    (gathered for the test, after the measurement) and its batch, and the monitor's records.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

SPLIT = (7, 17)  # unequal shares of the engine's global batch
EVERY = 2
CRITICAL_FIRST = 0.05  # the line search's first step (an LR)


def engine_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3)).double()


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(sum(SPLIT), 5, generator=g, dtype=torch.float64),
            torch.randn(sum(SPLIT), 3, generator=g, dtype=torch.float64))


def mse(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def _shard(model: nn.Module, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def run_engine(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lr_batch_callback import OperatorOptions, hessian_eigenvalues
    from lr_batch_callback.engine.critical import critical_sharpness
    from lr_batch_callback.engine.sharded import ShardedLineLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = engine_model()
    _shard(model, init_device_mesh("cpu", (2,)))
    x, y = global_batch()
    start = sum(SPLIT[:rank])
    batch = (x[start:start + SPLIT[rank]], y[start:start + SPLIT[rank]])
    shards = [p.to_local().clone() for p in model.parameters()]
    results: dict[str, Any] = {}
    for product in ("auto", "finite_difference"):
        r = hessian_eigenvalues(model, mse, batch, k=2, tol=1e-9, max_iter=100, seed=0,
                                options=OperatorOptions(product=product, distributed=True))
        results[product] = {"eigenvalues": r.eigenvalues.tolist(), "product": r.product,
                            "converged": bool(r.converged), "num_samples": r.num_samples}
    try:
        hessian_eigenvalues(model, mse, batch, options=OperatorOptions(distributed=True))
    except Exception as exc:  # the exact product has no way to the shards
        results["exact_error"] = f"{type(exc).__name__}: {exc}"
    # Critical sharpness along -g on the shards: each rank moves its rows; losses summed.
    line = ShardedLineLoss(model, mse, [batch], [SPLIT[rank] / sum(SPLIT)])
    with line:
        gradient = line.gradient()
        step = critical_sharpness(line, gradient, [-g for g in gradient], CRITICAL_FIRST,
                                  rtol=1e-6, max_passes=40)
    results["critical"] = {"sharpness": step.sharpness, "converged": step.converged,
                           "slope": step.slope}
    results["restored"] = all(torch.equal(a, p.to_local())
                              for a, p in zip(shards, model.parameters()))
    results["still_sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
    results["grads_untouched"] = all(p.grad is None for p in model.parameters())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()


def run_lightning(out: str) -> None:
    from lightning.pytorch import LightningModule, Trainer, seed_everything
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader, TensorDataset

    from lr_batch_callback import BatchSizeLRCallback, MonitorConfig
    from tests.lightning_helpers import MemoryLogger

    class Sharded(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
            g = torch.Generator().manual_seed(0)
            x = torch.randn(128, 6, generator=g)
            self.data = TensorDataset(x, (x[:, :3].argmax(1)))

        def configure_model(self) -> None:
            _shard(self.net, self.device_mesh["data_parallel"])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.data, batch_size=16)

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    class Saved(Callback):
        """Full weights and this rank's batch at every measured step (after the monitor)."""

        def __init__(self) -> None:
            self.steps: dict[int, Any] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step % EVERY == 0:
                def full(v: Any) -> Any:
                    return (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()

                state = {k: full(v) for k, v in pl_module.state_dict().items()}
                optimizer = trainer.optimizers[0]
                names = {id(p): n for n, p in pl_module.named_parameters()}
                moments = {names[id(p)]: {k: full(v) for k, v in optimizer.state[p].items()}
                           for p in optimizer.state}
                self.steps[trainer.global_step] = {
                    "state": state, "moments": moments, "batch": tuple(t.clone() for t in batch),
                    "sharded": all(isinstance(p, DTensor) for p in pl_module.parameters())}

    seed_everything(0)
    cb = BatchSizeLRCallback(rule="sqrt", monitor_every_n_steps=EVERY,
                             monitor=MonitorConfig(tol=1e-6, max_iter=100, density_every=0,
                                                   max_overhead=None, save_spectra=False))
    saved = Saved()
    logger = MemoryLogger()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=6,
                      callbacks=[cb, saved], logger=logger, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=out)
    trainer.fit(Sharded())
    rank = trainer.global_rank
    torch.save(saved.steps, os.path.join(out, f"rank{rank}.pt"))
    summary = {"rank": rank, "measurements": cb.monitor.measurements,
               "skipped": cb.monitor.skipped, "logged": logger.rows if rank == 0 else [],
               "last": cb.monitor.last.to_json() if cb.monitor.last is not None else None}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(summary, fh)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    engine = sub.add_parser("engine")
    engine.add_argument("--rank", type=int, required=True)
    engine.add_argument("--port", type=int, required=True)
    engine.add_argument("--out", required=True)
    light = sub.add_parser("lightning")
    light.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two ranks on two cores
    try:
        if args.mode == "engine":
            run_engine(args.rank, args.port, args.out)
        else:
            run_lightning(args.out)
    except BaseException:
        traceback.print_exc()
        raise


if __name__ == "__main__":
    main()

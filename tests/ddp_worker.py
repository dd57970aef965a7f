"""Standalone worker scripts for the multi-process tests in ``tests/test_distributed.py``.

Never collected by pytest (no ``test_`` prefix) and never run inside a pytest process: the tests
start it with ``subprocess`` so that Lightning can re-launch it for rank 1 without re-running
pytest. Two modes:

``engine``
    One process per rank (the test starts both), ``torch.distributed`` with gloo on localhost.
    Runs the functional API with ``distributed=True`` on this rank's share of a global batch and
    writes ``rank<r>.json``.
``lightning``
    ``Trainer(strategy="ddp", accelerator="cpu", devices=2)``; Lightning starts rank 1 by
    re-running this file. Each rank writes the LRs it used, the callback's state and, at every
    step, the weights and its batch (``rank<r>.pt``); rank 0's logger keeps the logged metrics.

The problem builders (:func:`engine_model`, :func:`global_batch`, :class:`DDPModule`) are imported
by the tests too, so that the single-process dense reference sees the same weights and data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from datetime import timedelta
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# -- the functional-engine problem ---------------------------------------------------------------

ENGINE_SPLITS = {"equal": (12, 12), "unequal": (7, 17)}


def engine_model() -> nn.Module:
    """A float64 tanh MLP (5 -> 8 -> 8 -> 3, 147 parameters), the same in every process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    return model.double().train()


def global_batch(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def rank_share(batch: tuple[torch.Tensor, torch.Tensor], split: tuple[int, ...], rank: int):
    start = sum(split[:rank])
    return tuple(t[start: start + split[rank]] for t in batch)


def ce_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _floats(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.reshape(-1).tolist()]


def run_engine(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from lr_batch_callback import hessian_eigenvalues, spectral_density
    from lr_batch_callback.engine.estimate import OperatorOptions

    on_all = OperatorOptions(distributed=True)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=30))
    results: dict[str, Any] = {}
    path = os.path.join(out, f"rank{rank}.json")

    def dump() -> None:  # after every case, so that a hang later still leaves the rest
        with open(path + ".tmp", "w") as fh:
            json.dump(results, fh)
        os.replace(path + ".tmp", path)

    model = engine_model()
    batch = global_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, split in ENGINE_SPLITS.items():
        local = rank_share(batch, split, rank)
        res = hessian_eigenvalues(model, ce_loss, local, k=2, tol=1e-8, seed=3, options=on_all)
        both = hessian_eigenvalues(model, ce_loss, local, k=2, which="both", tol=1e-8, seed=4,
                                   options=on_all)
        ggn = hessian_eigenvalues(model, ce_loss, local, k=2, curvature="ggn", tol=1e-8, seed=5,
                                  options=on_all)
        # Micro-batches of unequal size on top of unequal ranks: weights are sample counts.
        micro = hessian_eigenvalues(
            model, ce_loss, local, k=2, tol=1e-8, seed=6,
            options=OperatorOptions(distributed=True, micro_batch_size=5, keep_graphs=False))
        # No seed: rank 0's random start vector must reach every rank.
        unseeded = hessian_eigenvalues(model, ce_loss, local, k=1, tol=1e-8, seed=None,
                                       options=on_all)
        sd = spectral_density(model, ce_loss, local, num_probes=3, num_steps=12, seed=7,
                              options=on_all)
        sd_unseeded = spectral_density(model, ce_loss, local, num_probes=2, num_steps=8,
                                       options=on_all)
        results[name] = {
            "eigenvalues": _floats(res.eigenvalues),
            "converged": res.converged,
            "num_samples": res.num_samples,
            "both": _floats(both.eigenvalues),
            "ggn": _floats(ggn.eigenvalues),
            "micro": _floats(micro.eigenvalues),
            "unseeded": _floats(unseeded.eigenvalues),
            "sd_nodes": _floats(sd.nodes),
            "sd_weights": _floats(sd.weights),
            "sd_sigma": float(sd.sigma),
            "sd_integral": float(sd.integral()),
            "sd_unseeded_nodes": _floats(sd_unseeded.nodes),
        }
        dump()
    results["state_unchanged"] = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    dump()

    # Faults on one rank only: every rank must raise (no rank may wait in a collective forever).
    local = rank_share(batch, ENGINE_SPLITS["equal"], rank)

    def nan_loss_on_rank1(m: nn.Module, b: Any) -> torch.Tensor:
        loss = ce_loss(m, b)
        return loss * float("nan") if rank == 1 else loss

    def nan_products_on_rank1(m: nn.Module, b: Any) -> torch.Tensor:
        # A finite loss and gradient whose second derivative is NaN: |t|^1.5 at t = 0 (exactly).
        loss = ce_loss(m, b)
        if rank == 1:
            w = m[0].weight
            loss = loss + (w - w.detach()).abs().pow(1.5).sum()
        return loss

    for name, fn in (("fault_loss", nan_loss_on_rank1), ("fault_products", nan_products_on_rank1)):
        try:
            hessian_eigenvalues(model, fn, local, k=1, tol=1e-6, seed=0, options=on_all)
            results[name] = {"raised": None}
        except Exception as exc:  # recorded for the test to inspect
            results[name] = {"raised": type(exc).__name__, "message": str(exc)}
        dump()
        # Both ranks must still be in step: a barrier that times out would show they are not.
        dist.barrier()
    results["state_unchanged_after_faults"] = all(
        torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    results["done"] = True
    dump()
    dist.destroy_process_group()


# -- the Lightning DDP run ------------------------------------------------------------------------

def _lightning_classes():
    from lightning.pytorch import LightningModule
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    class DDPModule(LightningModule):
        """A tanh MLP whose train dataloader reads ``self.batch_size`` (no BatchNorm, no dropout:
        the curvature of the concatenated global batch is then exactly the sample-weighted mean
        of the ranks' curvatures)."""

        def __init__(self, batch_size: int = 16, lr: float = 0.05, n: int = 256,
                     optimizer: str = "sgd") -> None:
            super().__init__()
            self.batch_size = batch_size
            self.lr = lr
            self.optimizer_name = optimizer
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, 6, generator=g)
            y = (x[:, :3].argmax(1) + (torch.rand(n, generator=g) < 0.2).long()) % 3
            self.data = TensorDataset(x, y)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def curvature_loss(self, batch: Any) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self.curvature_loss(batch)
            self.log("train_loss", loss)
            return loss

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.data, batch_size=self.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(1))

        def configure_optimizers(self) -> Any:
            if self.optimizer_name == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=self.lr)
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    class Recorder(Callback):
        """Per step: the LR the optimizer used, the batch, the weights after the step, factors."""

        def __init__(self) -> None:
            self.used: list[float] = []
            self.batch_sizes: list[int] = []
            self.steps: dict[int, dict[str, Any]] = {}
            self._current = 0
            self._handle = None

        def on_train_start(self, trainer, pl_module) -> None:
            self._handle = trainer.optimizers[0].register_step_pre_hook(self._pre)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._current = len(batch[0])

        def _pre(self, optimizer, args, kwargs) -> None:
            self.used.append(float(optimizer.param_groups[0]["lr"]))
            self.batch_sizes.append(self._current)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            cb = next(c for c in trainer.callbacks if type(c).__name__ == "BatchSizeLRCallback")
            self.steps[trainer.global_step] = {
                "state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "batch": tuple(t.detach().clone() for t in batch),
                "factors": list(cb.factors),
                "effective_batch_size": cb.effective_batch_size,
            }

        def on_train_end(self, trainer, pl_module) -> None:
            if self._handle is not None:
                self._handle.remove()

    from tests.lightning_helpers import MemoryLogger

    return DDPModule, Recorder, MemoryLogger


def run_lightning(out: str, rule: str, optimizer: str) -> None:
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lr_batch_callback import BatchSizeLRCallback, BatchSizeSchedule, LawConfig, MonitorConfig

    DDPModule, Recorder, MemoryLogger = _lightning_classes()
    seed_everything(0)
    cb = BatchSizeLRCallback(
        rule=rule, monitor_every_n_steps=4, law=LawConfig(samples=64, draws=2),
        monitor=MonitorConfig(lambda_min_every=0, tol=1e-8, max_iter=163, density_every=0,
                              max_overhead=None, save_spectra=False))
    rec = Recorder()
    logger = MemoryLogger()
    ckpt = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_last=True)
    trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2,
                      callbacks=[BatchSizeSchedule({0: 16, 1: 64}), cb, rec, ckpt],
                      logger=logger, enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=1, default_root_dir=out)
    trainer.fit(DDPModule(optimizer=optimizer))
    rank = trainer.global_rank
    summary = {
        "rank": rank,
        "world_size": trainer.world_size,
        "used": rec.used,
        "batch_sizes": rec.batch_sizes,
        "factors": cb.factors,
        "reference_batch_size": cb.reference_batch_size,
        "effective_batch_size": cb.effective_batch_size,
        "law": cb.law.to_dict() if cb.law is not None else None,
        "logged": logger.rows if rank == 0 else [],
        "final_state_sum": float(sum(p.detach().double().sum()
                                     for p in trainer.lightning_module.parameters())),
    }
    torch.save(rec.steps, os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(summary, fh)


def run_loggers(out: str, logger_kind: str) -> None:
    """DDP with a real logger attached and spectra files on: must finish (0.1 hung here)."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    from lr_batch_callback import BatchSizeLRCallback, MonitorConfig

    DDPModule, _, _ = _lightning_classes()
    seed_everything(0)
    cb = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=2,
                             monitor=MonitorConfig(max_overhead=None, density_every=2))
    logger: Any = True if logger_kind == "default" else CSVLogger(out, name="csv")
    trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, callbacks=[cb],
                      logger=logger, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, log_every_n_steps=1, default_root_dir=out)
    trainer.fit(DDPModule(n=128))
    summary = {"rank": trainer.global_rank, "measurements": cb.monitor.measurements,
               "log_dir": trainer.loggers[0].log_dir if trainer.is_global_zero else None,
               "global_step": trainer.global_step}
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(summary, fh)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    engine = sub.add_parser("engine")
    engine.add_argument("--rank", type=int, required=True)
    engine.add_argument("--world-size", type=int, default=2)
    engine.add_argument("--port", type=int, required=True)
    engine.add_argument("--out", required=True)
    light = sub.add_parser("lightning")
    light.add_argument("--out", required=True)
    light.add_argument("--rule", default="linear")
    light.add_argument("--optimizer", default="sgd")
    loggers = sub.add_parser("loggers")
    loggers.add_argument("--out", required=True)
    loggers.add_argument("--logger", choices=("default", "csv"), required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two ranks on two cores
    try:
        if args.mode == "engine":
            run_engine(args.rank, args.world_size, args.port, args.out)
        elif args.mode == "loggers":
            run_loggers(args.out, args.logger)
        else:
            run_lightning(args.out, args.rule, args.optimizer)
    except BaseException:
        traceback.print_exc()
        raise


if __name__ == "__main__":
    main()

"""The callback at its defaults on the demo's training: measurements that ran, and the overhead.

The demo's Lightning pieces (``examples/common.py``: ``DigitsClassifier`` with the 151k-parameter
``SmallCNN``, SGD lr 0.01 momentum 0.9; ``DigitsDataModule`` at batch 32) train for ``max_steps``
optimizer steps with and without ``BatchSizeLRCallback()`` (every argument at its default: a
measurement due every 250 steps, ``MonitorConfig()``, a 5% budget), the same seeds and data
order, alternating so that drifts of the machine's load hit both. Validation and checkpointing
are off and a CSVLogger writes into a temporary folder (the callback saves each measurement
there, as in a real run), so the overhead is relative to training alone:
``(median with − median without) / median without``.

From the callback's own monitor (last run): measurements run, postponed by the budget, and,
from the spectra it saved, how many had λ_min / a density and the seconds they took.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DemoSettings:
    max_steps: int = 2000
    batch_size: int = 32  # the demo's first (reference) batch size
    lr: float = 0.01  # the demo's SGD learning rate at that batch size
    momentum: float = 0.9
    runs: int = 3
    seed: int = 0


def _fit(settings: DemoSettings, with_callback: bool) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from benchmarks.problems import _examples
    from lr_batch_callback import BatchSizeLRCallback, load_spectra

    _, common = _examples()
    L.seed_everything(settings.seed, verbose=False)
    module = common.DigitsClassifier(model="cnn", optimizer="sgd", lr=settings.lr,
                                     momentum=settings.momentum)
    data = common.DigitsDataModule(batch_size=settings.batch_size, seed=settings.seed)
    callback = BatchSizeLRCallback() if with_callback else None
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            max_steps=settings.max_steps, accelerator="cpu", devices=1,
            callbacks=[callback] if callback else [], logger=CSVLogger(tmp, name="", version=""),
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp, limit_val_batches=0, num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        out: dict[str, Any] = {"seconds": time.perf_counter() - start,
                               "steps": int(trainer.global_step)}
        if callback is not None:
            monitor = callback.monitor
            records = load_spectra(Path(tmp) / "spectra") if (Path(tmp) / "spectra").exists() else []
            out.update({
                "due": settings.max_steps // monitor.every_n_steps,
                "ran": int(monitor.measurements), "skipped": int(monitor.skipped),
                "steps_measured": [r.step for r in records],
                "with_lambda_min": sum(r.lambda_min is not None for r in records),
                "with_density": sum(r.density is not None for r in records),
                "measuring_seconds": sum(r.estimate.seconds for r in records),
                "products": [r.estimate.num_products for r in records],
            })
    return out


def callback_overhead(settings: DemoSettings) -> dict[str, Any]:
    """Median ``trainer.fit`` time without and with the callback, and what the callback did."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    without, with_cb = [], []
    for _ in range(settings.runs):  # alternate: load drifts hit both alike
        without.append(_fit(settings, False))
        with_cb.append(_fit(settings, True))
    base = statistics.median(r["seconds"] for r in without)
    cb = statistics.median(r["seconds"] for r in with_cb)
    last = with_cb[-1]
    return {
        "settings": asdict(settings),
        "without_s": [r["seconds"] for r in without],
        "with_s": [r["seconds"] for r in with_cb],
        "median_without_s": base,
        "median_with_s": cb,
        "overhead_pct": 100.0 * (cb - base) / base,
        "ran_per_run": [r["ran"] for r in with_cb],
        **{k: last[k] for k in ("due", "ran", "skipped", "steps_measured", "with_lambda_min",
                                "with_density", "measuring_seconds", "products")},
        "measuring_pct_of_base": 100.0 * last["measuring_seconds"] / base,
    }

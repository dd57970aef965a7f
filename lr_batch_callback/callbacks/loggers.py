"""What reaches the Trainer's loggers: sparse metrics, spectrum files per run, run artifacts.

Measurements are sparse (every few hundred steps), so they bypass ``self.log`` (which drops values
off the ``log_every_n_steps`` cadence) and go straight to every logger's ``log_metrics`` at the
step of measurement. Each group of metrics always carries the same keys, so CSVLogger, which
rewrites its file whenever a new key appears, rewrites it at most once per group.

Spectrum records go to each logger's *own* run, never to a folder shared by runs:

- TensorBoard, CSV and any logger with a ``log_dir``: ``<log_dir>/spectra/``; TensorBoard also gets
  the density as a histogram and a figure;
- MLflow: attached to the run with ``log_artifact`` (artifact path ``spectra``);
- Weights & Biases (online or offline): written to the run's files folder and saved with the run;
- any other logger: ``<save_dir or default_root_dir>/spectra/<name>-<version>/``.

Everything here runs on global rank 0 only and calls no collective: a rank-dependent branch that
enters a collective (``trainer.log_dir`` broadcasts under DDP) hangs the run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lr_batch_callback.monitoring.record import SpectrumRecord
from lr_batch_callback.monitoring.reporting import (
    SPECTRA_DIRNAME,
    plot_spectra,
    tensorboard_density,
    write_record,
)

__all__ = ["log_metrics", "publish_record", "spectra_directories"]


def log_metrics(loggers: Sequence[Logger], metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` to each logger at ``step`` and flush file loggers at once."""
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in loggers:
        logger.log_metrics(clean, step=step)
        # CSVLogger buffers rows until its save cadence; sparse metrics must not wait for it.
        save = getattr(logger, "save", None)
        if callable(save):
            save()


def _kind(logger: Logger) -> str:
    names = {klass.__name__ for klass in type(logger).__mro__}
    if "MLFlowLogger" in names:
        return "mlflow"
    if "WandbLogger" in names:
        return "wandb"
    return "files"


def spectra_directories(trainer: Trainer) -> list[tuple[Logger, Path | None]]:
    """``(logger, folder)`` for each logger of the run, where its spectrum records go.

    The folder is ``None`` where the logger stores artifacts itself (e.g. MLflow). Call it on
    global rank 0 only; it runs no collective.
    """
    out: list[tuple[Logger, Path | None]] = []
    for logger in trainer.loggers:
        kind = _kind(logger)
        if kind == "mlflow":
            out.append((logger, None))
        elif kind == "wandb":
            out.append((logger, Path(logger.experiment.dir) / SPECTRA_DIRNAME))  # type: ignore[attr-defined]
        else:
            log_dir = getattr(logger, "log_dir", None)
            if not log_dir:
                root = logger.save_dir or trainer.default_root_dir
                log_dir = os.path.join(root, SPECTRA_DIRNAME, f"{logger.name}-{logger.version}")
                out.append((logger, Path(log_dir)))
            else:
                out.append((logger, Path(log_dir) / SPECTRA_DIRNAME))
    return out


# ``trainer`` is unused: the destinations already say where records go, and the argument stays
# so that the public signature (called by SpectrumMonitor) does not change.
def publish_record(trainer: Trainer, record: SpectrumRecord,  # noqa: ARG001
                   destinations: list[tuple[Logger, Path | None]], dim: int) -> None:
    """Write ``record`` to every destination and draw its density in TensorBoard.

    Args:
        trainer: the run's Trainer (unused: ``destinations`` already say where records go).
        record: the measurement to write.
        destinations: ``(logger, folder)`` pairs from :func:`spectra_directories`.
        dim: the number of parameters, for the TensorBoard density histogram.
    """
    for logger, folder in destinations:
        try:
            kind = _kind(logger)
            if kind == "mlflow":
                with tempfile.TemporaryDirectory() as staging:
                    path = write_record(staging, record)
                    logger.experiment.log_artifact(  # type: ignore[attr-defined]
                        logger.run_id, str(path), SPECTRA_DIRNAME)  # type: ignore[attr-defined]
                continue
            assert folder is not None
            path = write_record(folder, record)
            if kind == "wandb":
                run = logger.experiment  # type: ignore[attr-defined]
                run.save(str(path), base_path=str(Path(run.dir)), policy="now")
            if isinstance(logger, TensorBoardLogger) and record.density is not None:
                _tensorboard(logger, record, dim)
        except Exception as exc:  # a logging problem must not cost the run
            rank_zero_warn(f"Could not write the spectrum of step {record.step} to "
                           f"{type(logger).__name__}: {type(exc).__name__}: {exc}")


def _tensorboard(logger: TensorBoardLogger, record: SpectrumRecord, dim: int) -> None:
    curve = record.density_curve()
    if curve is None:
        return
    tag = f"{record.curvature}/density"
    tensorboard_density(logger.experiment, tag, curve[0], curve[1], dim, record.step)
    # add_figure closes the figure once drawn.
    logger.experiment.add_figure(f"{tag}_figure", plot_spectra([record]), global_step=record.step)

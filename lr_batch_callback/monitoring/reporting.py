"""Spectrum records on disk and on screen: writing, reading back, plotting.

Every measurement is one small JSON file ``step_<global_step>.json`` (a
:class:`~lr_batch_callback.monitoring.record.SpectrumRecord`) in a run's ``spectra/`` folder;
:func:`load_spectra` reads them back and :func:`plot_spectra` draws λ_max over steps and the
densities (matplotlib, imported only when plotting). :func:`tensorboard_density` writes a
density as a TensorBoard histogram of expected eigenvalue counts. Nothing here imports Lightning.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lr_batch_callback.monitoring.record import SpectrumRecord

__all__ = [
    "SPECTRA_DIRNAME",
    "load_spectra",
    "plot_spectra",
    "tensorboard_density",
    "write_record",
]

SPECTRA_DIRNAME = "spectra"


def write_record(directory: str | os.PathLike[str], record: SpectrumRecord) -> Path:
    """Write one measurement as ``step_<step>.json`` in ``directory`` and return its path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    target = path / f"step_{int(record.step):09d}_{record.curvature}.json"
    tmp = target.with_suffix(".json.tmp")
    with open(tmp, "w") as fh:
        json.dump(record.to_json(), fh, separators=(",", ":"))
    os.replace(tmp, target)  # never leave a half-written file behind
    return target


def load_spectra(log_dir: str | os.PathLike[str]) -> list[SpectrumRecord]:
    """All spectrum records under ``log_dir`` (or its ``spectra/`` folder), sorted by step.

    Each is a :class:`~lr_batch_callback.monitoring.record.SpectrumRecord` (which also answers
    ``record["lambda_max"]``-style lookups, as a plain dict would).

    Raises:
        FileNotFoundError: ``log_dir`` does not exist.
        ValueError: ``log_dir`` holds no records itself but runs below it do (the parent of the
            runs, e.g. ``lightning_logs/``): the error lists them, since records of different
            runs are not one history.

    A folder with no records anywhere gives ``[]`` with a warning (monitoring was off, or no
    measurement was due).
    """
    root = Path(log_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"load_spectra: {str(root)!r} is not a directory; pass a run's "
                                "log directory (the logger's log_dir) or its spectra/ folder.")
    folder = root / SPECTRA_DIRNAME if (root / SPECTRA_DIRNAME).is_dir() else root
    paths = sorted(folder.glob("step_*.json"))
    if not paths:
        _no_records(root)
        return []
    records = []
    for path in paths:
        with open(path) as fh:
            records.append(SpectrumRecord.from_json(json.load(fh)))
    return sorted(records, key=lambda r: (r.step, r.curvature))


def _no_records(root: Path) -> None:
    """Say why a folder gave no records: a parent of runs (error), or an empty run (warning)."""
    runs = sorted({p.parent.parent if p.parent.name == SPECTRA_DIRNAME else p.parent
                   for p in root.rglob("step_*.json")})
    if runs:
        names = ", ".join(repr(str(r.relative_to(root))) for r in runs[:5])
        more = f" and {len(runs) - 5} more" if len(runs) > 5 else ""
        raise ValueError(f"load_spectra: {str(root)!r} holds no spectrum records itself, but "
                         f"{len(runs)} run(s) below it do: {names}{more}. Pass one run's "
                         f"directory, e.g. load_spectra({str(runs[0])!r}).")
    warnings.warn(f"load_spectra: no spectrum records (step_*.json) in {str(root)!r}: monitoring "
                  "was off, no measurement was due, or this is not a run's log directory.",
                  UserWarning, stacklevel=3)


def _as_record(item: SpectrumRecord | Mapping[str, Any]) -> SpectrumRecord:
    return item if isinstance(item, SpectrumRecord) else SpectrumRecord.from_json(item)


def plot_spectra(source: str | os.PathLike[str] | Sequence[SpectrumRecord | Mapping[str, Any]],
                 path: str | os.PathLike[str] | None = None, max_densities: int = 4) -> Any:
    """Plot λ_max (and λ_min) over training steps and up to ``max_densities`` densities.

    Args:
        source: a log directory (see :func:`load_spectra`) or a list of records.
        path: where to save the figure (PNG, PDF, ...); not saved when ``None``.
        max_densities: how many measured densities to overlay, evenly spread over the run.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = (load_spectra(source) if isinstance(source, (str, os.PathLike))
               else [_as_record(r) for r in source])
    if not records:
        raise ValueError(f"No spectrum records found in {source!r}.")
    with_density = [r for r in records if r.density is not None]
    ncols = 2 if with_density else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0, 0]
    for curvature in sorted({r.curvature for r in records}):
        rows = [r for r in records if r.curvature == curvature]
        ax.plot([r.step for r in rows], [r.lambda_max for r in rows], marker="o", ms=3,
                label=f"λ_max ({curvature})")
        lows = [(r.step, r.lambda_min) for r in rows if r.lambda_min is not None]
        if lows:
            ax.plot(*zip(*lows, strict=True), marker="v", ms=3, ls="--",
                    label=f"λ_min ({curvature})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eigenvalue of the batch curvature")
    ax.set_title("Extremal eigenvalues over training")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.legend()
    if with_density:
        ax = axes[0, 1]
        picks = with_density
        if len(picks) > max_densities:
            idx = np.linspace(0, len(picks) - 1, max_densities).round().astype(int).tolist()
            picks = [picks[i] for i in idx]
        for r in picks:
            curve = r.density_curve()
            assert curve is not None
            ax.semilogy(curve[0].numpy(), curve[1].clamp_min(1e-12).numpy(),
                        label=f"step {r.step} (B={r.effective_batch_size})")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("spectral density (log scale)")
        ax.set_title("Spectral density (SLQ, Gaussian broadening)")
        ax.set_ylim(bottom=1e-6)
        ax.legend(fontsize="small")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def tensorboard_density(experiment: Any, tag: str, grid: torch.Tensor, density: torch.Tensor,
                        dim: int, step: int, bins: int = 100) -> None:
    """Write a density to a TensorBoard ``SummaryWriter`` as a histogram of eigenvalue counts.

    Bucket counts are ``P ∫_bucket density``, the expected number of eigenvalues per bucket.
    """
    edges = np.linspace(float(grid[0]), float(grid[-1]), bins + 1)
    cumulative = np.concatenate([[0.0], torch.cumulative_trapezoid(density, grid).numpy()])
    at_edges = np.interp(edges, grid.numpy(), cumulative)
    counts = np.clip(at_edges[1:] - at_edges[:-1], 0, None) * dim
    centers = (edges[1:] + edges[:-1]) / 2
    total = float(counts.sum())
    experiment.add_histogram_raw(
        tag, min=float(edges[0]), max=float(edges[-1]), num=max(total, 1.0),
        sum=float((counts * centers).sum()), sum_squares=float((counts * centers**2).sum()),
        bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step,
    )

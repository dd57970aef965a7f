"""What goes to loggers and files, and how to read it back and plot it.

Measurements are sparse (every few hundred steps), so they bypass ``self.log`` (which drops values
off the ``log_every_n_steps`` cadence) and go straight to every logger's ``log_metrics`` at the
step of measurement. Each group of metrics always carries the same keys, so CSVLogger, which
rewrites its file whenever a new key appears, rewrites it at most once per group.

Every spectrum measurement is also written as one small JSON file under
``<log_dir>/spectra/step_<global_step>.json`` whatever the loggers are;
:func:`load_spectra` reads them back and :func:`plot_spectra` draws λ_max over steps and the
densities (matplotlib, imported only when plotting).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SPECTRA_DIRNAME",
    "density_from_record",
    "load_spectra",
    "log_to_loggers",
    "plot_spectra",
    "write_spectrum_record",
]

SPECTRA_DIRNAME = "spectra"


def log_to_loggers(loggers: Sequence[Any], metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` to each logger at ``step`` (scalars only; NaN for missing values)."""
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in loggers:
        logger.log_metrics(clean, step=step)
        # CSVLogger buffers rows until its save cadence; sparse metrics must not wait for it.
        save = getattr(logger, "save", None)
        if callable(save):
            save()


def write_spectrum_record(directory: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Write one measurement as ``step_<step>.json`` in ``directory`` and return its path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    target = path / f"step_{int(record['step']):09d}.json"
    tmp = target.with_suffix(".json.tmp")
    with open(tmp, "w") as fh:
        json.dump(_jsonable(record), fh, separators=(",", ":"))
    os.replace(tmp, target)  # never leave a half-written file behind
    return target


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def load_spectra(log_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All spectrum records under ``log_dir`` (or its ``spectra/`` folder), sorted by step.

    Each record is a dict with ``step``, ``epoch``, ``curvature``, ``eigenvalues`` (largest
    first), ``lambda_max``, ``lambda_min`` (or ``None``), ``residuals``, ``converged``,
    ``num_products``, ``seconds``, ``batch_size``, ``effective_batch_size`` and, when a density
    was measured, ``density`` = ``{"nodes", "weights", "sigma"}``.
    """
    root = Path(log_dir)
    folder = root / SPECTRA_DIRNAME if (root / SPECTRA_DIRNAME).is_dir() else root
    records = []
    for path in sorted(folder.glob("step_*.json")):
        with open(path) as fh:
            records.append(json.load(fh))
    return sorted(records, key=lambda r: (r["step"], r.get("curvature", "")))


def density_from_record(record: Mapping[str, Any], grid_size: int = 1000
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(grid, density)`` rebuilt from a record's quadrature, or ``None`` if it has none."""
    from lr_batch_callback.density import broaden

    density = record.get("density")
    if not density:
        return None
    nodes = torch.as_tensor(density["nodes"], dtype=torch.float64)
    weights = torch.as_tensor(density["weights"], dtype=torch.float64)
    grid, values, _ = broaden(nodes, weights, float(density["sigma"]), grid_size)
    return grid, values


def plot_spectra(source: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
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

    records = load_spectra(source) if isinstance(source, (str, os.PathLike)) else list(source)
    if not records:
        raise ValueError(f"No spectrum records found in {source!r}.")
    with_density = [r for r in records if r.get("density")]
    ncols = 2 if with_density else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0, 0]
    for curvature in sorted({r.get("curvature", "hessian") for r in records}):
        rows = [r for r in records if r.get("curvature", "hessian") == curvature]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["lambda_max"] for r in rows], marker="o", ms=3,
                label=f"λ_max ({curvature})")
        lows = [(r["step"], r["lambda_min"]) for r in rows if r.get("lambda_min") is not None]
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
            idx = torch.linspace(0, len(picks) - 1, max_densities).round().long().tolist()
            picks = [picks[i] for i in idx]
        for r in picks:
            curve = density_from_record(r)
            assert curve is not None
            ax.semilogy(curve[0].numpy(), curve[1].clamp_min(1e-12).numpy(),
                        label=f"step {r['step']} (B={r.get('effective_batch_size')})")
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
    edges = torch.linspace(float(grid[0]), float(grid[-1]), bins + 1, dtype=torch.float64)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64),
                            torch.cumulative_trapezoid(density, grid)])
    at_edges = torch.from_numpy(
        __import__("numpy").interp(edges.numpy(), grid.numpy(), cumulative.numpy()))
    counts = (at_edges[1:] - at_edges[:-1]).clamp_min(0) * dim
    centers = (edges[1:] + edges[:-1]) / 2
    total = float(counts.sum())
    experiment.add_histogram_raw(
        tag, min=float(edges[0]), max=float(edges[-1]), num=max(total, 1.0),
        sum=float((counts * centers).sum()), sum_squares=float((counts * centers**2).sum()),
        bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step,
    )

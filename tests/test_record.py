"""``SpectrumRecord`` (monitoring/record.py): every field survives the JSON file, the metrics
follow the documented schema, flat lookups, the density curve, and ``load_spectra``'s errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from lr_batch_callback import load_spectra
from lr_batch_callback.monitoring.record import (
    DensityQuadrature,
    SpectrumEstimate,
    SpectrumRecord,
    TrainingContext,
)
from lr_batch_callback.monitoring.reporting import write_record


def _full(step: int = 12, curvature: str = "ggn") -> SpectrumRecord:
    """A record in which every field differs from its default (checked below)."""
    return SpectrumRecord(
        step=step, epoch=3, curvature=curvature,
        estimate=SpectrumEstimate(
            eigenvalues=[4.5, 2.25, 1.125], lambda_min=-0.75, error_bounds=[1e-3, 2e-3, 3e-3, 4e-3],
            converged=False, num_products=17, seconds=0.125, num_samples=64, num_tokens=1000,
            preconditioned_lambda_max=321.5, critical=True, critical_sharpness=math.inf,
            critical_sharpness_update=3.5, critical_passes=7, product="finite_difference"),
        context=TrainingContext(effective_batch_size=256, lr=0.05, lr_factor=2.0, stability=0.625,
                                critical_ratio=math.inf, critical_ratio_update=0.0875),
        density=DensityQuadrature(nodes=[[-1.0, 0.5, 4.5], [-0.5, 1.0, 4.25]],
                                  weights=[[0.25, 0.5, 0.25], [0.125, 0.625, 0.25]],
                                  sigma=0.05, num_products=30),
    )


def _strict(text: str) -> object:
    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_the_sample_record_sets_every_field_to_a_non_default_value() -> None:
    """Keeps the round-trip test complete when a field is added to the schema."""
    record = _full()
    for part in (record, record.estimate, record.context, record.density):
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if f.default is not dataclasses.MISSING:
                assert value != f.default, (type(part).__name__, f.name)
            if f.default_factory is not dataclasses.MISSING:
                assert value != f.default_factory(), (type(part).__name__, f.name)


def test_a_written_record_reads_back_equal_field_by_field(tmp_path) -> None:
    record = _full()
    path = write_record(tmp_path / "spectra", record)
    assert path.name == "step_000000012_ggn.json"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left
    data = _strict(path.read_text())  # inf is written as "inf": strict JSON
    assert data["lambda_max"] == 4.5 and data["estimate"]["critical_sharpness"] == "inf"
    back = SpectrumRecord.from_json(data)
    assert back == record
    for part in ("estimate", "context", "density"):
        for f in dataclasses.fields(getattr(record, part)):
            assert getattr(getattr(back, part), f.name) == getattr(getattr(record, part), f.name)
    assert isinstance(back.density, DensityQuadrature)
    # And through load_spectra, from the run folder or the spectra folder itself.
    assert load_spectra(tmp_path) == [record]
    assert load_spectra(tmp_path / "spectra") == [record]


def test_a_minimal_record_reads_back_with_its_defaults(tmp_path) -> None:
    record = SpectrumRecord(step=0, epoch=0, curvature="hessian",
                            estimate=SpectrumEstimate(eigenvalues=[1.0]))
    data = _strict(json.dumps(record.to_json()))
    back = SpectrumRecord.from_json(data)
    assert back == record and back.density is None and back.lambda_min is None
    # Files of older versions lack the optional parts: context and error bounds default.
    del data["context"], data["estimate"]["error_bounds"]
    assert SpectrumRecord.from_json(data) == record


def test_non_finite_eigenvalues_become_null_and_read_back_as_nan() -> None:
    record = SpectrumRecord(step=1, epoch=0, curvature="hessian",
                            estimate=SpectrumEstimate(eigenvalues=[math.nan, 2.0],
                                                      error_bounds=[math.inf, 0.1]))
    data = _strict(json.dumps(record.to_json()))
    assert data["estimate"]["eigenvalues"] == [None, 2.0]
    assert data["estimate"]["error_bounds"] == [None, 0.1]
    assert data["lambda_max"] is None
    back = SpectrumRecord.from_json(data)
    assert math.isnan(back.eigenvalues[0]) and back.eigenvalues[1] == 2.0
    assert math.isnan(back.estimate.error_bounds[0])


def test_from_json_names_the_missing_fields() -> None:
    with pytest.raises(ValueError, match=r"fields \['curvature', 'estimate'\] are missing"):
        SpectrumRecord.from_json({"step": 1, "epoch": 0})
    with pytest.raises(TypeError):  # an unknown estimate field is not silently dropped
        SpectrumRecord.from_json({"step": 1, "epoch": 0, "curvature": "hessian",
                                  "estimate": {"eigenvalues": [1.0], "bogus": 1}})


# -- metrics --------------------------------------------------------------------------------------

def test_metrics_follow_the_documented_keys() -> None:
    metrics = _full().metrics()
    assert metrics == {
        "ggn/lambda_max": 4.5, "ggn/top_2": 2.25, "ggn/top_3": 1.125, "ggn/lambda_min": -0.75,
        "ggn/num_products": 17.0, "ggn/converged": 0.0, "ggn/seconds": 0.125,
        "ggn/batch_size": 64.0, "ggn/effective_batch_size": 256.0, "ggn/tokens": 1000.0,
        "ggn/finite_difference": 1.0, "ggn/stability": 0.625,
        "ggn/preconditioned_lambda_max": 321.5,
        "hessian/critical_sharpness": math.inf, "hessian/critical_sharpness_update": 3.5,
        "hessian/critical_ratio": math.inf, "hessian/critical_ratio_update": 0.0875,
    }
    assert all(isinstance(v, float) for v in metrics.values())


def test_metrics_keep_the_same_keys_for_a_group_and_pad_with_nan() -> None:
    bare = SpectrumRecord(step=0, epoch=0, curvature="hessian",
                          estimate=SpectrumEstimate(eigenvalues=[3.0], critical=True))
    metrics = bare.metrics(k=3)
    assert list(metrics) == [
        "hessian/lambda_max", "hessian/top_2", "hessian/top_3", "hessian/num_products",
        "hessian/converged", "hessian/seconds", "hessian/batch_size",
        "hessian/effective_batch_size", "hessian/critical_sharpness",
        "hessian/critical_sharpness_update", "hessian/critical_ratio",
        "hessian/critical_ratio_update"]
    nan_keys = {k for k, v in metrics.items() if math.isnan(v)}
    assert nan_keys == {"hessian/top_2", "hessian/top_3", "hessian/batch_size",
                        "hessian/effective_batch_size", "hessian/critical_sharpness",
                        "hessian/critical_sharpness_update", "hessian/critical_ratio",
                        "hessian/critical_ratio_update"}
    assert metrics["hessian/converged"] == 1.0
    # Without a critical measurement there are no critical keys at all.
    plain = dataclasses.replace(bare, estimate=SpectrumEstimate(eigenvalues=[3.0]))
    assert not any("critical" in k for k in plain.metrics())


# -- lookups and the density ----------------------------------------------------------------------

def test_flat_lookups_reach_every_part_of_the_record() -> None:
    record = _full()
    assert record["step"] == 12 and record["curvature"] == "ggn"
    assert record["lambda_max"] == 4.5 and record["lambda_min"] == -0.75
    assert record["eigenvalues"] == [4.5, 2.25, 1.125]
    assert record["num_products"] == 17 and record["critical_passes"] == 7
    assert record["lr"] == 0.05 and record["effective_batch_size"] == 256
    assert record["batch_size"] == 64  # the 0.1 name of num_samples
    assert record["density"] == dataclasses.asdict(record.density)
    with pytest.raises(KeyError):
        record["no_such_key"]
    assert record.get("no_such_key", "default") == "default"
    assert record.get("sigma") is None  # a field of the density, not a top-level one


def test_the_density_curve_is_the_gaussian_broadening_of_the_quadrature() -> None:
    record = _full()
    assert dataclasses.replace(record, density=None).density_curve() is None
    curve = record.density_curve(grid_size=400)
    assert curve is not None
    grid, density = (t.numpy() for t in curve)
    nodes, weights = np.array(record.density.nodes), np.array(record.density.weights)
    sigma = record.density.sigma
    # Independent: the average over probes of Σ_j w_j N(x; θ_j, σ²).
    gauss = np.exp(-0.5 * ((grid[:, None] - nodes.ravel()[None, :]) / sigma) ** 2)
    expected = (gauss * weights.ravel()[None, :]).sum(1) / nodes.shape[0] / (sigma * math.sqrt(2 * math.pi))
    np.testing.assert_allclose(density, expected, rtol=1e-12, atol=1e-15)
    assert grid[0] <= nodes.min() - 5 * sigma and grid[-1] >= nodes.max() + 5 * sigma
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-6)


# -- load_spectra ---------------------------------------------------------------------------------

def test_load_spectra_sorts_by_step_then_curvature(tmp_path) -> None:
    for step, curvature in ((30, "hessian"), (4, "hessian"), (30, "ggn"), (100, "ggn")):
        write_record(tmp_path / "spectra", _full(step, curvature))
    records = load_spectra(tmp_path)
    assert [(r.step, r.curvature) for r in records] == [
        (4, "hessian"), (30, "ggn"), (30, "hessian"), (100, "ggn")]


def test_load_spectra_errors_say_what_to_pass(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_spectra(tmp_path / "missing")
    file = write_record(tmp_path / "one" / "spectra", _full())
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_spectra(file)  # a record file, not its folder
    for i in range(6):
        write_record(tmp_path / f"run_{i}" / "spectra", _full())
    with pytest.raises(ValueError, match=r"7 run\(s\) below it do: 'one', 'run_0', 'run_1', "
                                         r"'run_2', 'run_3' and 2 more\. Pass one run's "
                                         r"directory, e\.g\. load_spectra\("):
        load_spectra(tmp_path)


def test_load_spectra_refuses_files_that_are_not_records(tmp_path) -> None:
    folder = tmp_path / "spectra"
    folder.mkdir()
    (folder / "step_000000001_hessian.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(ValueError, match="Not a spectrum record"):
        load_spectra(tmp_path)
    (folder / "step_000000001_hessian.json").write_text("{truncated")
    with pytest.raises(json.JSONDecodeError):
        load_spectra(tmp_path)


def test_load_spectra_warns_and_returns_nothing_for_an_empty_run(tmp_path) -> None:
    Path(tmp_path / "run").mkdir()
    with pytest.warns(UserWarning, match="no spectrum records"):
        assert load_spectra(tmp_path / "run") == []


def test_non_finite_scalars_round_trip_through_strict_json() -> None:
    record = SpectrumRecord(step=3, epoch=0, curvature="hessian",
                            estimate=SpectrumEstimate(eigenvalues=[2.0], critical=True,
                                                      critical_sharpness=-math.inf,
                                                      critical_sharpness_update=math.nan),
                            context=TrainingContext(stability=math.inf))
    back = SpectrumRecord.from_json(json.loads(json.dumps(record.to_json(), allow_nan=False)))
    assert back.estimate.critical_sharpness == -math.inf
    assert math.isnan(back.estimate.critical_sharpness_update)
    assert back.context.stability == math.inf

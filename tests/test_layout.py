"""The package's boundaries: the engine and the LR rules never import Lightning, every Lightning
import lives in ``lr_batch_callback/callbacks/``, modules stay short, public callables small."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import lr_batch_callback

PACKAGE = Path(lr_batch_callback.__file__).parent


@pytest.mark.slow
def test_lr_scaler_scaling_factor_and_the_engine_import_without_lightning() -> None:
    code = ("import sys, lr_batch_callback as lbc; lbc.LRScaler; lbc.scaling_factor; "
            "lbc.hessian_eigenvalues; lbc.MonitorConfig; lbc.SpectrumRecord; "
            "print(sorted(m for m in sys.modules if m == 'lightning' or m.startswith("
            "('lightning.', 'pytorch_lightning'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.slow
def test_the_callbacks_load_lightning_on_first_use() -> None:
    code = "import lr_batch_callback as lbc, sys; lbc.BatchSizeLRCallback; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_every_lightning_import_is_in_the_lightning_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        uses = any(n == "lightning" or n.startswith("lightning.") for n in _imports(path))
        if path.parent.name != "callbacks":
            assert not uses, f"{path} imports Lightning"


def test_modules_are_short_and_say_their_responsibility() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 430  # about 400, (path, len(text.splitlines()))
        doc = ast.get_docstring(ast.parse(text))
        assert doc and doc.splitlines()[0].strip(), f"{path} has no one-line responsibility"


@pytest.mark.slow
def test_no_public_callable_takes_more_than_ten_parameters() -> None:
    for name in lr_batch_callback.__all__:
        obj = getattr(lr_batch_callback, name)
        if dataclasses.is_dataclass(obj) and name.endswith("Config"):
            continue  # a config is where many settings belong: each field has a default and a row
        target = obj.__init__ if inspect.isclass(obj) else obj
        params = [p for p in inspect.signature(target).parameters if p != "self"]
        assert len(params) <= 10, (name, params)


KERNEL = ("krylov", "ritz", "lanczos", "density")
OPERATOR_BASE = {"lr_batch_callback._checks", "lr_batch_callback.engine.linear_operator",
                 "lr_batch_callback.engine.precision"}


def test_the_lanczos_kernel_imports_only_the_operator_base() -> None:
    # The kernel knows no model, no data and no isolation: only the operator it is handed.
    siblings = {f"lr_batch_callback.engine.{name}" for name in KERNEL}
    for name in KERNEL:
        own = {n for n in _imports(PACKAGE / "engine" / f"{name}.py") if n.startswith("lr_batch_callback")}
        assert own <= OPERATOR_BASE | siblings, (name, sorted(own - OPERATOR_BASE - siblings))


def test_curvatures_are_defined_once() -> None:
    hits = [path for path in PACKAGE.rglob("*.py") if "CURVATURES = " in path.read_text()]
    assert [p.name for p in hits] == ["_checks.py"], hits


def test_monitoring_knows_no_lightning_and_the_monitor_builds_no_record() -> None:
    # One measurement's record is built complete in monitoring/measurement.py; the Lightning
    # hook only sends it on (no dataclasses.replace filling in step, epoch or context).
    for path in (PACKAGE / "monitoring").glob("*.py"):
        assert not any(n.startswith("lightning") for n in _imports(path)), path
    monitor = (PACKAGE / "callbacks" / "monitor.py").read_text()
    assert "SpectrumRecord(" not in monitor and "replace(record" not in monitor

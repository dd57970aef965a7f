"""The README tells the truth: every Python block runs as written, and the argument tables state
the defaults the code has."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from lr_batch_callback import BatchSizeLRCallback, LawConfig, MonitorConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.examples
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_python_block_runs_as_written(tmp_path, index: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _table(heading: str) -> dict[str, str]:
    """``{name: default}`` of the README table right after ``heading``."""
    start = README.index(heading)
    rows = {}
    for line in README[start:].splitlines()[1:]:
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1].strip("`")
        elif rows and not line.startswith("|"):
            break
    return rows


def _same(documented: str, value: object) -> bool:
    return documented == repr(value).replace("'", '"') or documented == str(value)


def test_callback_defaults_match_the_code() -> None:
    table = _table("`BatchSizeLRCallback` (`BatchSizeLRScaling`")
    params = inspect.signature(BatchSizeLRCallback).parameters
    assert set(table) == set(params)
    for name, documented in table.items():
        assert _same(documented, params[name].default), (name, documented)


@pytest.mark.parametrize(("heading", "config"), [("`MonitorConfig`, what", MonitorConfig),
                                                 ("`LawConfig` (for", LawConfig)])
def test_config_defaults_match_the_code(heading: str, config: type) -> None:
    table = _table(heading)
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    assert set(table) == set(defaults)
    for name, documented in table.items():
        assert _same(documented, defaults[name]), (name, documented, defaults[name])


def test_the_layout_section_lists_every_module() -> None:
    layout = README[README.index("## Project layout"):]
    package = ROOT / "lr_batch_callback"
    for path in package.rglob("*.py"):
        if path.name == "__init__.py" and path.parent != package:
            continue
        assert path.name in layout or f"{path.parent.name}/" in layout, path
        if path.parent.name in ("engine", "callbacks"):
            assert path.name in layout, path

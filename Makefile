# The README's two set-up commands: `make demo` and `make test`.
# Each creates .venv (if missing), installs what it needs into it, then runs.
#
#   make test       everything: lint, types, every test and the package's doctests, with a
#                   line-coverage report of lr_batch_callback (what CI runs, via .ci/run).
#   make test-fast  the quick loop while editing (under a minute on an idle 2-core machine): the
#                   doctests and every test not marked slow, distributed or examples (markers in
#                   pyproject.toml); no lint, no coverage. `make test` stays the gate.
#
# Extra pytest arguments go in PYTEST_ARGS, e.g. `make test-fast PYTEST_ARGS="-x -k lanczos"`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the release this project is tested with; pip takes it from the local cache when present.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast install-examples install-test bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install-examples: $(PY)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[examples]"

install-test: $(PY)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[test]"

demo: install-examples
	$(PY) examples/demo.py $(ARGS)

# The quality gates first (lint, types), then every test and the package's doctests, with the
# coverage of lr_batch_callback (files at 100% are left out of the table).
# pytest exits 5 when it collected no test: treat that as a failure, like any other non-zero code.
test: install-test
	$(PY) -m ruff check lr_batch_callback tests examples benchmarks
	$(PY) -m mypy lr_batch_callback
	$(PY) -m pytest -q --doctest-modules --cov=lr_batch_callback --cov-report=term:skip-covered \
	    lr_batch_callback tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# The fast subset: no test marked slow (measured at more than ~3 s, and a few Trainer runs and zoo
# cases of 1.2-2.5 s that the one-minute budget cannot spare), distributed (starts several
# processes) or examples (runs a script from examples/, benchmarks/ or the README).
# Exit code 5 (nothing collected) fails, as in `test`.
test-fast: install-test
	$(PY) -m pytest -q -m "not slow and not distributed and not examples" --doctest-modules \
	    lr_batch_callback tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: $(PY)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/run.py $(ARGS)

lint: install-test
	$(PY) -m ruff check lr_batch_callback tests examples benchmarks
	$(PY) -m mypy lr_batch_callback

clean:
	rm -rf $(VENV) runs lightning_logs .coverage

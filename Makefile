# The README's two set-up commands: `make demo` and `make test`.
# Each creates .venv (if missing), installs what it needs into it, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the release this project is tested with; pip takes it from the local cache when present.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install-examples install-test bench lint clean

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

# The quality gates first (lint, types), then the tests and the package's doctests.
# pytest exits 5 when it collected no test: treat that as a failure, like any other non-zero code.
test: install-test
	$(PY) -m ruff check lr_batch_callback tests examples benchmarks
	$(PY) -m mypy lr_batch_callback
	$(PY) -m pytest -q --doctest-modules lr_batch_callback tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: $(PY)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/run.py $(ARGS)

lint: install-test
	$(PY) -m ruff check lr_batch_callback tests examples benchmarks
	$(PY) -m mypy lr_batch_callback

clean:
	rm -rf $(VENV) runs lightning_logs

# The README's contract: `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every pip call goes through the constraints file so torch stays the local CPU 2.13.0 wheel.
PIP := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip
EXTRAS ?= dev,ray,accelerate,deepspeed,hf,examples,quant,observe
SPEC ?= examples/quickstart.yaml
RUN_ARGS ?=
# Test processes (pytest-xdist): two share the 2 cores well because most multi-process tests wait on
# process start-up, sleeps and timeouts; a module stays on one worker (its shared launches run once).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadscope

.PHONY: run test test-fast lint unit-tests install clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

run: install
	$(VENV)/bin/meshyard launch $(SPEC) $(RUN_ARGS)

# ruff (lint + import order, line length 120) on the whole tree, mypy on the two packages; config in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/mypy launcher strategies

test: install lint
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# lint and the unit tests side by side (about a minute; no multi-process or integration tests): mypy's
# first run on a clean clone is ~50 s of one core, which the tests' waits absorb. Each part's output is
# printed whole when it ends (--output-sync); either failing fails the target.
test-fast: install
	$(MAKE) --no-print-directory -j2 --output-sync=target lint unit-tests

unit-tests: install
	$(PY) -m pytest -q $(XDIST) tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

# Two entry points for a fresh clone: `make run` (the whole pipeline on the embedded
# dataset) and `make test` (the test suite). Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export KEDRO_DISABLE_TELEMETRY := 1
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: run test test-fast lint install install-test clean-data

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Optional extras of pyproject.toml installed too, e.g. `make run EXTRAS=gpu` (README, "Train on
# a GPU"); each set of extras has its own stamp, so changing it installs again.
EXTRAS ?=
comma := ,
STAMP := $(if $(EXTRAS),-$(subst $(comma),-,$(EXTRAS)))

$(VENV)/.installed-run$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".$(if $(EXTRAS),[$(EXTRAS)])"
	touch $@

$(VENV)/.installed-test$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test$(if $(EXTRAS),$(comma)$(EXTRAS))]"
	touch $@ $(VENV)/.installed-run$(STAMP)

# The web page test drives Debian's headless chromium; installed once (needs root and apt).
/usr/bin/chromium /usr/bin/chromedriver:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver

install: $(VENV)/.installed-run$(STAMP)
install-test: $(VENV)/.installed-test$(STAMP)

run: install
	$(BIN)/kedro run $(ARGS)

# Lint first (ruff: pyflakes, pycodestyle, isort, bugbear; and the formatter's check), then
# every test.
lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest-xdist workers (TEST_WORKERS=0: one process). The tests of the smoke run share one
# worker (tests/conftest.py groups them), so that it is made once; the other worker takes the
# rest. Two workers keep two cores busy where one process leaves one idle (imports, kedro's
# start-up, subprocesses waited for).
TEST_WORKERS ?= 2

test: install-test lint /usr/bin/chromium /usr/bin/chromedriver
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup $(ARGS)

# The inner loop: everything but the `slow` tests (those needing the smoke run or starting
# `kedro`; tests/conftest.py marks them), so no chromium either.
test-fast: install-test
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

clean-data:
	find data -mindepth 2 ! -name .gitkeep -delete

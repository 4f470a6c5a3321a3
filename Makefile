# Two entry points for a fresh clone: `make run` (the whole pipeline on the embedded
# dataset) and `make test` (the test suite). Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export KEDRO_DISABLE_TELEMETRY := 1
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: run test install install-test clean-data

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.installed-run

# The web page test drives Debian's headless chromium; installed once (needs root and apt).
/usr/bin/chromium /usr/bin/chromedriver:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver

install: $(VENV)/.installed-run
install-test: $(VENV)/.installed-test

run: install
	$(BIN)/kedro run $(ARGS)

test: install-test /usr/bin/chromium /usr/bin/chromedriver
	$(BIN)/python -m pytest $(ARGS)

clean-data:
	find data -mindepth 2 ! -name .gitkeep -delete

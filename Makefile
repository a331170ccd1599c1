# ds2oai developer commands. Everything runs from .venv, which the targets create themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
MOCK_PORT ?= 9001

.PHONY: install run test lint typecheck bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml constraints.txt mock_upstream/requirements.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]' -r mock_upstream/requirements.txt
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@$(BIN)/python scripts/run_dev.py --host $(HOST) --port $(PORT) --mock-port $(MOCK_PORT)

lint: $(STAMP)
	$(BIN)/ruff check src tests middleware mock_upstream scripts bench
	$(BIN)/ruff format --check src tests middleware mock_upstream scripts bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest

BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache

SOAK_SECONDS ?= 60
soak: $(STAMP)
	$(BIN)/python scripts/soak.py --seconds $(SOAK_SECONDS)

# The two commands of the quick start: `make serve` and `make test`. Both create .venv and install
# what they need; torch is pinned to the CPU build 2.13.0 unless a torch is already installed there.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/servekit start --foreground --model-store model_store --models all --ts-config configs/config.properties

lint: $(STAMP)
	$(BIN)/ruff check servekit tests handlers benchmarks docs
	$(BIN)/ruff format --check servekit tests handlers benchmarks docs
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache

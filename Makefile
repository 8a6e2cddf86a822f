# The two commands of the quick start: `make serve` and `make test`. Both create .venv and install
# what they need; torch is pinned to the CPU build 2.13.0 unless a torch is already installed there.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint install clean compat protos constraints

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'  # the image's pinned versions (constraints.txt): tested as shipped
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/servekit start --foreground --model-store model_store --models all --ts-config configs/config.properties

lint: $(STAMP)
	$(BIN)/ruff check servekit tests handlers benchmarks docs deploy
	$(BIN)/ruff format --check servekit tests handlers benchmarks docs deploy
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

# The differential test against TorchServe 0.12 (tests/compat/, issue 14): the same exchanges sent to both servers,
# every difference not documented in docs/migration.md fails; the summary lists them all (Markdown in $(COMPAT_REPORT)).
# TorchServe runs from benchmarks/setup_peers.sh's venv (Java 17); numpy, which its kservev2 envelope imports, is
# installed apart so that the shared peers venv stays as the benchmarks use it. About 2 minutes; not in `make test`.
# Some cases: make compat PYTEST_ARGS='-k mnist'.
COMPAT_NUMPY_DIR ?= /tmp/servekit-compat-numpy
COMPAT_REPORT ?= /tmp/servekit-compat-report.md

compat: $(STAMP)
	peers=$$(benchmarks/setup_peers.sh | tail -n1) && \
	{ test -d $(COMPAT_NUMPY_DIR)/numpy || $$peers/bin/python -m pip install -q --disable-pip-version-check \
		--target $(COMPAT_NUMPY_DIR) numpy; } && \
	BENCH_PEERS_VENV=$$peers COMPAT_NUMPY_DIR=$(COMPAT_NUMPY_DIR) COMPAT_REPORT=$(COMPAT_REPORT) \
		$(BIN)/python -m pytest -q -m compat tests/compat $(PYTEST_ARGS)

# servekit/grpc/generated/ from servekit/grpc/protos/*.proto, with the grpcio-tools that the test extra pins; commit
# what it writes. tests/test_grpc.py fails when the generated messages no longer match the .proto files.
protos: $(STAMP)
	$(BIN)/python servekit/grpc/protos/generate.py

# constraints.txt, the versions of the image's Python packages, from this .venv (what the tests ran with); commit what
# it writes. tests/test_deploy.py fails when the file and .venv disagree (docs/deploy.md, "Pinned versions").
constraints: $(STAMP)
	$(BIN)/python deploy/constraints.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache

# Two commands set up a fresh machine (see README "Quick start"):
#   make serve   -- create .venv, install, export the default model to ONNX (once), serve it on 127.0.0.1:8000
#   make test    -- install dev dependencies, lint, run the test suite
# Both are idempotent: the install steps re-run only when pyproject.toml changes.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= models/shapes64

.PHONY: serve test test-slow test-tools lint format install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q "$(TORCH)" -e ".[serve,train,export]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q "$(TORCH)" -e ".[serve,train,export,dev]"
	touch $@ $(VENV)/.installed-serve

install: $(VENV)/.installed-serve
install-dev: $(VENV)/.installed-dev

# The service's default backend (auto) runs a family on ONNX Runtime on CPU where it has a matching
# export (~40 against ~67 ms per 3-step image here, docs/benchmarks.md), else on torch: export once
# per version (17 s on 2 cores); if the export fails, the service serves on torch.
$(MODEL)/onnx/manifest.json: $(MODEL)/flash.json | $(VENV)/.installed-serve
	$(BIN)/flash export onnx $(MODEL) --out $(MODEL)/onnx || echo "make serve: the ONNX export failed; serving on torch"

serve: $(VENV)/.installed-serve $(MODEL)/onnx/manifest.json
	$(BIN)/flash serve --model $(MODEL) --host $(HOST) --port $(PORT)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

# nginx and promtool for the deploy tests: installs only what is missing, only as root (else they skip)
test-tools:
	bash deploy/install-test-tools.sh

test: $(VENV)/.installed-dev lint test-tools
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m slow

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

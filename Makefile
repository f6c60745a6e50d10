# Set-up and everyday commands. `make test` and `make serve` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of PyTorch, installed first when no NVIDIA GPU is present so that the plain
# `torch>=2.4` requirement does not pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.oaml-installed
export OMP_NUM_THREADS ?= 2
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
			echo "NVIDIA GPU found: installing the default (CUDA) torch build"; \
		else \
			echo "no GPU: installing $(TORCH_CPU)"; $(BIN)/pip install -q "$(TORCH_CPU)"; \
		fi; \
	fi
	$(BIN)/pip install -q -e ".[test,train]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/bench_model.py --out bench/RESULTS.md

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

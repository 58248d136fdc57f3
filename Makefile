# hubert-ecg-jax developer entry points. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Every install takes the versions in constraints.txt, so that installs are reproducible; it lists
# the newest releases that the whole suite passed with (`make constraints` rewrites it).
PIP    := $(BIN)/pip install -q -c constraints.txt
CORE   := $(VENV)/.core-installed
TORCH  := $(VENV)/.torch-installed

.PHONY: help install test demo bench constraints clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-12s %s\n", $$1, $$2}'

# The package and its test tools: all that `make demo` needs (no PyTorch).
$(CORE): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) -e '.[dev]'
	touch $@

# + PyTorch and transformers, for the converter's tests, the parity tests and the benchmarks.
# torch is the CPU wheel: an unpinned torch would pull a CUDA build of several GB.
$(TORCH): $(CORE)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[torch,dev]'
	touch $@

install: $(TORCH)  ## create .venv and install the package with all its extras

# Test processes: one per core, at most 4 (each holds its own JAX runtime and spawns training runs).
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(min(os.cpu_count() or 1, 4))')

test: $(TORCH)  ## run the whole test suite (8 host CPU devices, TEST_WORKERS processes)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

demo: $(CORE)  ## the whole journey on synthetic ECGs: data, k-means, pretrain, finetune, evaluate, predict
	$(BIN)/hubert-ecg-jax demo demo_out --overwrite

bench: $(TORCH)  ## forward and train-step benchmarks against the PyTorch original (base, batch 8)
	$(BIN)/hubert-ecg-jax bench forward --size base --batch 8
	$(BIN)/hubert-ecg-jax bench train --size base --batch 8

constraints:  ## pin the newest releases that install here into constraints.txt (then run make test)
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/pip install -q --upgrade pip
	.venv-constraints/bin/pip install -q torch==2.13.0 '.[torch,dev]'
	(echo "# Written by 'make constraints' on $$(date -u +%F): the versions 'make' installs."; \
	 .venv-constraints/bin/pip freeze --all --exclude pip --exclude hubert-ecg-jax) > constraints.txt
	rm -rf .venv-constraints

clean:  ## remove the environment and demo outputs
	rm -rf $(VENV) demo_out

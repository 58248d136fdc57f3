# hubert-ecg-jax developer entry points. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help install test demo bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[torch,dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its extras

test: $(STAMP)  ## run the whole test suite (8 host CPU devices)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q tests

demo: $(STAMP)  ## the whole journey on synthetic ECGs: data, k-means, pretrain, finetune, evaluate, predict
	$(BIN)/hubert-ecg-jax demo --out demo_out

bench: $(STAMP)  ## forward and train-step benchmarks against the PyTorch original (base, batch 8)
	$(BIN)/hubert-ecg-jax bench forward --size base --batch 8
	$(BIN)/hubert-ecg-jax bench train --size base --batch 8

clean:  ## remove the environment and demo outputs
	rm -rf $(VENV) demo_out

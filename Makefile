# vlm — make targets. `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= conf/flava/tiny.yaml
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help install demo demo-flamingo demo-pali test test-fast lint bench bench-gpu train debug overfit clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
# Test-only reference for the Flamingo layers: open-flamingo pins torch==2.0.1, so it goes in without its deps.
	$(PY) -m pip install -q --no-deps 'open-flamingo>=2.0' 'einops>=0.6' 'einops-exts>=0.0.4'
	@touch $(STAMP)

install: $(STAMP) ## create/update the virtual environment .venv (idempotent)

demo: $(STAMP) ## pretrain tiny FLAVA on the synthetic world on CPU, then print held-out retrieval
	$(PY) -m vlm.demo

demo-flamingo: $(STAMP) ## train tiny Flamingo on the synthetic world on CPU, then print held-out 0/4-shot VQA and captioning
	$(PY) -m vlm.demo_flamingo

demo-pali: $(STAMP) ## train tiny PaLI on the synthetic task mixture on CPU, then print held-out VQA, detection and captioning
	$(PY) -m vlm.demo_pali

test: $(STAMP) ## run the whole test suite (CPU, offline)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

test-fast: $(STAMP) ## the suite without the multi-process (ddp) and slow tests
	$(PY) -m pytest -q -n 2 -m "not ddp and not slow" tests

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check vlm tests benchmarks notebooks

bench: $(STAMP) ## speed/memory harnesses (CPU here; pass ARGS="--device cuda --size base" on a GPU)
	$(PY) benchmarks/contrastive.py $(ARGS)
	$(PY) benchmarks/flava.py $(ARGS)
	$(PY) benchmarks/flamingo.py $(ARGS)
	$(PY) benchmarks/pali.py $(ARGS)

bench-gpu: $(STAMP) ## FLAVA-base on a GPU: eager vs HF, compiled step, real vlm fit on the gpu/ddp/fsdp presets (<9 min)
	PYTHON=$(PY) bash benchmarks/gpu_session.sh

train: $(STAMP) ## vlm fit --config $(CONFIG)
	$(VENV)/bin/vlm fit --config $(CONFIG)

debug: $(STAMP) ## one train+val batch of $(CONFIG) (fast_dev_run)
	$(VENV)/bin/vlm fit --config $(CONFIG) --trainer.fast_dev_run=true

overfit: $(STAMP) ## overfit a single batch of $(CONFIG)
	$(VENV)/bin/vlm fit --config $(CONFIG) --trainer.overfit_batches=1 --trainer.max_steps=200

clean: ## remove runs and caches (keeps .venv)
	rm -rf runs lightning_logs .pytest_cache data_cache

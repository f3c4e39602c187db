# DeMix: `make demo` runs the embedded demo end to end; `make test` runs the test suite.
# Both install what they need first (a .venv beside this file).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch first, pinned: it is the CPU build on this path; an unpinned torch pulls a CUDA build.
TORCH  := torch==2.13.0

# Images the pipeline components name (components/image.py reads DEMIX_IMAGE_REPO too).
VERSION    := 0.1.0
IMAGE_REPO ?= demix
IMAGE_CPU  := $(IMAGE_REPO)/demix:$(VERSION)-cpu
IMAGE_CUDA := $(IMAGE_REPO)/demix:$(VERSION)-cuda
export DEMIX_IMAGE_REPO := $(IMAGE_REPO)

.DEFAULT_GOAL := help
.PHONY: help install demo demo-library reproduce reproduce-scaling test test-slow test-reliability lint format bench compile images clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install demix with its pinned dependencies (idempotent)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

demo: install ## the embedded demo as the KFP pipeline, run locally (writes runs/demo/)
	$(BIN)/python pipeline.py run-local --config configs/demo.yaml --out runs/demo

demo-library: install ## the same demo through the library directly (demix run), no KFP
	$(BIN)/demix run configs/demo.yaml --out runs/demo-library

reproduce: install ## the paper's protocol on CPU, about 2 hours (writes runs/reproduce/)
	$(BIN)/demix reproduce configs/reproduce.yaml --out runs/reproduce

reproduce-scaling: install ## after reproduce: the protocol on 6 and 9 candidates split by source, one table
	$(BIN)/demix reproduce configs/reproduce-n6.yaml --out runs/reproduce-n6
	$(BIN)/demix reproduce configs/reproduce-n9.yaml --out runs/reproduce-n9
	$(BIN)/python -m demix.recipes.scaling runs/reproduce runs/reproduce-n6 runs/reproduce-n9 \
		--out runs/scaling.md

test: install ## fast test suite (no slow, no gpu)
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

test-slow: install ## the slow tail (real data fetch, longer runs)
	$(BIN)/python -m pytest -m "slow and not gpu" -q

test-reliability: install ## kill -9/resume, GCS emulator with faults, bad input, fuzzing, security; prints the table
	DEMIX_FUZZ=long $(BIN)/python -m pytest -m "reliability and not gpu" -q

lint: install ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## apply ruff formatting and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install ## benchmarks: print measured ratios
	$(BIN)/python benchmarks/proxy_bench.py
	$(BIN)/python benchmarks/merge_bench.py
	$(BIN)/python benchmarks/eval_bench.py
	$(BIN)/python benchmarks/train_bench.py

compile: install ## compile the pipeline for Kubeflow and Vertex AI
	$(BIN)/python pipeline.py compile --target kubeflow --out demix-kubeflow.yaml
	$(BIN)/python pipeline.py compile --target vertex --out demix-vertex.yaml

images: ## build the CPU and CUDA images the components run in (needs a Docker engine)
	docker build -f images/Dockerfile.cpu -t $(IMAGE_CPU) .
	docker build -f images/Dockerfile.cuda -t $(IMAGE_CUDA) .

clean: ## remove runs and caches (keeps .venv and data/)
	rm -rf runs .pytest_cache .ruff_cache

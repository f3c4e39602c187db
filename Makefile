# DeMix: `make demo` runs the embedded demo end to end; `make test` runs the test suite.
# Both install what they need first (a .venv beside this file).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch first, pinned: it is the CPU build on this path; an unpinned torch pulls a CUDA build.
TORCH  := torch==2.13.0

# Images: the names components/image.py gives by default (IMAGE_REPO is its DEMIX_IMAGE_REPO;
# `localhost` is where podman keeps local builds). Push to a registry you own with
# `make push IMAGE_REPO=REGISTRY/PATH` and compile with the same IMAGE_REPO (or --image/--image-cuda
# naming them): compile refuses images under localhost/, which no cluster can pull, unless
# COMPILE_FLAGS=--allow-local-images (nodes that have them). make demo runs locally: no images.
VERSION    := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_REPO ?= localhost
IMAGE_CPU  := $(IMAGE_REPO)/demix:$(VERSION)-cpu
IMAGE_CUDA := $(IMAGE_REPO)/demix:$(VERSION)-cuda
export DEMIX_IMAGE_REPO := $(IMAGE_REPO)
# docker, podman or buildah (default: the first that works); BASE: the image to build on
# (default: the Dockerfile's public Python base; `make base-image` makes LOCAL_BASE offline).
# TORCH_INDEX: an extra pip index with torch's CPU build, where pip finds only the CUDA build.
# BUILD_FLAGS: extra flags for the engine's build (e.g. --layers=false on a vfs store).
export ENGINE BASE TORCH_INDEX PYTHON BUILD_FLAGS
LOCAL_BASE := localhost/demix-base:bookworm
IMAGES_SH  := images/images.sh

.DEFAULT_GOAL := help
.PHONY: help install demo demo-library reproduce reproduce-decision reproduce-scaling test test-slow \
	test-reliability lint format docs bench compile lock wheelhouse base-image image-cpu image-cuda \
	images push test-images \
	images-tools clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install demix with its pinned dependencies (idempotent)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

demo: install ## the embedded demo as the KFP pipeline, run locally (writes runs/demo/)
	$(BIN)/python pipeline.py run-local configs/demo.yaml --out runs/demo

demo-library: install ## the same demo through the library directly (demix run), no KFP
	$(BIN)/demix run configs/demo.yaml --out runs/demo-library

reproduce: install ## fidelity of the merged proxies (the paper's protocol) on CPU, 3 seeds, no finals, about 1.5 hours (writes runs/reproduce/)
	$(BIN)/demix reproduce configs/reproduce.yaml --out runs/reproduce

reproduce-decision: install ## the decision at equal tokens: merged vs trained-proxy search vs weights-only fits, judged by finals, 3 seeds, about 4 hours (writes runs/reproduce-decision/)
	$(BIN)/demix reproduce-decision configs/reproduce-decision.yaml --out runs/reproduce-decision

reproduce-scaling: install ## the protocol on 3, 6 and 9 candidates (one base, text split by source), one table, about 2 hours
	$(BIN)/demix reproduce configs/reproduce-n3.yaml --out runs/reproduce-n3
	$(BIN)/demix reproduce configs/reproduce-n6.yaml --out runs/reproduce-n6
	$(BIN)/demix reproduce configs/reproduce-n9.yaml --out runs/reproduce-n9
	$(BIN)/demix scaling runs/reproduce-n3 runs/reproduce-n6 runs/reproduce-n9 \
		--out runs/scaling.md

test: install ## fast test suite (no slow, no gpu)
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

test-slow: install ## the slow tail (real data fetch, longer runs)
	$(BIN)/python -m pytest -m "slow and not gpu" -q

test-reliability: install ## kill -9/resume, GCS emulator with faults, bad input, fuzzing, security; prints the table
	DEMIX_FUZZ=long $(BIN)/python -m pytest -m "reliability and not gpu" -q

docs: install ## build the documentation site offline into build/site/ (broken links fail it)
	$(BIN)/mkdocs build --strict --quiet

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

compile: install ## compile the pipeline for Kubeflow and Vertex AI with IMAGE_REPO's images (make compile IMAGE_REPO=REGISTRY/PATH)
	$(BIN)/python pipeline.py compile --target kubeflow --out demix-kubeflow.yaml $(COMPILE_FLAGS)
	$(BIN)/python pipeline.py compile --target vertex --out demix-vertex.yaml $(COMPILE_FLAGS)

lock: ## resolve pyproject.toml's pins into requirements/ (the lock both images install)
	$(PYTHON) images/lock.py $(if $(TORCH_INDEX),--torch-index $(TORCH_INDEX))

wheelhouse: ## download or build every wheel the images install into build/wheelhouse (host network)
	$(IMAGES_SH) wheelhouse cpu
	$(IMAGES_SH) wheelhouse cuda

base-image: ## the Debian bookworm base (python3.11) with mmdebstrap from this machine's apt sources
	$(IMAGES_SH) base $(LOCAL_BASE)

image-cpu: ## build the CPU image (no CUDA libraries) from the wheelhouse
	$(IMAGES_SH) wheelhouse cpu
	$(IMAGES_SH) build cpu $(IMAGE_CPU)

image-cuda: ## build the CUDA image (torch's CUDA build) from the wheelhouse
	$(IMAGES_SH) wheelhouse cuda
	$(IMAGES_SH) build cuda $(IMAGE_CUDA)

images: image-cpu image-cuda ## build the CPU and CUDA images locally (docker, podman or buildah; ENGINE= to choose)

push: ## push both images to IMAGE_REPO (a registry you own; login first)
	$(IMAGES_SH) push $(IMAGE_CPU) $(IMAGE_CUDA)

images-tools: ## install podman, runc, buildah and mmdebstrap with apt-get when missing
	$(IMAGES_SH) tools

test-images: ## build the CPU image on the local Debian base and run every component in it (not in `make test`)
	images/test-images.sh $(IMAGE_CPU)

clean: ## remove runs and caches (keeps .venv and data/)
	rm -rf runs .pytest_cache .ruff_cache

# Primer: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PRIMER := $(VENV)/bin/primer
# Pinned so pip never replaces the CPU wheel on disk with a multi-GB CUDA build.
TORCH ?= torch==2.13.0
TORCHVISION ?= torchvision==0.28.0
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
STAMP := $(VENV)/.primer-installed
.PHONY: help install test lint format

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

install: ## create .venv and install Primer with every extra (torch first, CPU wheel), plus the Debian data it uses
	rm -f $(STAMP)
	@$(MAKE) --no-print-directory $(STAMP)

# Every target that runs code depends on this stamp, so `make test` or `make demo` on a fresh
# clone installs first. Reinstalls when the dependency pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q $(TORCH) $(TORCHVISION) -c constraints.txt -e ".[all,dev]"
	bash scripts/install_system_deps.sh
	$(PY) -m pip check
	touch $(STAMP)

test: $(STAMP) ## run the test suite (the same command CI runs); installs first on a fresh clone
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check pipeline jobs tests bench
	$(VENV)/bin/ruff format --check pipeline jobs tests bench

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix pipeline jobs tests bench
	$(VENV)/bin/ruff format pipeline jobs tests bench

# ---------------------------------------------------------------- the pipeline
# Empty settings fall back to the config (conf/, CONFIG=, SUBSET_ARGS='--set k=v'), the one
# source of every default: `primer config` prints them.
DATASET ?= StanfordCars
LAION ?=
MODEL ?=
PRETRAINED ?=
CHECKPOINT ?=
DATA_ROOT ?=
RUN_DIR ?=
CONFIG ?=
SUBSET_ARGS ?=

.PHONY: demo subset report bench

demo: $(STAMP) ## run the whole pipeline offline on the bundled demo corpus (writes data/demo/report/index.html)
	HF_HUB_OFFLINE=1 $(PRIMER) demo $(if $(CONFIG),--config $(CONFIG))

subset: $(STAMP) ## run every stage: make subset DATASET=StanfordCars LAION=s3://... DATA_ROOT=/datasets/cars [MODEL=.. PRETRAINED=..|CHECKPOINT=..]
	$(PRIMER) subset --dataset $(DATASET) $(if $(LAION),--metadata '$(LAION)') $(if $(DATA_ROOT),--data-root '$(DATA_ROOT)') \
		$(if $(MODEL),--model '$(MODEL)') $(if $(PRETRAINED),--pretrained '$(PRETRAINED)') $(if $(CHECKPOINT),--checkpoint '$(CHECKPOINT)') \
		$(if $(RUN_DIR),--run-dir '$(RUN_DIR)') $(if $(CONFIG),--config $(CONFIG)) $(SUBSET_ARGS)

report: $(STAMP) ## write the HTML report of a run directory: make report RUN_DIR=data/StanfordCars
	$(PRIMER) report $(or $(RUN_DIR),data/$(DATASET))

bench: $(STAMP) ## run every benchmark in quick mode
	for b in bench/[!_]*.py; do [ $$b = bench/render.py ] || $(PY) $$b --quick || exit 1; done

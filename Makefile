# pipeline: batch LLM inference over tables. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/summarise-reviews.yaml

.DEFAULT_GOAL := help
.PHONY: help setup local-model run test check lint docs bench bench-ab clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# The package alone: what `make run` needs (no test tools, no Ray).
$(VENV)/.base: pyproject.toml
	@echo "setup: creating $(VENV) and installing pipeline"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# pip's chatter goes to a log, shown only if the install fails
	@$(PY) -m pip install --upgrade pip > $(VENV)/setup.log 2>&1 || { cat $(VENV)/setup.log; exit 1; }
	@$(PY) -m pip install -e . >> $(VENV)/setup.log 2>&1 || { cat $(VENV)/setup.log; exit 1; }
	@touch $@

# With the dev tools and the Ray extra: what the tests, lint and bench need.
$(VENV)/.installed: $(VENV)/.base
	@echo "setup: installing the dev tools and the Ray extra into $(VENV)"
	@$(PY) -m pip install -e '.[dev,ray]' >> $(VENV)/setup.log 2>&1 || { cat $(VENV)/setup.log; exit 1; }
	@touch $@

setup: $(VENV)/.installed ## create .venv and install the project with its dev tools and Ray (idempotent)

local-model: setup ## setup, and the embedded model server (compiles llama.cpp once, ~5 min)
	@scripts/install-local-model.sh $(PY)

run: $(VENV)/.base ## install pipeline and the embedded model (nothing else), then run the demo job on it
	@scripts/install-local-model.sh $(PY)
	@$(VENV)/bin/pipeline run $(CONFIG)
	@$(VENV)/bin/pipeline show out/reviews-summary.parquet --rows 5
	@echo "pipeline is installed in $(VENV): run it as $(VENV)/bin/pipeline (e.g. $(VENV)/bin/pipeline run --help),"
	@echo "or type 'source $(VENV)/bin/activate' once, then plain 'pipeline'."

# The documentation tools (MkDocs, Material, mkdocstrings): for make docs, and with make test so CI builds the site.
$(VENV)/.docs: $(VENV)/.installed
	@echo "setup: installing the docs tools into $(VENV)"
	@$(PY) -m pip install -e '.[docs]' >> $(VENV)/setup.log 2>&1 || { cat $(VENV)/setup.log; exit 1; }
	@touch $@

test: local-model $(VENV)/.docs ## set up, then run the test suite (offline)
	@$(PY) -m pytest -q

lint: setup ## ruff and mypy
	@$(VENV)/bin/ruff check pipeline tests bench
	@$(VENV)/bin/ruff format --check pipeline tests bench
	@$(VENV)/bin/mypy

check: lint test ## ruff, mypy and the tests

docs: $(VENV)/.docs ## build the documentation site into site/ (offline, strict: a broken link fails)
	@NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: setup ## measure throughput, rate-limit adherence, memory and resume cost
	@$(PY) bench/run.py

A ?= HEAD~1
B ?= HEAD
bench-ab: setup ## overhead of two commits, interleaved in one session: make bench-ab A=<rev> B=<rev> [FLAGS=--no-adapt]
	@$(PY) bench/ab.py $(A) $(B) -- $(FLAGS)

clean: ## remove the venv, outputs, the built site and caches
	rm -rf $(VENV) out site .pytest_cache .mypy_cache .ruff_cache bench/results

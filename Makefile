# Two commands cover the quickstart:  `make run`  and  `make test`.
# Both create .venv on first use. On a CPU-only machine torch is pinned to a CPU build first
# (here: the local wheel store serves torch==2.13.0+cpu); elsewhere set TORCH_SPEC, e.g.
#   make run TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

EXTRAS ?= dev,bench,scale,db,docs
# pip on this machine warns about an unused extra index for every package; keep real errors visible.
QUIET_PIP := 2>&1 | { grep -v '^WARNING: Location' || true; }
comma := ,
# One stamp per set of extras, so `make test` after `make run EXTRAS=dev` installs what is missing.
STAMP := $(VENV)/.installed-$(subst $(comma),_,$(EXTRAS))

.PHONY: setup run test bench bench-quick data lint clean docs notebook

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(QUIET_PIP)
	$(PY) -m pip install -q $(TORCH_SPEC) $(QUIET_PIP)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" $(QUIET_PIP)
	touch $@

setup: $(STAMP)

## The main job: the nightly pipeline once on the bundled data in data/ (train, evaluate, index, gate, publish to ./artifacts/current)
run: setup
	$(VENV)/bin/recsys-metric run

## The test suite (what CI runs)
test: setup
	$(PY) -m pytest -q || { rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; else exit $$rc; fi; }

## Every benchmark table in BENCHMARKS.md (reads ../shared/datasets when present)
bench: setup
	$(PY) -m bench.run_all

## Regenerate the bundled synthetic data in data/ (deterministic)
data: setup
	$(VENV)/bin/recsys-metric generate-data --out data

## The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link or reference fails
docs: setup
	$(VENV)/bin/mkdocs build --strict

## Re-execute notebooks/quickstart.ipynb and save it with its outputs (tables and plots)
notebook: setup
	$(PY) notebooks/execute.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) artifacts .pytest_cache site

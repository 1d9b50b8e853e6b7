# One-command entry points. Every target depends on what it needs, so each works on a fresh clone.
PROFILE ?= demo
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PTR     := $(BIN)/ptr
# Where torch comes from: empty = PyPI's torch (on Linux x86_64 a CUDA build, which also runs on CPU);
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for the smaller CPU-only build, .../whl/cu128 for CUDA 12.8.
TORCH_INDEX ?=
# CI and offline machines point this at a directory of byte-exact raw files (see data_prep/sources.yaml).
export PTR_DATA_MIRROR ?= $(wildcard ../shared/data/raw)

.PHONY: setup test data posttrain replicate report check-report audit bench clean

setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and alone, pinned with nnsight, from TORCH_INDEX when given (requirements.txt then finds it installed)
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-test.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

test: setup
	$(BIN)/python -m pytest

data: setup
	$(PTR) data --profile $(PROFILE)

posttrain: data
	$(PTR) posttrain --profile $(PROFILE)

replicate: setup
	$(PTR) replicate --profile $(PROFILE)

report: setup
	$(PTR) report --profile $(PROFILE)

# The rendered report (fallback renderer) in headless Chromium (the distribution's chromium package) and its PDF:
# no console errors, every declared chart drawn and every figure and table captioned; a screenshot is kept.
check-report: setup
	$(BIN)/python -m report.check --profile $(PROFILE)

audit: setup
	$(PTR) audit --profile $(PROFILE)

# Then the per-step table of `ptr replicate` (bench/replicate.py): on a fresh clone every step runs; FRESH=1 times
# `ptr run all --fresh` instead (every cube set aside and recomputed: the rerun time).
bench: setup
	$(BIN)/python -m bench.run --profile $(PROFILE)
	$(BIN)/python -m bench.replicate --profile $(PROFILE) $(if $(FRESH),--fresh)

clean:
	rm -rf results report/_output cache data

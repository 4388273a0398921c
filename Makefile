# psf-harness: the two commands a new user runs are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Install stamp keyed on pyproject.toml: re-running setup with nothing changed takes seconds.
PYPROJECT_HASH := $(shell sha1sum pyproject.toml Makefile | sha1sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(PYPROJECT_HASH)
# Extension stamp keyed on the kernel sources and the build script.
EXT_HASH := $(shell cat csrc/ms_deform_attn* models/ops/build.py 2>/dev/null | sha1sum | cut -c1-16)
EXT_STAMP := $(VENV)/.ext-$(EXT_HASH)
# PQ kernel (PNG decoding, histograms, boundaries for eval-pq) stamp, keyed the same way.
PNG_HASH := $(shell cat csrc/png* harness/metrics/native.py 2>/dev/null | sha1sum | cut -c1-16)
PNG_STAMP := $(VENV)/.png-$(PNG_HASH)
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup ext demo test bench clean help

help:
	@echo "make demo   - create .venv, install everything, run 'harness demo' on the synthetic dataset"
	@echo "make test   - same set-up, then the whole test suite"
	@echo "make bench  - run the benchmarks in benchmarks/"

setup: $(STAMP) $(EXT_STAMP) $(PNG_STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# These two declare requirements that would break the stack (numpy<2, GUI opencv): no deps.
	$(PY) -m pip install -q --no-deps imagecorruptions==1.1.2 panopticapi-lite==0.2.0
	@rm -f $(VENV)/.installed-*
	@touch $@

# Compiled deformable-attention kernels (CPU always, CUDA when a toolkit is found or FORCE_CUDA=1).
# A failed build never breaks the install: the pure-PyTorch fallback is used (see `harness doctor`).
# Set STRICT_EXT=1 (CI does) to make a compile error fail the build.
$(EXT_STAMP): $(STAMP)
	$(PY) -m models.ops.build
	@rm -f $(VENV)/.ext-*
	@touch $@

# Compiled PQ kernel (C only: no toolkit, ~1 s). Without it eval-pq uses numpy and a general PNG
# decoder (same numbers, slower; `harness doctor` says why); STRICT_EXT=1 makes a failure fatal.
$(PNG_STAMP): $(STAMP)
	$(PY) -m harness.metrics.native
	@rm -f $(VENV)/.png-*
	@touch $@

demo: setup
	$(VENV)/bin/harness demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info runs

# Kotodama: `make demo` runs the main job, `make test` runs the tests. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
# One OpenMP thread per torch process: tiny CPU models gain nothing from more, and on a 2-core machine
# running a Prefect server, a worker and MLflow, oversubscribed threads stall every small op (3-5x slower).
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-fast up down status bench clean

setup: $(VENV)/.installed

# torch is installed first and pinned so pip never resolves a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all]"
	touch $@

# Triton for the AttnRes kernel tests on the CPU (Triton's interpreter), in its own folder so that the
# CPU torch never imports it: installed beside the venv, put on the path only for those tests.
TRITON_DIR := $(VENV)/triton-interpreter
$(TRITON_DIR)/.installed: | $(VENV)/.installed
	$(PY) -m pip install -q --target $(TRITON_DIR) triton==3.6.0
	touch $@

test: setup $(TRITON_DIR)/.installed
	$(PY) -m pytest -q
	TRITON_INTERPRET=1 PYTHONPATH=$(TRITON_DIR) $(PY) -m pytest -q tests/test_attnres_triton.py tests/test_muon_triton.py tests/test_kernel_codegen.py

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not stack"

bench: setup
	$(PY) bench/train_cpu.py

# Local stack on 127.0.0.1: Prefect server + process work pool/worker + MLflow server.
up: setup
	$(PY) -m infra.stack up

down:
	$(PY) -m infra.stack down

status:
	$(PY) -m infra.stack status

# The main job: stack up, kotodama/fullcorpus on the tiny preset, then bcpt from its milestone.
demo: setup
	$(PY) -m infra.demo

clean: down
	rm -rf .kotodama .stack

# One command to set up and run the demo, one to run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow gpu-check lint benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,slurm,export,parallel]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project

demo: $(STAMP)  ## train on the built-in demo dataset, evaluate, print the metrics table
	$(BIN)/python run.py

test: $(STAMP)  ## the default test suite (CPU, < 10 minutes)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## the slow tests
	$(BIN)/python -m pytest -q -m slow

gpu-check: $(STAMP)  ## on a CUDA machine: the GPU tests, bf16/fp32 throughput and MFU, eval/predict speed
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

benchmark: $(STAMP)
	$(BIN)/python scripts/benchmark.py

clean:
	rm -rf $(VENV) work_dirs data/demo

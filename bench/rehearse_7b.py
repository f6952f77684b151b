"""A 7B-shaped rehearsal on CPU (not CI): Qwen2.5-VL with the 7B widths (hidden 3584, vocab 152,064, the 7B vision
tower) and 2 decoder layers, random weights saved as bf16 safetensors; 2 gloo ranks load it sharded, run a few DPO
and GRPO steps on a handful of toy samples, export; the export is reloaded with from_pretrained. Prints each
stage's peak host memory per rank (metrics.jsonl mem/max_rss_gib, the process's ru_maxrss) beside the plan.

    python bench/rehearse_7b.py --work /big/disk/rehearsal [--steps 2]

Needs ~35 GB of host memory (2.2B parameters: per rank 4.4 GB fp32 shards, 3 GB gradients, 6 GB AdamW state, plus
the rollout copy) and ~10 GB of disk; minutes of CPU per step. The toy world supplies the tokenizer, image
processor and data (its token ids are all below the 7B vocabulary).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench" / "model_configs"))

RECIPE = """
[run]
name = "rehearse7b"
seed = 0
[model]
path = "{hf}"
dtype = "float32"
activation_checkpointing = true
logprob_chunk_tokens = 256
[[stages]]
name = "dpo"
kind = "dpo"
init = "model"
[stages.data]
train = "{data}/pairs.parquet"
[stages.optim]
lr = 1e-6
warmup_steps = 1
[stages.train]
steps = {steps}
batch_size = 2
micro_batch_tokens = 1024
[[stages]]
name = "grpo"
kind = "grpo"
init = "dpo"
[stages.data]
train = "{data}/train.parquet"
[stages.rollout]
n = 2
max_new_tokens = 8
max_batch_rows = 4
[stages.optim]
lr = 1e-6
warmup_steps = 1
[stages.train]
steps = {steps}
batch_size = 2
micro_batch_tokens = 1024
"""


def write_checkpoint(work: Path) -> Path:
    """The 2-layer, 7B-wide random checkpoint in bf16, with the toy world's tokenizer, processor and data."""
    import shutil

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    from write_configs import config

    from engine.toy import ToySpec, build_toy_world

    hf = work / "hf7b"
    if (hf / "model.safetensors.index.json").is_file():
        return hf
    build_toy_world(work / "toy", ToySpec(seed=0, num_train=16, num_test=4))
    cfg = config("qwen2.5-vl-7b", num_hidden_layers=2)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # random weights, no init scheme needed for a memory rehearsal
            p.normal_(0, 0.02)
    model.save_pretrained(hf, max_shard_size="2GB")
    for f in (work / "toy" / "hf").iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy2(f, hf / f.name)
    return hf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (~10 GB)")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    hf = write_checkpoint(args.work)
    print(f"checkpoint: {hf} ({time.perf_counter() - t0:.0f} s)", flush=True)
    recipe = args.work / "rehearse.toml"
    recipe.write_text(RECIPE.format(hf=hf, data=args.work / "toy" / "data", steps=args.steps))

    from engine.config import load_config
    from engine.plan import format_plan, plan_recipe

    cfg = load_config(recipe)
    print(format_plan(plan_recipe(cfg, 2, 1e9, "cpu"), 2, 1e9)[0], flush=True)
    out = args.work / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4"),
           "ENGINE_LOG_ALL_RANKS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "engine" / "train.py"), str(recipe), f"--run.out_dir={out}"]
    t1 = time.perf_counter()
    result = subprocess.run(cmd, env=env, cwd=REPO)
    print(f"train.py: exit {result.returncode} in {time.perf_counter() - t1:.0f} s", flush=True)
    for stage in ("dpo", "grpo"):
        metrics = out / stage / "metrics.jsonl"
        if metrics.is_file():
            rows = [json.loads(line) for line in metrics.read_text().splitlines()]
            rss = max((r.get("mem/max_rss_gib", 0.0) for r in rows), default=0.0)
            print(f"{stage}: {len(rows)} step(s), peak host memory (rank 0 ru_maxrss) {rss:.2f} GiB")
    if result.returncode == 0:
        from engine.model import load_hf_model

        t2 = time.perf_counter()
        model = load_hf_model(out / "grpo" / "hf", attn_implementation="sdpa")
        print(f"reload of the export: {sum(p.numel() for p in model.parameters()):,} parameters in "
              f"{time.perf_counter() - t2:.0f} s")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())

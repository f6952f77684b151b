"""A 7B-shaped rehearsal on CPU (not CI): Qwen2.5-VL with the 7B widths (hidden 3584, vocab 152,064, the 7B vision
tower) and 2 decoder layers, random weights saved as bf16 safetensors; 2 gloo ranks load it sharded, run a few DPO
and GRPO steps on a handful of toy samples, export; the export is reloaded with from_pretrained. Prints each
stage's peak host memory per rank (metrics.jsonl mem/max_rss_gib, the process's ru_maxrss) beside the plan.

    python bench/rehearse_7b.py --work /big/disk/rehearsal [--steps 2]

Needs ~35 GB of host memory (2.2B parameters: per rank 4.4 GB fp32 shards, 3 GB gradients, 6 GB AdamW state, plus
the rollout copy) and ~10 GB of disk; minutes of CPU per step. The toy world supplies the tokenizer, image
processor and data (its token ids are all below the 7B vocabulary).

    python bench/rehearse_7b.py --work /big/disk/rehearsal --load-only

The part that fits a 23 GiB machine (measured: 8.3 + 7.4 GiB for the two ranks, then 15 GiB for the reload;
8.4 GB of disk; 4 min on 2 cores): the same checkpoint; 2 gloo ranks load
it through the stages' own `build_policy` (meta model, FSDP2, each rank reading its rows from the safetensors
files into fp32 master shards) and write it back with the stages' streaming `export_hf`; a fresh process reloads
the export with `from_pretrained` and checks it equals the checkpoint bit for bit (no training step ran). No
forward/backward: with the root (embeddings + lm_head) gathered in fp32 and their gradients, the plan puts one
training step at ~16 GiB per rank. Prints per rank the peak host memory after each phase (ru_maxrss), the
largest anonymous (heap) and file-backed (memory-mapped safetensors) resident sizes seen, and the plan's numbers.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench" / "model_configs"))
GIB = 2**30
EXPORT_SHARD_BYTES = GIB
"""--load-only's export file size: below the stages' 4 GiB, so that rank 0 holding one file at a time is told apart
from it holding the whole model (4.2 GiB in bf16 at this size)."""

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


class RssWatch:
    """The largest resident sizes of this process since the last `take()`, sampled every 10 ms by a thread: VmRSS,
    RssAnon (heap: the tensors) and RssFile (file pages mapped in, e.g. safetensors read through mmap)."""

    def __init__(self):
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    @staticmethod
    def now() -> dict[str, float]:
        lines = Path("/proc/self/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in lines if line.startswith(("VmRSS", "RssAnon", "RssFile")))
        return {k: int(v.split()[0]) / 2**20 for k, v in fields.items()}  # kB -> GiB

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for k, v in self.now().items():
                self.peak[k] = max(self.peak.get(k, 0.0), v)

    def close(self) -> None:
        # Stopped and joined before exit: a daemon thread still polling while the interpreter tore down a 7B-wide
        # model aborted the process ("terminate called without an active exception") after its work was done.
        self._stop.set()
        self._thread.join()

    def take(self) -> dict[str, float]:
        """Peaks (GiB) since the last call, and ru_maxrss: the process's peak so far, which the kernel keeps."""
        peak, self.peak = self.peak, {}
        out = {k: max(peak.get(k, 0.0), v) for k, v in self.now().items()}
        return {**out, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def rank_part(work: Path) -> None:
    """One of --load-only's 2 ranks: load the checkpoint as a training stage does, then export it as a stage does."""
    from engine.checkpoint import export_hf
    from engine.config import load_config
    from engine.dist import destroy_distributed, init_distributed
    from engine.stages.common import build_policy

    watch = RssWatch()
    cfg = load_config(work / "rehearse.toml")
    dist_info = init_distributed()
    phases = {"start": watch.take()}
    t0 = time.perf_counter()
    policy, hf_model = build_policy(work / "hf7b", cfg.model, dist_info)
    phases["load"] = {**watch.take(), "s": time.perf_counter() - t0}
    t1 = time.perf_counter()
    export_hf(policy, hf_model, work / "hf7b", work / "export", dist_info, max_shard_bytes=EXPORT_SHARD_BYTES)
    phases["export"] = {**watch.take(), "s": time.perf_counter() - t1}
    (work / f"rank{dist_info.rank}.json").write_text(json.dumps(phases))
    watch.close()
    destroy_distributed()


def reload_part(work: Path) -> None:
    """from_pretrained (fp32) on the export; every tensor compared with the source checkpoint's, bit for bit."""
    import torch
    from safetensors import safe_open

    from engine import hf_files
    from engine.model import load_hf_model

    t0 = time.perf_counter()
    model = load_hf_model(work / "export", attn_implementation="sdpa")
    load_s = time.perf_counter() - t0
    files = hf_files.CheckpointFiles(work / "hf7b")
    state = model.state_dict()
    differ = []
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(files.dir / f, framework="pt"))
                   for f in {f for f, _, _ in files.tensors.values()}}
        for name, ckpt_name in hf_files.match_tensors(files, model).items():
            source = handles[files.tensors[ckpt_name][0]].get_tensor(ckpt_name)
            if not torch.equal(state[name], source.float()):
                differ.append(name)
    result = {"params": sum(p.numel() for p in model.parameters()), "tensors": len(state), "differ": differ,
              "s": load_s, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    (work / "reload.json").write_text(json.dumps(result))


def load_only(work: Path, hf: Path, env: dict) -> int:
    """--load-only: 2 ranks load and export (rank_part), a fresh process reloads (reload_part); prints the table."""
    from engine.config import load_config
    from engine.hf_files import CheckpointFiles
    from engine.model import model_class
    from engine.plan import model_shape, state_bytes

    files = CheckpointFiles(hf)
    sizes = {k: _bytes(shape, dtype) for k, (_, shape, dtype) in files.tensors.items()}
    largest = max(sizes, key=sizes.get)
    shape = model_shape(model_class(hf)[0], load_config(work / "rehearse.toml").model.freeze_vision)
    me = [str(Path(__file__).resolve()), "--work", str(work)]
    t0 = time.perf_counter()
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            *me, "--part", "rank"], env=env, cwd=REPO)
    print(f"load + export on 2 ranks: exit {ranks.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    if ranks.returncode:
        return ranks.returncode
    print(f"checkpoint {hf}: {files.total_bytes() / GIB:.2f} GiB ({len(sizes)} tensors); largest {largest} "
          f"{list(files.tensors[largest][1])} {files.tensors[largest][2]} {sizes[largest] / GIB:.2f} GiB")
    for rank in range(2):
        phases = json.loads((work / f"rank{rank}.json").read_text())
        params = state_bytes(shape, 2, rank)["params"] / GIB
        start = phases["start"]
        # The claim: (model / world) + the largest tensor, in the heap. The safetensors pages this rank reads
        # are memory-mapped and count in RSS too (clean page cache, reclaimable) until load_into closes the files.
        print(f"rank {rank}: start rss {start['VmRSS']:.2f} GiB (heap {start['RssAnon']:.2f}); plan: fp32 shards "
              f"{params:.2f} GiB. Expected at load: heap <= {start['RssAnon']:.2f} + {params:.2f} + largest "
              f"{sizes[largest] / GIB:.2f} = {start['RssAnon'] + params + sizes[largest] / GIB:.2f} GiB; mapped "
              f"files ~ {start['RssFile']:.2f} + this rank's bf16 rows {params / 2:.2f} GiB. At export: heap ~ "
              f"{start['RssAnon']:.2f} + {params:.2f} + 2.5 x largest (its rows cast, the gathered chunks, their "
              f"concatenation){' + one file ' + f'{EXPORT_SHARD_BYTES / GIB:.2f}' if rank == 0 else ''} GiB")
        for name in ("load", "export"):
            p = phases[name]
            print(f"  {name:6s} {p['s']:5.0f} s | peak (ru_maxrss) {p['ru_maxrss']:.2f} GiB | sampled max: rss "
                  f"{p['VmRSS']:.2f}, heap {p['RssAnon']:.2f}, mapped files {p['RssFile']:.2f} GiB")
    t1 = time.perf_counter()
    reload = subprocess.run([sys.executable, *me, "--part", "reload"], env=env, cwd=REPO)
    if reload.returncode:
        return reload.returncode
    r = json.loads((work / "reload.json").read_text())
    exported = sorted(p.name for p in (work / "export").iterdir())
    print(f"reload: from_pretrained {r['params']:,} parameters in {r['s']:.0f} s ({time.perf_counter() - t1:.0f} s "
          f"with the comparison), peak {r['ru_maxrss']:.2f} GiB; {r['tensors'] - len(r['differ'])}/{r['tensors']} "
          f"tensors equal to the checkpoint bit for bit{'' if not r['differ'] else ', differ: ' + str(r['differ'][:5])}"
          f"\nexport files: {exported}")
    return 1 if r["differ"] else 0


def _bytes(shape, dtype: str) -> int:
    n = 2 if dtype in ("BF16", "F16") else 4
    for s in shape:
        n *= s
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (~10 GB)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--load-only", action="store_true", help="load, export and reload only (~16 GiB)")
    parser.add_argument("--part", choices=("rank", "reload"), help=argparse.SUPPRESS)  # --load-only's processes
    args = parser.parse_args()
    if args.part:
        (rank_part if args.part == "rank" else reload_part)(args.work)
        return 0
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
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4"),
           "ENGINE_LOG_ALL_RANKS": "1"}
    if args.load_only:
        return load_only(args.work, hf, env)
    out = args.work / "run"
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

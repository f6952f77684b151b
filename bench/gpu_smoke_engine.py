"""End-to-end check of the training loop on one device: FSDP2 (world of one), mixed precision, a few SFT-style
steps on synthetic image+text batches, a checkpoint round trip and the Hugging Face export.

Runs on CUDA (nccl, bf16 compute) or CPU (gloo, fp32). Needs torch, transformers and safetensors only (no
datasets), so it runs on the lent GPU machine. Prints a small table and exits non-zero on a failed check.

    python bench/gpu_smoke_engine.py [--layers 4 --hidden 1024 --batch 8 --seq 512 --steps 8]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

from bench._synthetic import qwen_vl_config, random_model, special_ids  # noqa: E402
from engine.checkpoint import export_hf  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.dist import destroy_distributed, init_distributed  # noqa: E402
from engine.log import setup_logging  # noqa: E402
from engine.model import Policy  # noqa: E402
from engine.sections import CheckpointConfig, OptimConfig, TrainConfig  # noqa: E402
from engine.stages.common import build_policy  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

VOCAB = 1024
IMAGE_TOKEN, VISION_START, VISION_END = special_ids(VOCAB)


def make_model(path: Path, layers: int, hidden: int) -> None:
    heads = max(2, hidden // 128)
    config = qwen_vl_config(hidden=hidden, layers=layers, heads=heads, kv_heads=max(1, heads // 4),
                            intermediate=4 * hidden, vocab=VOCAB, vision_depth=2, vision_hidden=128, vision_heads=2)
    random_model(config).save_pretrained(path)


def make_batch(batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Each sample: 4 text tokens, one 112x112 image (8x8 patches -> 16 merged tokens), then text; the second
    half of every sample is the response (labels), the first half the prompt."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB - 3, (batch, seq), generator=g)
    ids[:, 4] = VISION_START
    ids[:, 5:21] = IMAGE_TOKEN
    ids[:, 21] = VISION_END
    mm = (ids == IMAGE_TOKEN).int()
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    pixels = torch.randn(batch * 64, 3 * 2 * 14 * 14, generator=g)
    grid = torch.tensor([[1, 8, 8]] * batch)
    b = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, mm_token_type_ids=mm,
             pixel_values=pixels, image_grid_thw=grid)
    return {k: v.to(device) for k, v in b.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    dist_info = init_distributed()
    setup_logging(0)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "base", args.layers, args.hidden)
        batch = make_batch(args.batch, args.seq, dist_info.device)

        def make_trainer(stage_dir):
            policy, hf_model = build_policy(tmp / "base", ModelConfig(dtype="auto"), dist_info)
            trainer = Trainer(policy, optim=OptimConfig(lr=1e-3, warmup_steps=1, schedule="constant"),
                              train=TrainConfig(), checkpoint=CheckpointConfig(), stage_dir=stage_dir,
                              dist_info=dist_info, total_steps=args.steps + 1)
            return policy, hf_model, trainer

        policy, hf_model, trainer = make_trainer(tmp / "stage")

        def loss_fn(mb):
            logp = policy(mb)
            return -logp.mean(), {"train/loss": -logp.mean().detach(), "train/num_tokens": mb["attention_mask"].sum()}

        losses, times = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            values = trainer.train_step([batch], loss_fn)  # syncs: returns floats
            times.append(time.perf_counter() - t0)
            trainer.step += 1
            losses.append(values["train/loss"])
        if not all(torch.isfinite(torch.tensor(losses))) or not losses[-1] < losses[0]:
            failures.append(f"loss did not fall: {losses}")
        trainer.save()
        expected = trainer.train_step([batch], loss_fn)["train/loss"]
        policy2, _, trainer2 = make_trainer(tmp / "stage")
        trainer2.resume()
        policy = policy2  # loss_fn reads `policy`
        got = trainer2.train_step([batch], loss_fn)["train/loss"]
        if abs(got - expected) > 1e-3 * abs(expected):
            failures.append(f"resume: next-step loss {got} != {expected}")
        with torch.no_grad():
            trained = policy2(batch).float()
        export_hf(policy2, hf_model, tmp / "base", tmp / "hf", dist_info)
        loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp / "hf", dtype=torch.float32).to(
            dist_info.device)
        with torch.no_grad():
            again = Policy(loaded)(batch)
        err = (again - trained).abs().max().item()
        tol = 0.1 if dist_info.device.type == "cuda" else 1e-5  # bf16 compute in training vs fp32 reload
        if err > tol:
            failures.append(f"export: log-prob max diff {err:.3e} > {tol}")
        steady = sorted(times[2:]) or times
        tokens = args.batch * args.seq
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        print("\n| device | layers x hidden | batch x seq | step ms (median after 2) | tok/s | peak GiB | "
              "loss first -> last | resume diff | export max diff |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} | {args.layers} x "
              f"{args.hidden} | {args.batch} x {args.seq} | {1000 * steady[len(steady) // 2]:.1f} | "
              f"{tokens / steady[len(steady) // 2]:,.0f} | {mem:.2f} | {losses[0]:.3f} -> {losses[-1]:.3f} | "
              f"{abs(got - expected):.2e} | {err:.2e} |")
    destroy_distributed()
    for f in failures:
        print(f"FAILED: {f}")
    print("engine smoke: " + ("ok" if not failures else f"{len(failures)} failure(s)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

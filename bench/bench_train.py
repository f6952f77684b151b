"""Real (non-padding) tokens per second of one forward+backward step: padded batch vs packed row.

Providers: `padded` (right-padded batch, transformers sdpa, the usual way), `packed-sdpa` (one packed row,
sdpa with the block-diagonal mask transformers builds from the position restarts), `packed-varlen` (one packed
row, our engine_varlen attention). All compute the loss through the policy's fused log-prob path on response
tokens. Synthetic Qwen2.5-VL with random weights; samples with one image each.

    python bench/bench_train.py                 # CPU: a toy-sized model, 8 samples of 100-400 tokens
    python bench/bench_train.py --preset 3b     # GPU: Qwen2.5-VL-3B shape, 8 samples of 577-1,497 tokens,
                                                # one 448x448 image each, bf16, activation checkpointing
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._synthetic import qwen_vl_config, random_model, special_ids  # noqa: E402
from engine.attention import register  # noqa: E402
from engine.data import Sample, collate  # noqa: E402
from engine.model import Policy  # noqa: E402
from engine.packed_rows import pack_samples  # noqa: E402
from kernels._bench import Results, time_ms  # noqa: E402

PRESETS = {
    # name: text (hidden, layers, heads, kv heads, intermediate), vision (depth, hidden, heads), lengths, image side
    "tiny": dict(text=(128, 2, 4, 2, 256), vision=(2, 64, 2), lengths=(100, 400), image=112, vocab=4096),
    "3b": dict(text=(2048, 36, 16, 2, 11008), vision=(32, 1280, 16), lengths=(577, 1497), image=448, vocab=151936),
}


def build_model(p: dict, attn: str):
    hidden, layers, heads, kv, inter = p["text"]
    depth, v_hidden, v_heads = p["vision"]
    config = qwen_vl_config(hidden=hidden, layers=layers, heads=heads, kv_heads=kv, intermediate=inter,
                            vocab=p["vocab"], vision_depth=depth, vision_hidden=v_hidden, vision_heads=v_heads)
    config._attn_implementation = attn
    return random_model(config)


def make_samples(p: dict, num: int) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    image, v_start, v_end = special_ids(p["vocab"])
    side = p["image"] // 14
    num_image_tokens = side * side // 4
    lo, hi = p["lengths"]
    samples = []
    for i in range(num):
        length = lo + (hi - lo) * i // max(1, num - 1)
        ids = torch.randint(0, p["vocab"] - 3, (length,), generator=g)
        ids[5], ids[6 : 6 + num_image_tokens], ids[6 + num_image_tokens] = v_start, image, v_end
        prompt = 7 + num_image_tokens + 20
        labels = ids.clone()
        labels[:prompt] = -100
        samples.append(Sample(input_ids=ids.tolist(), labels=labels.tolist(),
                              mm_token_type_ids=(ids == image).int().tolist(),
                              pixel_values=torch.randn(side * side, 3 * 2 * 14 * 14, generator=g),
                              image_grid_thw=torch.tensor([[1, side, side]]), num_prompt_tokens=prompt,
                              row_id=str(i)))
    return samples


def time_provider(p, samples, attn, packed, device, dtype, args) -> tuple[tuple[float, float, float], float]:
    """(p50, p20, p80) ms of one forward+backward step, and its loss."""
    real = sum(len(s.input_ids) for s in samples)
    model = build_model(p, attn).to(device=device, dtype=dtype)
    if not args.no_checkpointing and device.type == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    policy = Policy(model)
    batch = pack_samples(samples, merge_size=2) if packed else collate(samples, pad_id=0)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)

    def step():
        loss = -policy(batch).sum() / real
        loss.backward()
        return loss.detach()

    loss = float(step())  # sync
    model.zero_grad(set_to_none=True)
    return time_ms(step, warmup=1, reps=args.reps), loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="3b" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-checkpointing", action="store_true", help="disable activation checkpointing")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    samples = make_samples(p, args.samples)
    real = sum(len(s.input_ids) for s in samples)
    padded_tokens = len(samples) * max(len(s.input_ids) for s in samples)
    varlen = register()
    res = Results("train_step", Path(args.out))
    shape = f"{args.preset} B={len(samples)} real={real} padded={padded_tokens}"
    print(f"{shape}: {real} real tokens; padding would add {padded_tokens - real} ({padded_tokens / real:.2f}x)")
    base_ms, losses = None, {}
    for provider, attn, packed in (("padded", "sdpa", False), ("packed-sdpa", "sdpa", True),
                                   ("packed-varlen", varlen, True)):
        ms, losses[provider] = time_provider(p, samples, attn, packed, device, dtype, args)
        base_ms = base_ms or ms[0]
        res.add(provider, "fwd+bwd", shape, str(dtype).removeprefix("torch."), ms, ref_ms=base_ms)
        print(f"{provider:14s} {ms[0]:9.1f} ms  {real / ms[0] * 1000:10,.0f} real tok/s  loss {losses[provider]:.5f}")
    spread = max(losses.values()) - min(losses.values())
    print(f"loss spread across providers: {spread:.2e} (same tokens, same weights)")
    res.print_table()
    res.write()


if __name__ == "__main__":
    main()

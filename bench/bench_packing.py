"""Benchmark of kernels/packing.py: packed M-RoPE positions (C++ / CUDA / Python reference / transformers'
get_rope_index once per sample) and pack, on 64 multimodal samples of 200-4,000 tokens with 1-3 images each.

    python bench/bench_packing.py            # prints the table, appends bench/results/packing.csv

Needs only torch and transformers (no engine); build the extension first: pip install -e . --no-build-isolation.
"""

import argparse
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels import packing  # noqa: E402
from kernels._bench import Results, time_ms  # noqa: E402

IMAGE, VSTART, VEND, MERGE = 60, 62, 63, 2


def make_samples(num_samples: int = 64, seed: int = 0) -> list[dict]:
    """Qwen-style samples: text, then per image vision_start + image pads + vision_end, padded with text to a
    random length in [200, 4000] (grids 1x16x16 .. 1x32x32 patches, i.e. 64-256 tokens an image)."""
    rng = random.Random(seed)
    samples = []
    for _ in range(num_samples):
        target = rng.randint(200, 4000)
        ids, grids = [rng.randint(0, 59) for _ in range(rng.randint(5, 40))], []
        for _ in range(rng.randint(1, 3)):
            h, w = 2 * rng.randint(8, 16), 2 * rng.randint(8, 16)
            grids.append([1, h, w])
            ids += [VSTART] + [IMAGE] * (h * w // MERGE**2) + [VEND] + [rng.randint(0, 59) for _ in range(8)]
        ids += [rng.randint(0, 59) for _ in range(max(0, target - len(ids)))]
        input_ids = torch.tensor(ids)
        grid = torch.tensor(grids)
        samples.append(dict(input_ids=input_ids, labels=input_ids.clone(), image_grid_thw=grid,
                            mm_token_type_ids=(input_ids == IMAGE).int(),
                            pixel_values=torch.randn(int(grid.prod(-1).sum()), 8)))
    return samples


def tiny_qwen():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64, bos_token_id=0, eos_token_id=1,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                  spatial_merge_size=MERGE, tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=61,
                           vision_start_token_id=VSTART, vision_end_token_id=VEND)
    return Qwen2_5_VLModel(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for packing.csv")
    args = ap.parse_args()
    samples = make_samples()
    packed = packing.pack_ref(samples)
    types, cu, grid = packed.mm_token_type_ids, packed.cu_seqlens, packed.image_grid_thw
    num_tokens = types.numel()
    shape = f"B=64 T={num_tokens} N={len(grid)}"
    model = tiny_qwen()

    def hf_loop():  # what a trainer would do without packing support: get_rope_index once per sample
        out = []
        for s in samples:
            pos, delta = model.get_rope_index(s["input_ids"][None], s["mm_token_type_ids"][None],
                                              image_grid_thw=s["image_grid_thw"])
            out.append((pos, delta))
        return out

    # Correctness once before timing: every path equals get_rope_index per sample.
    hf = hf_loop()
    want_pos = torch.cat([p[:, 0] for p, _ in hf], dim=1)
    want_delta = torch.cat([d.view(-1) for _, d in hf])
    providers = {"ref": lambda: packing.mrope_positions_ref(types, cu, grid)}
    if packing.native_available("cpu"):
        providers["cpp"] = lambda: packing.mrope_positions(types, cu, grid)
    if torch.cuda.is_available() and packing.native_available("cuda"):
        t_d, cu_d, g_d = types.cuda(), cu.cuda(), grid.cuda()
        providers["cuda"] = lambda: packing.mrope_positions(t_d, cu_d, g_d)
    for name, fn in providers.items():
        pos, delta = fn()
        assert torch.equal(pos[1:].cpu(), want_pos) and torch.equal(delta.cpu(), want_delta), name

    res = Results("packing", Path(args.out))
    hf_ms = time_ms(hf_loop, warmup=1, reps=5)
    res.add("hf_get_rope_index_loop", "mrope", shape, "int64", hf_ms, ref_ms=hf_ms[0])
    for name, fn in providers.items():
        res.add(name, "mrope", shape, "int64", time_ms(fn, warmup=2, reps=10 if name == "ref" else 50),
                ref_ms=hf_ms[0])

    pack_ref_ms = time_ms(lambda: packing.pack_ref(samples), reps=20)
    res.add("ref", "pack", shape, "mixed", pack_ref_ms, ref_ms=pack_ref_ms[0])
    if packing.native_available("cpu"):
        res.add("cpp", "pack", shape, "mixed", time_ms(lambda: packing.pack(samples), reps=50),
                ref_ms=pack_ref_ms[0])
    logp = torch.randn(num_tokens)
    unpack_ref_ms = time_ms(lambda: packing.unpack_ref(logp, cu), reps=20)
    res.add("ref", "unpack", shape, "float32", unpack_ref_ms, ref_ms=unpack_ref_ms[0])
    res.add("native" if packing.native_available("cpu") else "ref", "unpack", shape, "float32",
            time_ms(lambda: packing.unpack(logp, cu), reps=50), ref_ms=unpack_ref_ms[0])
    if "cuda" in providers:
        samples_d = [{k: v.cuda() for k, v in s.items()} for s in samples]
        res.add("cuda", "pack", shape, "mixed", time_ms(lambda: packing.pack(samples_d), reps=50),
                ref_ms=pack_ref_ms[0])
        logp_d = logp.cuda()
        res.add("cuda", "unpack", shape, "float32", time_ms(lambda: packing.unpack(logp_d, cu_d), reps=50),
                ref_ms=unpack_ref_ms[0])
    print("x eager = speedup over the first row of the same mode (mrope: the per-sample get_rope_index loop)")
    res.print_table()
    res.write()


if __name__ == "__main__":
    main()

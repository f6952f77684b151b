"""Generated tokens per second of the rollout backends against transformers' `generate`, in the same run.

Providers: `builtin` (engine/rollout/builtin.py: static KV cache, our decode loop), `builtin-compiled` (the same
with `compile_decode=True`: torch.compile of the decode step, CUDA graphs on a GPU; compile time excluded) and
`hf-generate` (transformers' `generate`, sampling, dynamic cache: the baseline); `builtin-n8` is the builtin
backend on the same number of rows as 1/8 of the prompts sampled 8 times each (GRPO's groups, one prefill per
prompt). Each prompt is a chat prompt
with one image; sampling at temperature 1; tokens/s counts the tokens actually generated (rows stop on eos).

    python bench/bench_rollout.py                 # CPU: the toy world's model, 16 prompts x 112x112, 32 new tokens
    python bench/bench_rollout.py --preset 3b     # GPU: Qwen2.5-VL-3B-shaped random weights, bf16, 32 and 128
                                                  # prompts with one 448x448 image each, 256 new tokens
    python bench/bench_rollout.py --mode skewed   # continuous vs static batching on a long-tail length mix
    python bench/bench_rollout.py --preset 3b --mode skewed --reps 1    # the same on a GPU (~3 min on an H100)

`--mode skewed`: a long tail of response lengths as in GRPO on reasoning prompts (most short, a few at the limit).
Random weights give a near-uniform next-token distribution, so a set of extra stop tokens holding about 4 /
max_new_tokens of the vocabulary makes the lengths geometric: mean ~max_new_tokens / 4, ~2% of the rows reach the
limit (the measured distribution is printed). `builtin` (continuous batching) and `builtin-static` decode the same
rows (prompts x 4 samples) with the same number of decode slots (a quarter of the rows, as specs.toml's 128 samples a
rank in 32-row batches) and, under one seed, produce the same completions (checked), so tokens/s compare schedules
only; `hf-generate` decodes all rows at once until the longest ends. Greedy outputs of both schedules are checked
against `generate` once before timing (exactly in fp32; reported, not asserted, in bf16). Last, the sampler alone at
the real vocabulary (151,936), which the toy vocabulary hides: per-row random streams (one hashed uniform and one
fp64 cumsum per row) against one `torch.multinomial` draw.

The model has random weights and the toy world's tokenizer (built here, no download; the GPU machine has no
`datasets`, which the toy's parquet writer needs, so only the tokenizer and image processor are built). The
vocabulary is therefore the toy's (~500 tokens padded to 512) instead of 151,936: at the 3B shape the lm_head is
~1% of the decode FLOPs instead of ~10%, which favours no provider. Rows go to bench/results/rollout.csv.
"""

import argparse
import csv
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

from bench._synthetic import qwen_vl_config  # noqa: E402
from engine.data import Processor  # noqa: E402
from engine.rollout import BuiltinBackend, SamplingParams  # noqa: E402
from engine.toy import FORMAT_PROMPT, SYSTEM_PROMPT, ToySpec, _train_tokenizer, generate_split  # noqa: E402
from kernels._bench import device_name  # noqa: E402

PRESETS = {
    # text (hidden, layers, heads, kv heads, intermediate), vision (depth, hidden, heads), image side, prompts, new
    "toy": dict(text=(64, 2, 4, 2, 128), vision=(2, 32, 2), image=112, prompts=(16,), new_tokens=32,
                skewed=(64, 128)),
    "3b": dict(text=(2048, 36, 16, 2, 11008), vision=(32, 1280, 16), image=448, prompts=(32, 128), new_tokens=256,
               skewed=(128, 256)),
}
"""skewed: (rows, max new tokens) of `--mode skewed`."""
SKEW_SAMPLES = 4
"""Samples per prompt in `--mode skewed`; the decode slots are rows / SKEW_SAMPLES."""
REPS = 3
"""Timed repetitions per provider; the table reports the median."""
COLUMNS = ["date", "device", "torch", "preset", "provider", "prompts", "max_new_tokens", "tokens", "seconds",
           "tokens_per_s", "x_generate"]


def build_model_dir(p: dict, out: Path, dtype: torch.dtype) -> Path:
    """A toy tokenizer + image processor and a random Qwen2.5-VL of the preset's shape, saved under `out`."""
    spec = ToySpec(image_size=p["image"])
    train = generate_split(ToySpec(num_train=64), "train")
    tokenizer = _train_tokenizer(spec, [s.problem for s in train] + [s.reasoning for s in train]
                                 + [FORMAT_PROMPT, SYSTEM_PROMPT, "system\nuser\nassistant\n"])
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               min_pixels=56 * 56, max_pixels=p["image"] ** 2)
    hidden, layers, heads, kv, inter = p["text"]
    depth, v_hidden, v_heads = p["vision"]
    config = qwen_vl_config(hidden=hidden, layers=layers, heads=heads, kv_heads=kv, intermediate=inter,
                            vocab=-(-len(tokenizer) // 64) * 64, vision_depth=depth, vision_hidden=v_hidden,
                            vision_heads=v_heads)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
                                                           "<|im_end|>", "<|endoftext|>")}
    config.image_token_id, config.vision_start_token_id = ids["<|image_pad|>"], ids["<|vision_start|>"]
    config.vision_end_token_id = ids["<|vision_end|>"]
    config.text_config.eos_token_id = config.eos_token_id = ids["<|im_end|>"]
    config.text_config.pad_token_id = ids["<|endoftext|>"]
    config.text_config.bos_token_id = config.bos_token_id = ids["<|endoftext|>"]
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    model.save_pretrained(out)
    return out


def make_prompts(processor: Processor, num: int, side: int) -> list:
    g = torch.Generator().manual_seed(0)
    prompts = []
    for i in range(num):
        pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
        prompts.append(processor.encode("<image>How many red shapes are in the picture? " + FORMAT_PROMPT,
                                        [Image.fromarray(pixels)], row_id=f"p{i}"))
    return prompts


def run_builtin(model_dir, device, dtype, processor, prompts, new_tokens, reps, compile_decode=False, n=1,
                slots=None, batching="continuous", extra_stops=(), keep=None):
    """(generated tokens, median seconds) of the builtin backend. With n > 1, the first len(prompts) / n prompts
    are sampled n times each (GRPO's groups: the same number of rows, one prefill per prompt). `slots` decode rows
    (default: all rows at once); `extra_stops` are stop tokens added to the model's; `keep` (a dict) receives the
    last run's completions and timing."""
    rows = len(prompts)
    backend = BuiltinBackend(model_dir, device=device, dtype=dtype, processor=processor, max_batch_size=slots or rows,
                             compile_decode=compile_decode, batching=batching)
    backend.eos_ids = sorted(set(backend.eos_ids) | set(extra_stops))
    prompts = prompts[:rows // n]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=0)
    # Warm-up: with the measured shapes when compiled (one compile per rows x cache-length shape), else short.
    backend.generate(prompts, n, SamplingParams(temperature=1.0, max_new_tokens=new_tokens if compile_decode else 8,
                                                seed=1))
    times = []
    for _ in range(reps):  # the same seed each time: the same tokens, so the median time is comparable
        _sync(device)
        t0 = time.perf_counter()
        out = backend.generate(prompts, n, sampling)
        _sync(device)
        times.append(time.perf_counter() - t0)
    if keep is not None:
        keep.update(out=out, timing=backend.timing)
    del backend
    return sum(len(c.token_ids) for g in out for c in g), statistics.median(times)


def run_generate(model_dir, device, dtype, prompts, new_tokens, reps, extra_stops=()) -> tuple[int, float]:
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    if extra_stops:
        eos = model.generation_config.eos_token_id
        model.generation_config.eos_token_id = sorted(set(eos if isinstance(eos, list) else [eos]) | set(extra_stops))
    model = model.to(device).eval()
    # All prompts have the same length (one image of one size, one question), so no padding is needed.
    inputs = dict(input_ids=torch.tensor([s.input_ids for s in prompts]),
                  mm_token_type_ids=torch.tensor([s.mm_token_type_ids for s in prompts]),
                  pixel_values=torch.cat([s.pixel_values for s in prompts]).to(dtype),
                  image_grid_thw=torch.cat([s.image_grid_thw for s in prompts]))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        warm = {k: v[:2] if k not in ("pixel_values", "image_grid_thw") else v for k, v in inputs.items()}
        warm["pixel_values"] = inputs["pixel_values"][: len(inputs["pixel_values"]) // len(prompts) * 2]
        warm["image_grid_thw"] = inputs["image_grid_thw"][:2]
        model.generate(**warm, do_sample=True, max_new_tokens=4)
        times = []
        for i in range(reps):
            torch.manual_seed(i)
            _sync(device)
            t0 = time.perf_counter()
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=new_tokens)
            _sync(device)
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    new = out[:, inputs["input_ids"].shape[1]:]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    tokens = 0
    for row in new.tolist():  # generated tokens up to and including the first eos (the rest is padding)
        stop = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
        tokens += stop + 1
    del model
    return tokens, seconds


def extra_stop_tokens(processor: Processor, model_dir: Path, new_tokens: int) -> list[int]:
    """Ordinary token ids holding ~4 / new_tokens of the model's vocabulary (see the module docstring)."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    tok = processor.tokenizer
    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>",
                                                                                   "<|vision_end|>", "<|video_pad|>")}
    ordinary = [i for i in range(len(tok)) if i not in special]
    k = max(1, round(4 * vocab / new_tokens))
    return ordinary[len(ordinary) // 2:len(ordinary) // 2 + k]


def check_greedy(model_dir, device, dtype, processor, prompts, new_tokens, stops) -> tuple[int, int]:
    """Greedy tokens of the continuous and static schedules against `generate`, prompt by prompt: (equal, total)."""
    outs = []
    for batching in ("continuous", "static"):
        backend = BuiltinBackend(model_dir, device=device, dtype=dtype, processor=processor, max_batch_size=2,
                                 batching=batching)
        backend.eos_ids = sorted(set(backend.eos_ids) | set(stops))
        outs.append([g[0].token_ids for g in backend.generate(prompts, 1, SamplingParams(temperature=0,
                                                                                         max_new_tokens=new_tokens))])
    model = backend.model  # the same weights; `generate` with the same stops and the vision tokens banned
    equal = 0
    for s, a, b in zip(prompts, *outs, strict=True):
        ids = torch.tensor([s.input_ids], device=device)
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             mm_token_type_ids=torch.tensor([s.mm_token_type_ids], device=device),
                             pixel_values=s.pixel_values.to(device, dtype), image_grid_thw=s.image_grid_thw.to(device),
                             do_sample=False, max_new_tokens=new_tokens, eos_token_id=backend.eos_ids,
                             bad_words_ids=[[i] for i in backend.banned_ids])[0, ids.shape[1]:].tolist()
        stop = next((i for i, t in enumerate(ref) if t in backend.eos_ids), len(ref) - 1)
        equal += a == b == ref[:stop + 1]
    del backend, model
    return equal, len(prompts)


def time_sampler(device, vocab: int = 151936) -> None:
    """ms per call of the builtin's sampler (per-row hashed streams, inverse CDF in fp64) against one
    `torch.multinomial` draw, at Qwen2.5-VL's real vocabulary (the bench model's is the toy's)."""
    from engine.rollout.sampler import row_keys, sample

    sampling = SamplingParams(temperature=1.0)
    gen = torch.Generator(device=device).manual_seed(0)

    def per_row_streams(logits, keys, steps):
        return sample(logits, sampling, [0], keys, steps)

    def multinomial(logits, keys, steps):
        return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen)

    for rows in (32, 128):
        args = (torch.randn(rows, vocab, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32),
                row_keys(0, torch.arange(rows, device=device)), torch.zeros(rows, dtype=torch.long, device=device))
        for call in (per_row_streams, multinomial):
            call(*args)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(5):
                call(*args)
            _sync(device)
            print(f"sampler at {rows} rows x {vocab} vocab: {call.__name__} {(time.perf_counter() - t0) / 5 * 1e3:.2f} "
                  "ms", flush=True)


def run_skewed(p, model_dir, device, dtype, processor, reps, record) -> None:
    """Continuous vs static batching at the same slot count on a long-tail length mix (see the module docstring)."""
    rows, new_tokens = p["skewed"]
    prompts = make_prompts(processor, rows, p["image"])
    stops = extra_stop_tokens(processor, model_dir, new_tokens)
    # Correctness once before timing, on a few prompts and a shorter limit (3 decodes of each).
    equal, total = check_greedy(model_dir, device, dtype, processor, prompts[:3], min(new_tokens, 64), stops)
    print(f"greedy: continuous == static == generate on {equal}/{total} prompts ({dtype})", flush=True)
    if dtype == torch.float32 and equal != total:
        raise AssertionError("greedy outputs differ from generate in fp32")
    slots = max(1, rows // SKEW_SAMPLES)
    ref_tokens, ref_s = run_generate(model_dir, device, dtype, prompts, new_tokens, reps, extra_stops=stops)
    base = ref_tokens / ref_s
    record("hf-generate-skewed", rows, ref_tokens, ref_s, base, new_tokens)
    kept = {}
    for name, batching in (("builtin-skewed", "continuous"), ("builtin-static-skewed", "static")):
        kept[batching] = {}
        tokens, seconds = run_builtin(model_dir, device, dtype, processor, prompts, new_tokens, reps, n=SKEW_SAMPLES,
                                      slots=slots, batching=batching, extra_stops=stops, keep=kept[batching])
        record(name, rows, tokens, seconds, base, new_tokens)
        kept[batching]["tok_per_s"] = tokens / seconds
    same = [[c.token_ids for c in g] for g in kept["continuous"]["out"]] == \
        [[c.token_ids for c in g] for g in kept["static"]["out"]]
    lengths = sorted(len(c.token_ids) for g in kept["static"]["out"] for c in g)
    q = lambda f: lengths[min(len(lengths) - 1, int(f * len(lengths)))]  # noqa: E731
    print(f"skewed: {rows} rows ({rows // SKEW_SAMPLES} prompts x {SKEW_SAMPLES}), {slots} slots, {len(stops)} extra "
          f"stop tokens; lengths mean {sum(lengths) / len(lengths):.1f}, p50 {q(0.5)}, p90 {q(0.9)}, max "
          f"{lengths[-1]}, {sum(n == new_tokens for n in lengths)} at the limit of {new_tokens}; same completions: "
          f"{same}")
    for batching in ("continuous", "static"):
        t = kept[batching]["timing"]
        print(f"  {batching}: {t.num_decode_steps} decode steps, prefill {t.prefill_s:.2f} s, decode {t.decode_s:.2f} "
              f"s, tail {t.tail_s:.2f} s, slot use {t.slot_use:.2f}")
    print(f"  continuous / static tokens/s: {kept['continuous']['tok_per_s'] / kept['static']['tok_per_s']:.2f}x")
    time_sampler(device)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="3b" if torch.cuda.is_available() else "toy")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--reps", type=int, default=REPS, help="timed repetitions (median reported)")
    ap.add_argument("--mode", choices=("throughput", "skewed", "all"), default="throughput",
                    help="throughput: providers at equal rows; skewed: continuous vs static on a long-tail mix")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    path = Path(args.out) / "rollout.csv"

    def record(provider: str, num: int, tokens: int, seconds: float, base: float, new_tokens: int | None = None):
        """Append one result to the CSV now and print it: a run cut short (a device call's time limit) keeps
        what it measured."""
        row = dict(date=datetime.date.today().isoformat(), device=device_name(), torch=torch.__version__,
                   preset=args.preset, provider=provider, prompts=num, max_new_tokens=new_tokens or p["new_tokens"],
                   tokens=tokens,
                   seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1),
                   x_generate=round(tokens / seconds / base, 2))
        rows.append(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerow(row)
        print(f"{provider} at {num} prompts: {row['tokens_per_s']:,.0f} tokens/s, {row['x_generate']:.2f}x generate",
              flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(p, Path(tmp), dtype)
        processor = Processor.from_pretrained(model_dir)
        if args.mode in ("skewed", "all"):
            run_skewed(p, model_dir, device, dtype, processor, args.reps, record)
        for num in p["prompts"] if args.mode in ("throughput", "all") else ():
            prompts = make_prompts(processor, num, p["image"])
            ref_tokens, ref_s = run_generate(model_dir, device, dtype, prompts, p["new_tokens"], args.reps)
            base = ref_tokens / ref_s
            record("hf-generate", num, ref_tokens, ref_s, base)
            record("builtin", num, *run_builtin(model_dir, device, dtype, processor, prompts, p["new_tokens"],
                                                args.reps), base)
            record("builtin-compiled", num, *run_builtin(model_dir, device, dtype, processor, prompts,
                                                         p["new_tokens"], args.reps, compile_decode=True), base)
            # The GRPO case: num / 8 prompts x 8 samples, one prefill per prompt (same rows as above).
            record("builtin-n8", num, *run_builtin(model_dir, device, dtype, processor, prompts, p["new_tokens"],
                                                   args.reps, n=8), base)
    print(f"\nrollout on {device_name()} (torch {torch.__version__}), preset {args.preset}, {dtype}")
    print("| provider | prompts | new tokens | tokens | seconds | tokens/s | x generate |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['provider']} | {r['prompts']} | {r['max_new_tokens']} | {r['tokens']} | {r['seconds']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {r['x_generate']:.2f} |")
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()

"""The builtin rollout backend: batched sampling from a plain HF model with our own prefill + decode loop.

Why an inference copy of the model: the backend holds its own unsharded `Qwen2_5_VLForConditionalGeneration`
(or text Qwen2). Decoding then needs no FSDP collectives (gathering every layer from FSDP2 at every one of
hundreds of decode steps would put an all-gather on the critical path of each token), the code stays a plain
forward, and after each optimizer step the trainer streams the full tensors in with `update_weights`. The cost
is one extra copy of the weights per rank (bf16: 2 bytes per parameter, 15 GiB for the 7B), which `sleep` moves
to host memory while the trainer runs on CUDA.

Two schedules share the prefill, the decode step and the sampler. `batching="continuous"` (the default,
engine/rollout/continuous.py): a fixed set of decode slots, each refilled with the next queued (prompt, sample)
as soon as its row ends. `batching="static"`, the plain twin that the tests compare it with, described here: left-pad
the batch's distinct prompts, one prefill forward with the images into a preallocated
`StaticCache` (transformers' own; it works with Qwen2.5-VL on CPU, and the greedy test against `generate`, which
uses a DynamicCache, checks it), copy each prompt's K/V to its n rows of the decode cache (so the vision tower
and the prefill run once per prompt, not n times; the decode cache is kept and refilled while the batch shape
stays, see `_decode_cache`), then one single-token forward per step. Positions are passed explicitly (M-RoPE: see
`_prefill_positions`). Vision special tokens are banned from the output; rows stop on eos and then keep
feeding padding until every row is done. Each row samples from its own RNG stream (engine/rollout/sampler.py), so
both schedules give the same completions under a seed.

`compile_decode=True` compiles the decode step (static shapes: the whole mask and the cache slot as a tensor);
on CUDA in "reduce-overhead" mode, which replays it as CUDA graphs; it gives the eager step's greedy tokens.

Letters in shapes: B batch rows (prompts x n), T prompt length (padded), L cache length, V vocabulary.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import StaticCache

from engine.data import Sample
from engine.log import Progress, log0, warn_once
from engine.model import build_meta_model, load_weights
from engine.rollout.base import Completion, RolloutTiming, SamplingParams
from engine.rollout.continuous import _sync, generate_continuous
from engine.rollout.sampler import row_keys, sample

__all__ = ["BuiltinBackend"]

_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


class BuiltinBackend:
    """Generation with an inference copy of the policy (see the module docstring).

    Args:
        model_dir: HF checkpoint directory (Qwen2.5-VL or text Qwen2).
        device: where the inference copy runs ("cpu", "cuda", "cuda:3", ...).
        dtype: parameter dtype of the inference copy (bf16 on GPU; fp32 for exact tests on CPU).
        processor: an `engine.data.Processor` (its tokenizer decodes and names the stop tokens); None loads one
            from `model_dir`.
        max_batch_size: decode slots: most rows (prompts x n) decoded together.
        compile_decode: compile the one-token decode step with torch.compile (on CUDA in "reduce-overhead" mode,
            i.e. replayed as CUDA graphs). Shapes are static per (rows, cache length) and the cache length is
            rounded up to a multiple of `CACHE_BUCKET`, so a run compiles a handful of variants, each once.
        batching: "continuous" (a slot whose row ended takes the next queued row at once) or "static" (batches of
            max_batch_size rows, each decoded until its longest row ends).
    """

    CACHE_BUCKET = 256
    PREFILL_TOKENS = 8192
    """Continuous batching: prefill more upcoming prompts along with the needed ones while the left-padded prefill
    batch stays within this many tokens (see `continuous._prefill_batch`)."""

    def __init__(self, model_dir: str | Path, *, device: str | torch.device, dtype: torch.dtype = torch.float32,
                 processor=None, max_batch_size: int = 64, compile_decode: bool = False,
                 batching: str = "continuous"):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batching not in ("continuous", "static"):
            raise ValueError(f"batching must be 'continuous' or 'static', got {batching!r}")
        self.batching = batching
        self.timing: RolloutTiming | None = None
        self.progress = Progress("rollout", 0, "samples")
        if processor is None:
            from engine.data import Processor

            processor = Processor.from_pretrained(model_dir)
        self.device, self.dtype, self.max_batch_size = torch.device(device), dtype, max_batch_size
        self.processor, self.tokenizer = processor, processor.tokenizer
        # Built on the meta device in the sampling dtype and filled on `device` straight from the safetensors files:
        # no fp32 copy of the model in host memory first (30 GB for the 7B), and the rotary inverse frequencies are
        # computed in fp32 rather than rounded through bf16.
        model = build_meta_model(model_dir, attn_implementation="sdpa").to(dtype)
        _rotary_to_fp32(model)
        load_weights(model, model_dir, self.device)
        self.model = model.eval().requires_grad_(False)
        self.is_vlm = hasattr(self.model.model, "get_rope_index")
        self.eos_ids = sorted(self._eos_ids())
        vocab = self.model.get_output_embeddings().weight.shape[0]
        banned = {self.tokenizer.convert_tokens_to_ids(t) for t in _VISION_TOKENS}
        self.banned_ids = sorted(i for i in banned if isinstance(i, int) and 0 <= i < vocab
                                 and i != self.tokenizer.unk_token_id)
        self._refresh_params()
        self._cache, self._cache_shape = None, None  # the decode K/V cache, reused across batches of one shape
        self._decode_shapes: set[tuple[int, int]] = set()
        self.compile_decode = compile_decode
        self._decode = self._decode_step
        if compile_decode:
            # TODO: measure tokens/s of the compiled step against eager on a GPU (bench/bench_rollout.py,
            # builtin-compiled row); only the CPU run exists, so whether CUDA graphs pay off is unknown.
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self._decode = torch.compile(self._decode_step, mode=mode, dynamic=False)
        log0("rollout: builtin backend, %s %s on %s, static KV cache, %s batching of %d rows, decode %s, eos %s, "
             "banned %s", type(self.model).__name__, str(dtype).removeprefix("torch."), self.device, batching,
             max_batch_size, "compiled" if compile_decode else "eager", self.eos_ids, self.banned_ids)

    def _decode_step(self, tokens, mask, cache_pos, pos, cache) -> torch.Tensor:
        """tokens [B, 1], mask [B, L] (padding) or [B, 1, 1, L] bool (the exact keys each row sees), cache_pos [1]
        -> next-token logits [B, V]; static shapes, compilable."""
        return self.model(input_ids=tokens, attention_mask=mask, cache_position=cache_pos, position_ids=pos,
                          past_key_values=cache, use_cache=True).logits[:, -1]

    def _eos_ids(self) -> set[int]:
        """<|im_end|> plus every eos id of the generation config and the (text) model config."""
        ids = {int(self.processor.end_of_turn_id)}
        for cfg in (self.model.generation_config, self.model.config, self.model.config.get_text_config()):
            eos = getattr(cfg, "eos_token_id", None)
            ids.update([eos] if isinstance(eos, int) else eos or [])
        return ids

    def _refresh_params(self) -> None:
        # remove_duplicate=False: with tied embeddings both "lm_head.weight" and the embedding name resolve.
        self._params = dict(self.model.named_parameters(remove_duplicate=False))

    # ------------------------------------------------------------------------------------------------ generate

    @torch.no_grad()
    def generate(self, prompts: list[Sample], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        """n completions per prompt, as result[prompt][sample] (see `Completion` for the fields).

        Row (i, j), sample j of prompt i, draws from its own RNG stream keyed by (sampling.seed, i x n + j), so the
        result is a pure function of (prompts, n, sampling, weights) whatever the schedule and max_batch_size
        (up to float rounding that differs between batch shapes). Prompts are taken shortest first when the rows
        need more than max_batch_size slots (a prompt's n rows stay together): a static batch is then left-padded to
        a length close to its own prompts'. `self.timing` tells where the call's time went.
        """
        errors = sampling.check() + ([f"n must be >= 1, got {n}"] if n < 1 else [])
        if errors:
            raise ValueError("generate: " + "; ".join(errors))
        if not prompts:
            self.timing = RolloutTiming(total_s=0.0, prefill_s=0.0, decode_s=0.0, tail_s=0.0, slot_use=1.0)
            return []
        order = list(range(len(prompts)))
        if len(prompts) * n > self.max_batch_size:
            order.sort(key=lambda i: len(prompts[i].input_ids))  # stable: ties keep their order
        # A log line at most every run.progress_every_s (rank 0): a rollout of 10K-token rows takes minutes.
        self.progress = Progress("rollout", len(prompts) * n, "samples")
        if self.batching == "continuous":
            results, self.timing = generate_continuous(self, prompts, order, n, sampling)
        else:
            results, self.timing = self._generate_static(prompts, order, n, sampling)
        out = [[Completion(prompt_index=i, token_ids=ids, text=text, logprobs=lps, finish_reason=reason)
                for ids, lps, text, reason in (results[i, j] for j in range(n))] for i in range(len(prompts))]
        num_tokens, dt = sum(len(c.token_ids) for g in out for c in g), self.timing.total_s
        log0("rollout: %d prompts x %d -> %d tokens in %.2f s (%.0f tok/s; prefill %.2f s, decode %.2f s, tail %.2f s)",
             len(prompts), n, num_tokens, dt, num_tokens / max(dt, 1e-9), self.timing.prefill_s, self.timing.decode_s,
             self.timing.tail_s)
        return out

    def _generate_static(self, prompts: list[Sample], order: list[int], n: int, sampling: SamplingParams):
        """Static batches of max_batch_size rows in `order`. Returns ({(i, j): result of `_generate_batch`}, timing)."""
        rows = [(i, j) for i in order for j in range(n)]
        results, timing = {}, RolloutTiming(total_s=0.0, prefill_s=0.0, decode_s=0.0, tail_s=0.0)
        busy_slot_steps = slot_steps = 0
        t0 = time.perf_counter()
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            keys = row_keys(sampling.seed, torch.tensor([i * n + j for i, j in chunk], device=self.device))
            batch = self._generate_batch([prompts[i] for i, _ in chunk], sampling, keys, timing)
            results.update(zip(chunk, batch, strict=True))
            self.progress.update(len(chunk), tokens=sum(len(ids) for ids, *_ in batch))
            busy_slot_steps += sum(max(0, len(ids) - 1) for ids, *_ in batch)  # decode forwards a row needed
            slot_steps += len(chunk) * max(len(ids) - 1 for ids, *_ in batch)
        timing.total_s = time.perf_counter() - t0
        timing.slot_use = busy_slot_steps / max(1, slot_steps)
        return results, timing

    def _prefill_inputs(self, samples: list[Sample]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Left-padded model inputs for the prefill and each row's next text position [B] (= its prompt length)."""
        b, t = len(samples), max(len(s.input_ids) for s in samples)
        pad = self.processor.pad_id
        input_ids = torch.full((b, t), pad, dtype=torch.long)
        attention_mask = torch.zeros(b, t, dtype=torch.long)
        mm_token_type_ids = torch.zeros(b, t, dtype=torch.long)
        for i, s in enumerate(samples):
            k = len(s.input_ids)
            input_ids[i, t - k:] = torch.tensor(s.input_ids)
            attention_mask[i, t - k:] = 1
            mm_token_type_ids[i, t - k:] = torch.tensor(s.mm_token_type_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        with_images = [s for s in samples if s.image_grid_thw is not None]
        if with_images:
            if not self.is_vlm:
                raise ValueError(f"{type(self.model).__name__} is a text model but some prompts have images")
            inputs["pixel_values"] = torch.cat([s.pixels() for s in with_images]).to(self.dtype)
            inputs["image_grid_thw"] = torch.cat([s.image_grid_thw for s in with_images])
        if self.is_vlm:
            inputs["mm_token_type_ids"] = mm_token_type_ids
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return inputs, attention_mask.sum(-1).to(self.device)

    def _prefill_positions(self, inputs: dict[str, torch.Tensor], prompt_lens: torch.Tensor):
        """Prefill position ids and the position of each row's first generated token [B].

        M-RoPE (Qwen2.5-VL): `get_rope_index` gives the prompt's (t, h, w) positions [3, B, T] (padding at 0)
        and rope_deltas [B, 1] = max position + 1 - prompt length. After the prompt every new token is text, so
        its three positions are equal: text position + delta. We pass positions explicitly at every step
        rather than rely on the model's cached `rope_deltas` attribute, which is per-model state a forward of
        another batch would overwrite. Text models: 1-D positions that skip the left padding.
        """
        mask_BT = inputs["attention_mask"]
        if self.is_vlm:
            pos_3BT, deltas_B1 = self.model.model.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                attention_mask=mask_BT)
            return pos_3BT, prompt_lens + deltas_B1.view(-1).to(prompt_lens.device)
        return (mask_BT.cumsum(-1) - 1).clamp(min=0), prompt_lens

    def _step_positions(self, next_pos: torch.Tensor) -> torch.Tensor:
        """Position ids of one decode step from each row's position [B]: [3, B, 1] (M-RoPE) or [B, 1]."""
        pos_B1 = next_pos[:, None]
        return pos_B1[None].expand(3, -1, -1) if self.is_vlm else pos_B1

    def _generate_batch(self, samples: list[Sample], sampling: SamplingParams, keys: torch.Tensor,
                        timing: RolloutTiming):
        """Decode one static batch; row b samples with RNG key keys[b] ([B] int64). Returns per row (token_ids,
        logprobs, text, finish_reason) and adds its time to `timing`.

        Rows holding the same Sample object (a prompt's n samples) share one prefill row: U distinct prompts are
        prefilled, then the cache, the last logits and the positions are copied out to the B rows."""
        distinct: dict[int, int] = {}
        prompt_of_row = [distinct.setdefault(id(s), len(distinct)) for s in samples]
        unique = list({id(s): s for s in samples}.values())  # in order of first appearance, as numbered above
        t_start = time.perf_counter()
        inputs, prompt_lens_U = self._prefill_inputs(unique)
        t = inputs["input_ids"].shape[1]
        b, max_new = len(samples), sampling.max_new_tokens
        pos, next_pos_U = self._prefill_positions(inputs, prompt_lens_U)
        # Preallocated K/V for prompt + max_new tokens (rounded up when the decode step is compiled, so that few
        # shapes occur); the mask covers the same length.
        length = t + max_new
        if self.compile_decode:
            length = -(-length // self.CACHE_BUCKET) * self.CACHE_BUCKET
        prefill = StaticCache(config=self.model.config, max_cache_len=t)
        logits_UV = self.model(**inputs, position_ids=pos, past_key_values=prefill, use_cache=True,
                               logits_to_keep=1).logits[:, -1]
        rows_B = torch.tensor(prompt_of_row, device=self.device)
        cache = self._decode_cache(prefill, rows_B, length)
        del prefill
        logits_BV, next_pos_B, mask_BT = (x.index_select(0, rows_B)
                                          for x in (logits_UV, next_pos_U, inputs["attention_mask"]))
        mask_BL = torch.ones(b, length, dtype=torch.long, device=self.device)
        mask_BL[:, :t] = mask_BT
        eos = torch.tensor(self.eos_ids, device=self.device)
        tokens_BN = torch.full((b, max_new), self.processor.pad_id, dtype=torch.long, device=self.device)
        logprobs_BN = torch.zeros(b, max_new, device=self.device)
        lengths_B = torch.zeros(b, dtype=torch.long, device=self.device)
        finished_B = torch.zeros(b, dtype=torch.bool, device=self.device)
        cache_pos_1 = torch.zeros(1, dtype=torch.long, device=self.device)
        _sync(self.device)  # timing only: the prefill's kernels end here
        t_step = time.perf_counter()
        timing.prefill_s += t_step - t_start
        for step in range(max_new):
            tok_B, lp_B = sample(logits_BV, sampling, self.banned_ids, keys, torch.full_like(keys, step))
            tok_B = tok_B.masked_fill(finished_B, self.processor.pad_id)  # finished rows keep padding
            tokens_BN[:, step], logprobs_BN[:, step] = tok_B, lp_B
            lengths_B += (~finished_B).long()
            idle = int(finished_B.sum())  # host sync once a step: lets the batch end early
            finished_B |= torch.isin(tok_B, eos)
            if step == max_new - 1 or bool(finished_B.all()):
                _add_step_time(timing, t_step, idle)
                break
            self.progress.update(detail=f"batch of {b} rows, decode step {step + 1:,}/{max_new:,}")
            # Static shapes at every step (the whole mask, the cache slot as a tensor): what CUDA graph capture
            # of the decode step needs; slots past the current one are excluded by the causal mask.
            cache_pos_1.fill_(t + step)
            logits_BV = self._decode(tok_B[:, None], mask_BL, cache_pos_1, self._step_positions(next_pos_B + step),
                                     cache)
            timing.num_decode_steps += 1
            t_step = _add_step_time(timing, t_step, idle)
        results = []
        rows = zip(tokens_BN.tolist(), logprobs_BN.tolist(), lengths_B.tolist(), strict=True)
        for ids, lps, k in rows:
            ids, lps = ids[:k], lps[:k]
            stopped = bool(ids) and ids[-1] in self.eos_ids
            results.append((ids, lps, self.tokenizer.decode(ids, skip_special_tokens=True),
                            "stop" if stopped else "length"))
        return results

    def _decode_cache(self, prefill: StaticCache, rows: torch.Tensor, length: int) -> StaticCache:
        """The decode cache for B rows of `length` slots, holding row rows[i] of the prefill cache in its row i.

        One cache is kept and refilled in place while (B, length) stays the same: a compiled decode step replayed
        as CUDA graphs then finds its K/V at the addresses it was recorded with (a new cache per batch means a
        re-recording per batch), and no memory is reallocated per batch. sleep() and close() drop it. Slots past
        the prompt keep an earlier batch's values; the causal mask never lets a query see them."""
        layers = [layer for layer in prefill.layers if getattr(layer, "is_initialized", False)]
        self._slot_cache(layers, len(rows), length)
        t = layers[0].keys.shape[2]
        for src, dst in zip(layers, self._cache.layers, strict=True):
            dst.keys[:, :, :t].copy_(src.keys.index_select(0, rows))
            dst.values[:, :, :t].copy_(src.values.index_select(0, rows))
            dst.cumulative_length.fill_(t)  # where the first decode step writes
        return self._cache

    def _slot_cache(self, layers, b: int, length: int) -> StaticCache:
        """The kept decode cache if it has b rows of `length` slots, else a new one shaped like the prefill cache's
        `layers` (the old one freed first). Its contents are whatever the last batch left."""
        if self._cache_shape != (b, length):
            self._note_decode_shape((b, length))
            self._cache = self._cache_shape = None  # free the old cache before allocating the new one
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            cache.early_initialization(batch_size=b, num_heads=[layer.keys.shape[1] for layer in layers],
                                       head_dim=[layer.keys.shape[-1] for layer in layers],
                                       dtype=layers[0].keys.dtype, device=self.device)
            self._cache, self._cache_shape = cache, (b, length)
        return self._cache

    def _note_decode_shape(self, shape: tuple[int, int]) -> None:
        """Each (rows, cache length) is one compiled variant of the decode step; past dynamo's recompile limit the
        step silently runs uncompiled, so say so once."""
        self._decode_shapes.add(shape)
        limit = torch._dynamo.config.recompile_limit
        if self.compile_decode and len(self._decode_shapes) == limit + 1:
            warn_once(f"rollout: the compiled decode step has now met {limit + 1} (rows, cache length) shapes, more "
                      f"than torch._dynamo.config.recompile_limit ({limit}); new shapes run uncompiled. Fewer shapes: "
                      "a fixed max_new_tokens and prompt batches of max_batch_size rows; or raise the limit.")

    # ------------------------------------------------------------------------------------------------- weights

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full tensors into the inference model by HF state-dict name, casting dtype and device.

        Names look like "model.language_model.layers.0.self_attn.q_proj.weight" or "lm_head.weight". Raises
        ValueError naming every unknown name (after loading the known ones) or the first shape mismatch.
        """
        unknown, num_loaded = [], 0
        for name, tensor in named_tensors:
            param = self._params.get(name)
            if param is None:
                unknown.append(name)
                continue
            if param.shape != tensor.shape:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the inference model "
                                 f"expects {tuple(param.shape)}")
            param.copy_(tensor)  # copy_ casts to the parameter's dtype and device
            num_loaded += 1
        if unknown:
            example = next(iter(self._params))
            raise ValueError(f"update_weights: {len(unknown)} unknown parameter name(s) {unknown[:8]} (loaded "
                             f"{num_loaded}); expected HF state-dict names such as {example!r}")

    def sleep(self) -> None:
        """Drop the decode K/V cache, move the weights to host memory and free the CUDA cache (weights stay on
        CPU)."""
        self._cache = self._cache_shape = None
        if self.device.type == "cuda":
            self.model.to("cpu")
            self._refresh_params()
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Move the weights back to the device (no-op on CPU)."""
        if self.device.type == "cuda":
            self.model.to(self.device)
            self._refresh_params()

    def close(self) -> None:
        """Drop the model (and the compiled decode step, which holds it); later calls fail with AttributeError."""
        for name in ("model", "_params", "_decode", "_cache"):
            self.__dict__.pop(name, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _rotary_to_fp32(model: torch.nn.Module) -> None:
    """`model.to(bf16)` also casts the rotary inverse frequencies; positions in the thousands need them in fp32."""
    for module in model.modules():
        for name in ("inv_freq", "original_inv_freq"):
            buf = getattr(module, name, None)
            if isinstance(buf, torch.Tensor) and buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(module, name, buf.float())


def _add_step_time(timing: RolloutTiming, t_step: float, idle: int) -> float:
    """Add the step since `t_step` to the decode time, or to the tail when `idle` rows of the batch had ended."""
    now = time.perf_counter()
    if idle:
        timing.tail_s += now - t_step
    else:
        timing.decode_s += now - t_step
    return now


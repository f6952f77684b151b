"""Continuous batching for the builtin backend: a fixed set of decode slots, each refilled as soon as its row ends.

A `generate` call's rows (prompt i, sample j) queue up prompt by prompt. S = min(max_batch_size, rows) slots each
hold one row; every decode step advances all busy slots by one token, and a slot whose row stopped (eos or
max_new_tokens) takes the next queued row before the next step, instead of feeding padding until the longest row
of a static batch ends (`BuiltinBackend._generate_batch`, the static twin; tests compare the two).

Cache layout: one preallocated `StaticCache` of S rows x L columns, L = P + R: a prompt region of P = the call's
longest prompt, where a row's prompt K/V sits right-aligned, and a ring of R >= max_new_tokens columns that the
decode steps write round-robin. Step g writes column P + g mod R in every slot (transformers' StaticCache writes
one column for the whole batch, at its layers' `cumulative_length`, which each forward advances by one); a row
lives at most max_new_tokens - 1 steps, so it never overwrites its own tokens. The K/V are stored after RoPE, so
where a key sits does not matter to attention, only the mask: each slot's boolean row of an [S, 1, 1, L] mask
marks its prompt columns and the ring columns it wrote; transformers passes a 4-D mask to sdpa as it is (no
causal mask on top, which would hide ring columns past the current one). Shapes and addresses stay fixed through
a call, and across calls of the same (S, L), as a CUDA-graph decode step needs.

Prefill: a prompt's n samples share one prefill (the vision tower and the prompt forward run once per prompt);
the prompts a refill needs are prefilled together (left-padded) with some of the next ones (up to
`BuiltinBackend.PREFILL_TOKENS` padded tokens and about one slot-set of rows), and a prefilled prompt keeps its
K/V, last logits and next position until all its samples have slots.

Sampling: row r = i x n + j draws from its own RNG stream (engine/rollout/sampler.py), so the samples do not depend
on the slot or on the other rows: under a seed this schedule gives the static schedule's completions.

Letters in shapes: S slots, L cache length, H KV heads, K prompt length, D head dim, U prefilled prompts, V vocab.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from transformers import StaticCache

from engine.data import Sample
from engine.rollout.base import RolloutTiming, SamplingParams
from engine.rollout.sampler import row_keys, sample

__all__ = ["generate_continuous"]


@dataclasses.dataclass
class _Prefilled:
    """A prompt's prefill, kept until all its samples have slots."""

    keys: list[torch.Tensor]
    """Per layer [H, K, D] (K = the prompt's own length, no padding); values likewise."""
    values: list[torch.Tensor]
    logits: torch.Tensor
    """The last prompt token's logits [V]."""
    next_pos: torch.Tensor
    """Position of the first generated token (0-d)."""
    remaining: int


def generate_continuous(backend, prompts: list[Sample], order: list[int], n: int, sampling: SamplingParams):
    """Decode rows (i, j) for i in `order`, j < n, through continuously refilled slots (see the module docstring).

    Returns (results, timing): results[(i, j)] = (token_ids, logprobs, text, finish_reason).
    """
    dev, max_new = backend.device, sampling.max_new_tokens
    queue = [(i, j) for i in order for j in range(n)]
    num_slots = min(backend.max_batch_size, len(queue))
    prompt_len = max(len(prompts[i].input_ids) for i in order)
    length = prompt_len + max_new
    if backend.compile_decode:
        length = -(-length // backend.CACHE_BUCKET) * backend.CACHE_BUCKET
    ring = length - prompt_len

    mask_S11L = torch.zeros(num_slots, 1, 1, length, dtype=torch.bool, device=dev)
    keys_S = torch.zeros(num_slots, dtype=torch.long, device=dev)  # RNG key of each slot's row
    drawn_S = torch.zeros(num_slots, dtype=torch.long, device=dev)  # tokens drawn so far by each slot's row
    next_pos_S = torch.zeros(num_slots, dtype=torch.long, device=dev)
    last_tok_S = torch.full((num_slots,), backend.processor.pad_id, dtype=torch.long, device=dev)
    tokens_SN = torch.zeros(num_slots, max_new, dtype=torch.long, device=dev)
    logprobs_SN = torch.zeros(num_slots, max_new, device=dev)
    logits_SV = None
    cache_pos_1 = torch.zeros(1, dtype=torch.long, device=dev)
    all_slots = torch.arange(num_slots, device=dev)
    eos = torch.tensor(backend.eos_ids, device=dev)
    slot_row: list[tuple[int, int] | None] = [None] * num_slots
    pending: dict[int, _Prefilled] = {}
    results, cache, head, step = {}, None, 0, 0
    next_prompt = 0  # order[next_prompt:] are not prefilled yet (rows are queued prompt by prompt)
    prefill_s = decode_s = tail_s = 0.0
    busy_slot_steps = 0
    t_start = time.perf_counter()
    while True:
        free = [s for s in range(num_slots) if slot_row[s] is None]
        if free and head < len(queue):
            t0 = time.perf_counter()
            new = queue[head:head + len(free)]
            head += len(new)
            num_needed = len({i for i, _ in new if i not in pending})
            if num_needed:
                need = _prefill_batch(backend, prompts, order[next_prompt:], num_needed, -(-num_slots // n))
                next_prompt += len(need)
                cache = _prefill(backend, prompts, need, n, pending, cache, num_slots, length)
            logits_SV = _place(backend, new, free[:len(new)], pending, cache, prompt_len, n, sampling.seed,
                               (mask_S11L, keys_S, drawn_S, next_pos_S), logits_SV)
            for s, row in zip(free, new, strict=False):
                slot_row[s] = row
            _sync(dev)  # timing only: the prefill's kernels end here, not inside the first decode step
            prefill_s += time.perf_counter() - t0
        busy = [s for s in range(num_slots) if slot_row[s] is not None]
        if not busy:
            break
        t0 = time.perf_counter()
        full = len(busy) == num_slots  # the common case: no gather of the busy slots' rows
        idx = all_slots if full else torch.tensor(busy, device=dev)
        tok, lp = sample(logits_SV if full else logits_SV.index_select(0, idx), sampling, backend.banned_ids,
                         keys_S if full else keys_S[idx], drawn_S if full else drawn_S[idx])
        at = drawn_S[idx]
        tokens_SN[idx, at], logprobs_SN[idx, at] = tok, lp
        last_tok_S[idx] = tok
        drawn_S[idx] += 1
        done = (torch.isin(tok, eos) | (drawn_S[idx] >= max_new)).tolist()  # host sync once a step: refill slots
        ended = [s for s, d in zip(busy, done, strict=True) if d]
        if ended:
            _collect(backend, results, ended, slot_row, tokens_SN, logprobs_SN, drawn_S)
        running = len(busy) - len(ended)
        if running:
            # Every slot writes ring column `col` (idle ones too: their rows are never read again); a busy slot's
            # query sees its prompt, the ring columns it wrote earlier and this one.
            col = prompt_len + step % ring
            if col == prompt_len:  # the ring's first column: StaticCache writes at its layers' cumulative_length,
                for layer in cache.layers:  # which each forward advances by one; start (again) at the ring's start
                    layer.cumulative_length.fill_(col)
            mask_S11L[:, 0, 0, col] = True
            cache_pos_1.fill_(col)
            pos_S = next_pos_S + drawn_S - 1  # the token fed now is the row's (drawn - 1)-th
            logits_SV = backend._decode(last_tok_S[:, None], mask_S11L, cache_pos_1, backend._step_positions(pos_S),
                                        cache)
            step += 1
            busy_slot_steps += running
        dt = time.perf_counter() - t0
        if running < num_slots and head >= len(queue):  # a slot idles: nothing left to start in it
            tail_s += dt
        else:
            decode_s += dt
    timing = RolloutTiming(total_s=time.perf_counter() - t_start, prefill_s=prefill_s, decode_s=decode_s,
                           tail_s=tail_s, num_decode_steps=step,
                           slot_use=busy_slot_steps / max(1, step * num_slots))
    return results, timing


def _prefill_batch(backend, prompts, upcoming: list[int], num_needed: int, most: int) -> list[int]:
    """The next prompts to prefill together: the `num_needed` that rows are waiting for, then more of the upcoming
    ones while the left-padded batch stays within `backend.PREFILL_TOKENS` and `most` prompts (about one slot-set
    of rows): fewer, larger prefill forwards, and their K/V kept only until their rows start."""
    take, longest = num_needed, max(len(prompts[i].input_ids) for i in upcoming[:num_needed])
    while take < min(most, len(upcoming)):
        longest_next = max(longest, len(prompts[upcoming[take]].input_ids))
        if longest_next * (take + 1) > backend.PREFILL_TOKENS:
            break
        take, longest = take + 1, longest_next
    return upcoming[:take]


def _prefill(backend, prompts, need: list[int], n: int, pending: dict, cache, num_slots: int, length: int):
    """One left-padded prefill forward of prompts `need`; each goes to `pending` with its n samples to place.
    Allocates (or reuses) the decode cache on first use and returns it."""
    inputs, prompt_lens_U = backend._prefill_inputs([prompts[i] for i in need])
    t = inputs["input_ids"].shape[1]
    pos, next_pos_U = backend._prefill_positions(inputs, prompt_lens_U)
    prefill = StaticCache(config=backend.model.config, max_cache_len=t)
    logits_UV = backend.model(**inputs, position_ids=pos, past_key_values=prefill, use_cache=True,
                              logits_to_keep=1).logits[:, -1]
    layers = [layer for layer in prefill.layers if getattr(layer, "is_initialized", False)]
    for u, i in enumerate(need):
        k = len(prompts[i].input_ids)  # left padding: the prompt's K/V are the last k columns
        pending[i] = _Prefilled([layer.keys[u, :, t - k:].clone() for layer in layers],
                                [layer.values[u, :, t - k:].clone() for layer in layers],
                                logits_UV[u], next_pos_U[u], n)
    return cache if cache is not None else backend._slot_cache(layers, num_slots, length)


def _place(backend, new, slots, pending, cache, prompt_len: int, n: int, seed: int, state, logits):
    """Start rows `new` in `slots`: prompt K/V right-aligned in the prompt region, mask, positions, RNG keys, and
    the prefill's last logits (the first token is drawn from them). Returns the logits [S, V]."""
    mask_S11L, keys_S, drawn_S, next_pos_S = state
    logits_SV = logits
    if logits_SV is None:
        any_logits = pending[new[0][0]].logits
        logits_SV = any_logits.new_zeros(len(keys_S), any_logits.shape[-1])
    by_prompt: dict[int, list[int]] = {}
    for (i, _), s in zip(new, slots, strict=True):
        by_prompt.setdefault(i, []).append(s)
    for i, ss in by_prompt.items():
        p, idx = pending[i], torch.tensor(ss, device=backend.device)
        k = p.keys[0].shape[1]
        for layer, keys, values in zip(cache.layers, p.keys, p.values, strict=True):
            layer.keys[idx, :, prompt_len - k:prompt_len] = keys
            layer.values[idx, :, prompt_len - k:prompt_len] = values
        mask_S11L[idx] = False
        mask_S11L[idx, :, :, prompt_len - k:prompt_len] = True
        logits_SV[idx] = p.logits.to(logits_SV.dtype)
        next_pos_S[idx] = p.next_pos
        p.remaining -= len(ss)
        if p.remaining == 0:
            del pending[i]
    rows = torch.tensor([i * n + j for i, j in new], device=backend.device)
    idx = torch.tensor(slots, device=backend.device)
    keys_S[idx], drawn_S[idx] = row_keys(seed, rows), 0
    return logits_SV


def _collect(backend, results, ended, slot_row, tokens, logprobs, drawn) -> None:
    """Move the finished slots' completions (tokens, logprobs [S, N], drawn [S]) to `results`; free the slots."""
    idx = torch.tensor(ended, device=tokens.device)
    rows = zip(tokens[idx].tolist(), logprobs[idx].tolist(), drawn[idx].tolist(), strict=True)
    for s, (ids, lps, k) in zip(ended, rows, strict=True):
        ids, lps = ids[:k], lps[:k]
        stopped = bool(ids) and ids[-1] in backend.eos_ids
        results[slot_row[s]] = (ids, lps, backend.tokenizer.decode(ids, skip_special_tokens=True),
                                "stop" if stopped else "length")
        slot_row[s] = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

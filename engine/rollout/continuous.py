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
    slots = _Slots(backend, prompts, order, n, sampling)
    prefill_s = decode_s = tail_s = 0.0
    t_start = time.perf_counter()
    while True:
        if slots.free() and slots.head < len(slots.queue):
            t0 = time.perf_counter()
            slots.refill()
            _sync(backend.device)  # timing only: the prefill's kernels end here, not inside the first decode step
            prefill_s += time.perf_counter() - t0
        if not slots.busy():
            break
        t0 = time.perf_counter()
        running = slots.draw()  # host sync once a step: which rows ended
        if running:
            slots.forward()
        backend.progress.update(detail=f"{running} of {slots.num} slots decoding, step {slots.step:,}")
        dt = time.perf_counter() - t0
        if running < slots.num and slots.head >= len(slots.queue):  # a slot idles: nothing left to start in it
            tail_s += dt
        else:
            decode_s += dt
    timing = RolloutTiming(total_s=time.perf_counter() - t_start, prefill_s=prefill_s, decode_s=decode_s,
                           tail_s=tail_s, num_decode_steps=slots.step,
                           slot_use=slots.busy_slot_steps / max(1, slots.step * slots.num))
    return slots.results, timing


class _Slots:
    """The decode slots of one `generate_continuous` call: queue, per-slot state, cache and finished results."""

    def __init__(self, backend, prompts: list[Sample], order: list[int], n: int, sampling: SamplingParams):
        dev, max_new = backend.device, sampling.max_new_tokens
        self.backend, self.prompts, self.order, self.n, self.sampling = backend, prompts, order, n, sampling
        self.queue = [(i, j) for i in order for j in range(n)]
        self.num = num = min(backend.max_batch_size, len(self.queue))
        self.prompt_len = max(len(prompts[i].input_ids) for i in order)
        self.length = self.prompt_len + max_new
        if backend.compile_decode:
            self.length = -(-self.length // backend.CACHE_BUCKET) * backend.CACHE_BUCKET
        self.ring = self.length - self.prompt_len
        self.mask_S11L = torch.zeros(num, 1, 1, self.length, dtype=torch.bool, device=dev)
        self.keys_S = torch.zeros(num, dtype=torch.long, device=dev)  # RNG key of each slot's row
        self.drawn_S = torch.zeros(num, dtype=torch.long, device=dev)  # tokens drawn so far by each slot's row
        self.next_pos_S = torch.zeros(num, dtype=torch.long, device=dev)
        self.last_tok_S = torch.full((num,), backend.processor.pad_id, dtype=torch.long, device=dev)
        self.tokens_SN = torch.zeros(num, max_new, dtype=torch.long, device=dev)
        self.logprobs_SN = torch.zeros(num, max_new, device=dev)
        self.logits_SV: torch.Tensor | None = None
        self.cache_pos_1 = torch.zeros(1, dtype=torch.long, device=dev)
        self.all_slots = torch.arange(num, device=dev)
        self.eos = torch.tensor(backend.eos_ids, device=dev)
        self.row: list[tuple[int, int] | None] = [None] * num  # the row each slot decodes
        self.pending: dict[int, _Prefilled] = {}
        self.results: dict[tuple[int, int], tuple] = {}
        self.cache = None
        self.head = 0  # queue[head:] wait for a slot
        self.next_prompt = 0  # order[next_prompt:] are not prefilled yet (rows are queued prompt by prompt)
        self.step = self.busy_slot_steps = 0

    def free(self) -> list[int]:
        return [s for s in range(self.num) if self.row[s] is None]

    def busy(self) -> list[int]:
        return [s for s in range(self.num) if self.row[s] is not None]

    def refill(self) -> None:
        """Start the next queued rows in the free slots, prefilling the prompts they need first."""
        free = self.free()
        new = self.queue[self.head:self.head + len(free)]
        self.head += len(new)
        num_needed = len({i for i, _ in new if i not in self.pending})
        if num_needed:
            need = _prefill_batch(self.backend, self.prompts, self.order[self.next_prompt:], num_needed,
                                  -(-self.num // self.n))
            self.next_prompt += len(need)
            layers = _prefill(self.backend, self.prompts, need, self.n, self.pending)
            if self.cache is None:
                self.cache = self.backend._slot_cache(layers, self.num, self.length)
        self._place(new, free[:len(new)])
        for s, row in zip(free, new, strict=False):
            self.row[s] = row

    def draw(self) -> int:
        """Draw each busy slot's next token; finished rows go to `results` and free their slots. Returns how many
        slots still run."""
        busy = self.busy()
        full = len(busy) == self.num  # the common case: no gather of the busy slots' rows
        idx = self.all_slots if full else torch.tensor(busy, device=self.backend.device)
        pick = (lambda x: x) if full else (lambda x: x.index_select(0, idx))  # noqa: E731
        tok, lp = sample(pick(self.logits_SV), self.sampling, self.backend.banned_ids, pick(self.keys_S),
                         pick(self.drawn_S))
        at = self.drawn_S[idx]
        self.tokens_SN[idx, at], self.logprobs_SN[idx, at] = tok, lp
        self.last_tok_S[idx] = tok
        self.drawn_S[idx] += 1
        done = (torch.isin(tok, self.eos) | (self.drawn_S[idx] >= self.sampling.max_new_tokens)).tolist()
        ended = [s for s, d in zip(busy, done, strict=True) if d]
        if ended:
            self._collect(ended)
        return len(busy) - len(ended)

    def forward(self) -> None:
        """One decode step of every slot (idle ones too: their rows are never read again); a busy slot's query sees
        its prompt, the ring columns it wrote earlier and this step's column."""
        col = self.prompt_len + self.step % self.ring
        if col == self.prompt_len:  # the ring's first column: StaticCache writes at its layers' cumulative_length,
            for layer in self.cache.layers:  # which each forward advances by one; start (again) at the ring's start
                layer.cumulative_length.fill_(col)
        self.mask_S11L[:, 0, 0, col] = True
        self.cache_pos_1.fill_(col)
        pos_S = self.next_pos_S + self.drawn_S - 1  # the token fed now is the row's (drawn - 1)-th
        self.logits_SV = self.backend._decode(self.last_tok_S[:, None], self.mask_S11L, self.cache_pos_1,
                                              self.backend._step_positions(pos_S), self.cache)
        self.step += 1
        self.busy_slot_steps += len(self.busy())

    def _place(self, new: list[tuple[int, int]], slots: list[int]) -> None:
        """Start rows `new` in `slots`: prompt K/V right-aligned in the prompt region, mask, positions, RNG keys,
        and the prefill's last logits (the first token is drawn from them)."""
        dev, p_len = self.backend.device, self.prompt_len
        if self.logits_SV is None:
            any_logits = self.pending[new[0][0]].logits
            self.logits_SV = any_logits.new_zeros(self.num, any_logits.shape[-1])
        by_prompt: dict[int, list[int]] = {}
        for (i, _), s in zip(new, slots, strict=True):
            by_prompt.setdefault(i, []).append(s)
        for i, ss in by_prompt.items():
            p, idx = self.pending[i], torch.tensor(ss, device=dev)
            k = p.keys[0].shape[1]
            for layer, keys, values in zip(self.cache.layers, p.keys, p.values, strict=True):
                layer.keys[idx, :, p_len - k:p_len] = keys
                layer.values[idx, :, p_len - k:p_len] = values
            self.mask_S11L[idx] = False
            self.mask_S11L[idx, :, :, p_len - k:p_len] = True
            self.logits_SV[idx] = p.logits.to(self.logits_SV.dtype)
            self.next_pos_S[idx] = p.next_pos
            p.remaining -= len(ss)
            if p.remaining == 0:
                del self.pending[i]
        idx = torch.tensor(slots, device=dev)
        self.keys_S[idx] = row_keys(self.sampling.seed, torch.tensor([i * self.n + j for i, j in new], device=dev))
        self.drawn_S[idx] = 0

    def _collect(self, ended: list[int]) -> None:
        """Move the finished slots' completions to `results` and free the slots."""
        idx = torch.tensor(ended, device=self.backend.device)
        rows = zip(self.tokens_SN[idx].tolist(), self.logprobs_SN[idx].tolist(), self.drawn_S[idx].tolist(),
                   strict=True)
        num_tokens = 0
        for s, (ids, lps, k) in zip(ended, rows, strict=True):
            ids, lps = ids[:k], lps[:k]
            num_tokens += len(ids)
            stopped = bool(ids) and ids[-1] in self.backend.eos_ids
            self.results[self.row[s]] = (ids, lps, self.backend.tokenizer.decode(ids, skip_special_tokens=True),
                                         "stop" if stopped else "length")
            self.row[s] = None
        self.backend.progress.update(len(ended), tokens=num_tokens)


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


def _prefill(backend, prompts, need: list[int], n: int, pending: dict) -> list:
    """One left-padded prefill forward of prompts `need`; each goes to `pending` with its n samples to place.
    Returns the prefill cache's layers (their shapes size the decode cache)."""
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
    return layers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""The rollout interface: sampling settings, one completion, and the protocol every generation backend follows.

A backend turns prompt `Sample`s (engine/data.py, prompt-only) into completions with per-token log-probs. The
GRPO stage calls `generate`, scores the completions, trains, then streams the new weights into the backend with
`update_weights`; `sleep` / `wake` let the backend give its accelerator memory back while the trainer runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from engine.data import Sample

__all__ = ["Completion", "RolloutBackend", "RolloutTiming", "SamplingParams", "WeightStream"]


@dataclass(kw_only=True)
class SamplingParams:
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p (1.0 = off)."""
    max_new_tokens: int = 256
    """Most tokens generated per completion (the stop token included)."""
    seed: int = 0
    """Seed of the sampling RNG: the same seed, prompts and weights give the same completions."""

    def check(self) -> list[str]:
        errors = []
        if self.temperature < 0:
            errors.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            errors.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        return errors


@dataclass
class Completion:
    """One generated continuation of prompt `prompt_index`.

    `token_ids` exclude the prompt and include the stop token (<|im_end|> / eos) when generation stopped on it.
    `logprobs[i]` is log softmax(logits / temperature)[token_ids[i]] over the full vocabulary, before top_p
    (temperature 0: the plain log_softmax): what the trainer recomputes for the same token. `text` is the decode
    with skip_special_tokens=True (no stop strings: rows stop on the stop tokens or the length limit only).
    """

    prompt_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


@dataclass
class WeightStream:
    """A full state dict by HF name, produced one tensor at a time (e.g. gathered from FSDP2 shards as it is
    consumed), with every name and shape known before the first tensor: a backend that must not load a partial or
    mismatched state dict checks `shapes` first, then consumes the stream without holding more than one tensor."""

    shapes: dict[str, tuple[int, ...]]
    """Name -> shape of every tensor the stream yields, in any order."""
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    """Yields (name, full tensor) once for each name in `shapes`."""

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.tensors())


@dataclass(kw_only=True)
class RolloutTiming:
    """Where the seconds of one `generate` call went (wall time; a backend that cannot split leaves parts None)."""

    total_s: float
    """The whole call."""
    prefill_s: float | None = None
    """Prompt forwards (vision tower and prefill) and copying their K/V into the decode cache."""
    decode_s: float | None = None
    """One-token decode steps (and sampling) with every decode slot busy."""
    tail_s: float | None = None
    """Decode steps with at least one slot idle (its row done, no prompt left to start in it, or a static batch
    still running its longest rows): time spent waiting on the longest rows."""
    num_decode_steps: int = 0
    """Decode forwards run."""
    slot_use: float | None = None
    """Busy share of the decode slot-steps (1.0: no slot ever idled)."""

    def metrics(self) -> dict[str, float]:
        """The set parts under metrics.jsonl keys: time/rollout_{generate,prefill,decode,tail}_s, rollout/slot_use."""
        parts = {"time/rollout_generate_s": self.total_s, "time/rollout_prefill_s": self.prefill_s,
                 "time/rollout_decode_s": self.decode_s, "time/rollout_tail_s": self.tail_s,
                 "rollout/slot_use": self.slot_use}
        return {k: float(v) for k, v in parts.items() if v is not None}


class RolloutBackend(Protocol):
    timing: RolloutTiming | None
    """How the last `generate` call spent its time (None before the first call)."""

    def generate(self, prompts: list[Sample], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        """n completions for each prompt, as result[prompt][sample]."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | WeightStream) -> None:
        """Load full (unsharded) tensors by HF state-dict name into the backend's model (a `WeightStream`: one at
        a time)."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory until `wake` (weights kept on the host)."""
        ...

    def wake(self) -> None:
        """Undo `sleep`."""
        ...

    def close(self) -> None:
        """Free the model and its accelerator memory now (a stage that is done sampling calls it, so the next
        backend or the trainer gets the memory without waiting for garbage collection); unusable afterwards."""
        ...

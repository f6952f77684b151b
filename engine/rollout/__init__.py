"""Rollout backends: generate completions with log-probs for RL (see base.py for the interface)."""

from pathlib import Path

import torch

from engine.rollout.base import Completion, RolloutBackend, SamplingParams
from engine.rollout.builtin import BuiltinBackend

__all__ = ["BuiltinBackend", "Completion", "RolloutBackend", "SamplingParams", "make_backend"]


def make_backend(kind: str, model_dir: str | Path, *, device: torch.device, dtype: torch.dtype, processor,
                 gpu_memory_utilization: float = 0.4, max_model_len: int = 4096, enforce_eager: bool = False,
                 seed: int = 0, max_batch_rows: int = 64, compile_decode: bool = False) -> RolloutBackend:
    """The rollout backend `kind` ("builtin" or "vllm") for `model_dir`; vLLM is imported only when asked for."""
    if kind == "vllm":
        from engine.rollout.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, device=device, dtype=dtype, processor=processor,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                           enforce_eager=enforce_eager, seed=seed)
    if kind != "builtin":
        raise ValueError(f"unknown rollout backend {kind!r}; use 'builtin' or 'vllm'")
    return BuiltinBackend(model_dir, device=device, dtype=dtype, processor=processor, max_batch_size=max_batch_rows,
                          compile_decode=compile_decode)

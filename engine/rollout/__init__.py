"""Rollout backends: generate completions with log-probs for RL (see base.py for the interface)."""

import importlib.util
from pathlib import Path

import torch

from engine.log import warn_once
from engine.rollout.base import Completion, RolloutBackend, RolloutTiming, SamplingParams, WeightStream
from engine.rollout.builtin import BuiltinBackend

__all__ = ["BuiltinBackend", "Completion", "RolloutBackend", "RolloutTiming", "SamplingParams", "WeightStream",
           "backend_label", "make_backend"]


def backend_label(kind: str) -> str:
    """How a run's log names the backend `kind` will actually be: "vllm (not installed: builtin)" for the fallback."""
    if kind == "vllm" and importlib.util.find_spec("vllm") is None:
        return "vllm (not installed: builtin)"
    return kind


def make_backend(kind: str, model_dir: str | Path, *, device: torch.device, dtype: torch.dtype, processor,
                 gpu_memory_utilization: float = 0.4, max_model_len: int = 4096, enforce_eager: bool = False,
                 seed: int = 0, max_batch_rows: int = 64, compile_decode: bool = False, batching: str = "continuous",
                 require: bool = False, tensor_parallel_size: int = 1) -> RolloutBackend:
    """The rollout backend `kind` ("builtin" or "vllm") for `model_dir`; vLLM is imported only when asked for.

    "vllm" without vLLM installed falls back to the builtin backend, saying so once, unless `require` is set or
    `tensor_parallel_size` > 1 (the builtin backend holds the whole model on each rank): then RuntimeError.
    """
    if kind not in ("builtin", "vllm"):
        raise ValueError(f"unknown rollout backend {kind!r}; use 'builtin' or 'vllm'")
    if kind == "vllm" and importlib.util.find_spec("vllm") is None:
        if require or tensor_parallel_size > 1:
            why = "rollout.require = true" if require else f"rollout.tensor_parallel_size = {tensor_parallel_size}"
            raise RuntimeError(f"rollout backend 'vllm' ({why}) needs vLLM, which is not installed: "
                               "pip install -e '.[vllm]' (GPU), or `make test-vllm` for the CPU test bed")
        warn_once("rollout: backend 'vllm' asked for but vLLM is not installed (pip install -e '.[vllm]'); using the "
                  "builtin backend instead (set rollout.require = true to stop instead)")
        kind = "builtin"
    if kind == "vllm":
        from engine.rollout.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, device=device, dtype=dtype, processor=processor,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                           enforce_eager=enforce_eager, seed=seed, tensor_parallel_size=tensor_parallel_size)
    return BuiltinBackend(model_dir, device=device, dtype=dtype, processor=processor, max_batch_size=max_batch_rows,
                          compile_decode=compile_decode, batching=batching)

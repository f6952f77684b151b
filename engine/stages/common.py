"""Pieces every training stage uses: building the sharded policy and the step-to-samples data order."""

import math
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.data import epoch_order, load_rows
from engine.dist import DistInfo, together
from engine.fsdp import parallelize, resolve_dtype
from engine.log import log0
from engine.model import Policy, build_meta_model, count_params, flops_per_token, load_weights


def build_policy(model_dir: Path, cfg: ModelConfig, dist_info: DistInfo) -> tuple[Policy, torch.nn.Module]:
    """Load `model_dir`, wrap it as a `Policy`, freeze/checkpoint/shard it; returns (policy, inner HF model)."""
    # Built on the meta device and sharded before any weight exists; each rank then reads only its own rows.
    hf_model = build_meta_model(model_dir, attn_implementation=cfg.attn_implementation)
    fpt = flops_per_token(hf_model)
    dtype, why = resolve_dtype(cfg.dtype, dist_info.device)
    policy = Policy(hf_model, chunk_tokens=cfg.logprob_chunk_tokens)
    parallelize(policy, hf_model, dist_info, param_dtype=dtype, activation_checkpointing=cfg.activation_checkpointing,
                freeze_vision=cfg.freeze_vision)
    load_weights(hf_model, model_dir, dist_info.device)
    total, trainable = count_params(policy)
    log0(f"model: {model_dir} | {type(hf_model).__name__} | {total:,} params ({trainable:,} trainable) | "
         f"{fpt / 1e6:.2f} MFLOPs/token | compute dtype {dtype} ({why}) | attention {cfg.attn_implementation} | "
         f"log-probs: kernels.fused_logprobs ({_logprob_backend(dist_info.device, cfg.logprob_chunk_tokens)})")
    return policy, hf_model


def _logprob_backend(device: torch.device, chunk_tokens: int) -> str:
    if device.type == "cuda":
        return "Triton: fused lm_head + log-softmax, no [tokens, vocab] logits"
    return f"chunked torch reference on CPU, {chunk_tokens} tokens/chunk"


class StepOrder:
    """Which samples optimizer step `s` uses: a stream of seeded epoch permutations, cut into batches.

    Step s covers stream positions [s * batch_size, (s + 1) * batch_size); the order depends only on the seed
    and the step, so resuming at step s needs no saved data-loader state. Rank r takes every world_size-th
    sample of the step, so the union over ranks is exactly what one process would use.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            self._perms = {epoch: epoch_order(self.num_samples, self.seed, epoch)}  # keep one epoch
        return self._perms[epoch]

    def step_indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [self._perm(p // self.num_samples)[p % self.num_samples] for p in range(start, start + self.batch_size)]

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.num_samples / self.batch_size))


def check_batch_size(batch_size: int, world_size: int, where: str) -> None:
    if batch_size % world_size:
        raise ValueError(f"{where}.batch_size = {batch_size} is not divisible by the world size {world_size}; "
                         f"use a multiple of {world_size}")


def read_rows(path: Path, columns: dict):
    """`load_rows` on every rank (a collective): a rank that cannot read the file (a node without it) stops every
    rank with its message, before the encoding's own collectives."""
    return together(lambda: load_rows(str(path), columns=columns))


def together_if_local(fn, backend):
    """`fn()` through `engine.dist.together` (one rank's error raised on every rank) when `backend`, a rollout
    backend or its kind before it is built, samples without collectives of its own: the builtin one. vLLM under a
    process group builds its engines with collectives and a tensor-parallel engine pools its ranks' prompts in one;
    a rank that failed there would wait in our collective while the others wait in vLLM's, so it is left to fail
    alone (torchrun then stops the others)."""
    from engine.rollout.builtin import BuiltinBackend

    local = backend == "builtin" if isinstance(backend, str) else isinstance(backend, BuiltinBackend)
    return together(fn) if local else fn()

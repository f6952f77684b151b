"""Standalone, reusable ops for RL and preference training; importable without `engine`."""

from kernels.dpo_loss import dpo_loss
from kernels.fused_logprobs import fused_logprobs, fused_logprobs_ref, logprobs_bwd, logprobs_fwd
from kernels.grpo_loss import grpo_loss

__all__ = ["fused_logprobs", "fused_logprobs_ref", "logprobs_bwd", "logprobs_fwd"]
__all__ += ["dpo_loss", "grpo_loss"]

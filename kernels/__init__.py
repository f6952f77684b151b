"""Standalone, reusable ops for RL and preference training; importable without `engine`."""

from kernels.dpo_loss import dpo_loss
from kernels.fused_logprobs import fused_logprobs, fused_logprobs_ref, logprobs_bwd, logprobs_fwd
from kernels.grpo_loss import grpo_loss
from kernels.nll_loss import fused_nll, fused_nll_ref
from kernels.packing import PackedBatch, mrope_positions, pack, plan_bins, repack, unpack

__all__ = ["fused_logprobs", "fused_logprobs_ref", "logprobs_bwd", "logprobs_fwd", "dpo_loss", "grpo_loss", "fused_nll",
           "fused_nll_ref", "PackedBatch", "mrope_positions", "pack", "plan_bins", "repack", "unpack"]

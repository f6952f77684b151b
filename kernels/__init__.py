"""Standalone, reusable ops for RL and preference training; importable without `engine`."""

from kernels.fused_logprobs import fused_logprobs, fused_logprobs_ref

__all__ = ["fused_logprobs", "fused_logprobs_ref"]

"""Rollout backends: generate completions with log-probs for RL (see base.py for the interface)."""

from engine.rollout.base import Completion, RolloutBackend, SamplingParams
from engine.rollout.builtin import BuiltinBackend

__all__ = ["BuiltinBackend", "Completion", "RolloutBackend", "SamplingParams"]

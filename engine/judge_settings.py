"""The reward judge's settings (`[stages.judge]`): engine.judge's JudgeConfig plus the backend choice.

A leaf next to engine/judge.py so that the recipe loader (engine/stages/config.py) can import it without the
judge's runtime (engine/reward_judge.py imports torch through engine.dist).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from engine.env import VARS
from engine.judge import JudgeConfig


@dataclasses.dataclass(kw_only=True, slots=True)
class JudgeSettings(JudgeConfig):
    """`JudgeConfig` (engine/judge.py: concurrency, retries, budget, cache, timeouts) plus the backend choice."""

    backend: Literal["gemini", "openai"] = "gemini"
    """gemini: Gemini's REST API (engine/judge.py; `model` a Gemini name, key in GOOGLE_API_KEY or GEMINI_API_KEY);
    openai: an OpenAI-compatible chat endpoint at `base_url` (engine/judge_openai.py); base_url = "local" starts a
    rule-based stand-in for GPT-4o on 127.0.0.1 in the judging process (engine/judge_local.py; no key, no network)."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai backend: environment variable holding the API key (declared in engine/env.py); "" sends no key."""
    open_answers: bool = True
    """Grade open-ended answers for the accuracy reward (grpo, distill); false: rules only."""

    def check(self) -> list[str]:
        errs = JudgeConfig.check(self)  # zero-argument super() does not work in a slots dataclass
        if self.backend == "openai" and not self.base_url:
            errs.append("judge.backend = 'openai' needs judge.base_url (e.g. http://127.0.0.1:8000/v1 for a local "
                        "vLLM server, https://api.openai.com/v1 for GPT-4o)")
        if self.base_url == "local" and self.backend != "openai":
            errs.append("judge.base_url = 'local' (the rule-based stand-in, engine/judge_local.py) needs "
                        "judge.backend = 'openai'")
        if self.api_key_env and self.api_key_env not in VARS:
            errs.append(f"judge.api_key_env = {self.api_key_env!r} is not declared in engine/env.py; use one of "
                        f"{sorted(k for k in VARS if k.endswith('API_KEY'))}, or '' for a server without a key")
        return errs

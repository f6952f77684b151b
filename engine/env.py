"""Every environment variable the engine reads, declared once: name, default, one-line description.

Read them through `env(NAME)` so a typo fails loudly instead of silently returning the default.
"""

import os

VARS: dict[str, tuple[str, str]] = {
    "ENGINE_LOG_LEVEL": ("INFO", "Log level of the `engine` logger (DEBUG, INFO, WARNING)."),
    "ENGINE_LOG_ALL_RANKS": ("0", "1: every rank logs, prefixed with its rank; 0: only rank 0 logs progress."),
    "HF_HUB_OFFLINE": ("0", "1: transformers/datasets never touch the network (tests set it; a lookup can hang)."),
    "TRITON_INTERPRET": ("0", "1: run Triton kernels on CPU tensors through the interpreter (tests only)."),
    "VLLM_ENABLE_V1_MULTIPROCESSING": ("0", "Set to 0 by the vllm rollout backend (in-process engine, so that "
                                       "update_weights can pass tensors without pickling)."),
    # Set by torchrun; absent means a single process.
    "RANK": ("0", "Global rank (torchrun)."),
    "LOCAL_RANK": ("0", "Rank on this node (torchrun)."),
    "WORLD_SIZE": ("1", "Number of processes (torchrun)."),
    # Secrets: read only by engine/judge.py, never logged or written anywhere.
    "GEMINI_API_KEY": ("", "API key for the optional Gemini judge (engine/judge.py) if GOOGLE_API_KEY is unset."),
    "GOOGLE_API_KEY": ("", "API key for the optional Gemini judge; takes precedence over GEMINI_API_KEY."),
    # Read only by engine/tracking.py to choose W&B's online/offline mode; wandb itself reads it to log in.
    "WANDB_API_KEY": ("", "Weights & Biases API key (run.trackers = [\"wandb\"], run.wandb_mode = \"auto\")."),
}


def env(name: str) -> str:
    """The value of a declared environment variable, or its default."""
    if name not in VARS:
        raise KeyError(f"environment variable {name!r} is not declared in engine/env.py")
    return os.environ.get(name, VARS[name][0])


def env_flag(name: str) -> bool:
    return env(name).strip().lower() in ("1", "true", "yes", "on")

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
    # Proxies for the judge's HTTPS requests (engine/http_json.py), as curl reads them.
    "HTTPS_PROXY": ("", "Proxy (host:port or http://host:port) for HTTPS requests; https_proxy works too."),
    "https_proxy": ("", "Same as HTTPS_PROXY (checked when HTTPS_PROXY is unset)."),
    "NO_PROXY": ("", "Comma-separated hosts (and their subdomains) reached without the proxy; * for all."),
    "no_proxy": ("", "Same as NO_PROXY (checked when NO_PROXY is unset)."),
    # Secrets: read only by the judges (engine/judge.py, engine/reward_judge.py), never logged or written anywhere.
    "GEMINI_API_KEY": ("", "API key for the optional Gemini judge (engine/judge.py) if GOOGLE_API_KEY is unset."),
    "GOOGLE_API_KEY": ("", "API key for the optional Gemini judge; takes precedence over GEMINI_API_KEY."),
    "OPENAI_API_KEY": ("", "API key for an OpenAI-compatible judge endpoint (judge.backend = 'openai', the default "
                       "judge.api_key_env; engine/judge_openai.py)."),
    "JUDGE_API_KEY": ("", "API key for an OpenAI-compatible judge, when judge.api_key_env = 'JUDGE_API_KEY' (e.g. a "
                      "local vLLM/SGLang server started with --api-key)."),
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

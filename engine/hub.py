"""Model locations: a local Hugging Face directory or a Hugging Face model id (`Qwen/Qwen2.5-VL-7B-Instruct`).

An id resolves through the local Hugging Face cache (`HF_HOME`, default ~/.cache/huggingface); when it is not
there it is downloaded if the hub is reachable, and otherwise the error names the download command. A directory
is checked up front for what loading needs (config, weights, tokenizer), so an empty or half-copied directory is
named as such before any work instead of failing later inside the tokenizer.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.env import env_flag

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a model directory must hold: (what, any of these names or patterns).
_NEEDS = (("config", ("config.json",)),
          ("weights", ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")),
          ("tokenizer", ("tokenizer.json", "tokenizer.model", "vocab.json")))
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py"]


def is_hub_id(text: str) -> bool:
    """`org/name` that is not an existing local path."""
    return bool(_HUB_ID.fullmatch(text)) and not Path(text).exists()


def download_hint(repo_id: str, key: str) -> str:
    return (f"get it with `hf download {repo_id}` where the hub is reachable (huggingface_hub's CLI; it fills the "
            f"cache this machine reads), or point {key} at a local directory")


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot directory of `repo_id`, or None when it is not in the local cache. No network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None


def model_dir_problems(path: Path, key: str) -> list[str]:
    """What `path` lacks to load as a model: one problem naming the missing parts and the files found."""
    missing = [(what, patterns) for what, patterns in _NEEDS if not any(any(path.glob(p)) for p in patterns)]
    if not missing:
        return []
    found = sorted(p.name for p in path.iterdir())[:8]
    expected = "; ".join(f"{what}: {' or '.join(patterns)}" for what, patterns in missing)
    return [f"{key}: {str(path)!r} has no {', no '.join(what for what, _ in missing)} (expected {expected}); found: "
            f"{', '.join(found) or 'nothing, an empty directory'}. Point it at a Hugging Face model directory"]


def model_path_problems(text: str, key: str) -> list[str]:
    """Config-time check of a model location: an existing model directory, or a hub id that is cached or can be
    downloaded (the hub is not offline). No network."""
    path = Path(text)
    if path.is_dir():
        return model_dir_problems(path, key)
    if not is_hub_id(text):
        return [f"{key}: {text!r} is neither a directory nor a Hugging Face model id (org/name)"]
    snapshot = cached_snapshot(text)
    if snapshot is not None:
        return model_dir_problems(snapshot, key)
    if env_flag("HF_HUB_OFFLINE"):
        return [f"{key}: {text!r} is not a directory (cwd: {Path.cwd()}); as a Hugging Face model id it is not in "
                f"the local cache, and the hub is offline (HF_HUB_OFFLINE=1): {download_hint(text, key)}"]
    return []


def resolve_model_path(text: str, key: str = "model.path") -> Path:
    """The local directory of `text`: the directory itself, or the cached (else downloaded) snapshot of a hub id.
    Raises ValueError naming the download command when an id is neither cached nor downloadable."""
    if Path(text).is_dir() or not is_hub_id(text):
        return Path(text)
    snapshot = cached_snapshot(text)
    if snapshot is not None:
        return snapshot
    if env_flag("HF_HUB_OFFLINE"):
        raise ValueError(model_path_problems(text, key)[0])
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=_DOWNLOAD_PATTERNS))
    except Exception as e:  # network, authentication, a missing repo: all end in the same advice
        raise ValueError(f"{key}: {text!r} is not a directory (cwd: {Path.cwd()}); downloading it as a Hugging Face "
                         f"model id failed ({type(e).__name__}: {e}): {download_hint(text, key)}") from None

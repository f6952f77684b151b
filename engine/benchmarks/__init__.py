"""Evaluation benchmarks: one module per benchmark, each loading the official release files from a local
directory and scoring a model's whole response text by the benchmark's official rules.

Every module exposes:
    NAME: str                                   short name used in recipes and reports
    JUDGE_NOTE: str                             "" when the official scoring is rule-based end to end; else one
                                                sentence on what the official pipeline asks an LLM to do, which
                                                our rule-only score approximates (the report prints it)
    load(path) -> list[BenchRow]                rows from a directory in the release's layout (see its docstring)
    is_correct(row, response) -> bool           the response text, scored as the official script does

The answer is first narrowed to the last `<answer>...</answer>` block when there is one (the SPECS output format),
else the whole response is used: `answer_text` does it, so every benchmark treats formatted and free-form
responses alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

NAMES = ("mathvista", "mathverse", "mathvision", "mmmu", "megabench")
"""Benchmark modules in engine/benchmarks/ (the toy world's splits are scored by engine/stages/eval.py)."""


@dataclasses.dataclass(slots=True)
class BenchRow:
    """One evaluation item, independent of the benchmark."""

    id: str
    """Unique within the benchmark (the official id, so predictions join the official files)."""
    problem: str
    """The user prompt text shown to the model, built as the benchmark's official prompt (options included).
    `<image>` marks where image i goes when the benchmark interleaves images; with no marker, all images go
    before the text. It does not include the SPECS format instruction (the eval template adds it)."""
    images: list[Path]
    """Image files, in order."""
    answer: str
    """Gold answer as the release gives it (an option letter, a number, a string)."""
    category: str = ""
    """Group for per-category scores (MathVista task, MathVerse version, MATH-V subject, MMMU subject, ...)."""
    choices: list[str] | None = None
    """Option texts for multiple-choice items, in order (letter A is choices[0])."""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Everything else the scorer needs (answer type, precision, question type, ...), JSON-serialisable."""


_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def answer_text(response: str) -> str:
    """The content of the last <answer>...</answer> block, stripped; the whole response when there is none."""
    blocks = _ANSWER_BLOCK.findall(response or "")
    return blocks[-1].strip() if blocks else (response or "").strip()


def cache_dir(kind: str, root: Path) -> Path:
    """$XDG_CACHE_HOME (or ~/.cache)/specs-engine/<kind>/<key>: one folder per release path `root`."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "specs-engine" / kind / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]


def media_dir(root: Path, folder: str, kind: str) -> Path:
    """Where a loader writes files it derives from the release at `root` (extracted images, video frames):
    `<root>/<folder>`, or `cache_dir(kind, root)` when that is read-only (a shared dataset mount)."""
    out = root / folder
    return out if os.access(out if out.is_dir() else root, os.W_OK) else cache_dir(kind, root)


def get(name: str) -> ModuleType:
    """The benchmark module `name` (one of NAMES, or "toy" for the toy world's splits); a clear error otherwise."""
    if name not in (*NAMES, "toy"):
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(NAMES)}, toy")
    return importlib.import_module(f"engine.benchmarks.{name}")


__all__ = ["NAMES", "BenchRow", "answer_text", "cache_dir", "get", "media_dir"]

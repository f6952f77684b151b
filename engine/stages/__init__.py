"""Stages: each kind is a config class in engine/stages/config.py and a module with `run(cfg, ctx)`.

`run_stage` finds the module through the registry (`STAGE_KINDS`) and imports it only then, so a toy run never
imports the RL stack; `ctx` says where a stage's inputs and outputs live.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from engine.stages.config import STAGE_KINDS, StageConfig

if TYPE_CHECKING:  # annotations only: importing engine.config here would make a cycle (it reads STAGE_KINDS)
    from engine.config import ModelConfig, RunConfig
    from engine.dist import DistInfo

DONE_MARKER = "DONE"


@dataclasses.dataclass
class StageContext:
    run: RunConfig
    model: ModelConfig
    dist: DistInfo
    out_dir: Path
    stage_dir: Path

    def model_dir(self, ref: str) -> Path:
        """The Hugging Face directory of "model" (the base model) or of an earlier stage's output."""
        return Path(self.model.path) if ref == "model" else self.out_dir / ref / "hf"

    def resolve_path(self, ref: str) -> Path:
        """A plain path, or `<stage>:relative/path` inside an earlier stage's output directory."""
        stage, sep, rel = ref.partition(":")
        return self.out_dir / stage / rel if sep else Path(ref)


def run_stage(cfg: StageConfig, ctx: StageContext) -> None:
    """Run one stage with its kind's module (imported here, on first use)."""
    if cfg.kind not in STAGE_KINDS:
        raise ValueError(f"no runner for stage kind {cfg.kind!r} (known: {', '.join(STAGE_KINDS)})")
    importlib.import_module(STAGE_KINDS[cfg.kind].runner).run(cfg, ctx)

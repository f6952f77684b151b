"""Stages: each kind is a module with `run(cfg, ctx)`; `ctx` says where inputs and outputs live."""

import dataclasses
from pathlib import Path

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


def run_stage(cfg, ctx: StageContext) -> None:
    """Dispatch to the stage kind's module (imported lazily: a toy run never imports the RL stack)."""
    if cfg.kind == "toy":
        from engine.stages import toy as module
    elif cfg.kind == "sft":
        from engine.stages import sft as module
    elif cfg.kind == "dpo":
        from engine.stages import dpo as module
    elif cfg.kind == "grpo":
        from engine.stages import grpo as module
    elif cfg.kind == "distill":
        from engine.stages import distill as module
    elif cfg.kind == "eval":
        from engine.stages import eval as module
    else:
        raise ValueError(f"no runner for stage kind {cfg.kind!r}")
    module.run(cfg, ctx)

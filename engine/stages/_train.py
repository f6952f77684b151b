"""The skeleton every training stage runs, written once: data -> order -> policy -> Trainer -> resume -> fit -> export.

A training stage (sft, dpo, grpo) is a small dataclass that holds its settings and state and supplies what differs:
    load(processor, ctx) -> int     the data: encode it, return how many items (samples, pairs, prompts) there are
    describe(total_steps) -> str    one log line of the stage's settings
    fit(run)                        the optimizer steps: `run.trainer.fit(micro_batches, loss)` for SFT and DPO,
                                    a rollout loop over `run.trainer.run_step` for GRPO
and two class attributes: `steps_per_batch` (optimizer steps per batch of `train.batch_size` items) and
`batch_split` (the batch is split over ranks x this many parts, so it must divide by that).
"""

import dataclasses
import functools
from pathlib import Path
from typing import Protocol

from engine.checkpoint import export_hf
from engine.data import Processor
from engine.dist import together
from engine.fsdp import vision_tower
from engine.log import log0
from engine.model import Policy, flops_per_token
from engine.plan import planned_peak_gib
from engine.stages import StageContext
from engine.stages.common import StepOrder, build_policy, check_batch_size
from engine.trainer import Trainer


@dataclasses.dataclass
class Run:
    """What the skeleton built for a stage's `fit`."""

    ctx: StageContext
    processor: Processor
    order: StepOrder
    policy: Policy
    trainer: Trainer
    resumed: bool
    """A checkpoint of this stage was loaded (the trainer's step says which)."""
    init_dir: Path
    merge_size: int | None
    """Vision patch merge size for packing, None for a text-only model."""


class TrainingStage(Protocol):
    steps_per_batch: int
    batch_split: int

    def load(self, processor: Processor, ctx: StageContext) -> int: ...
    def describe(self, total_steps: int) -> str: ...
    def fit(self, run: Run) -> None: ...


def run_training(cfg, ctx: StageContext, stage: TrainingStage) -> None:
    """Train `stage` from `cfg.init` and export the result to `<stage dir>/hf`."""
    dist_info = ctx.dist
    init_dir = ctx.model_dir(cfg.init)
    # Work each rank does alone is wrapped in `together`: one rank's error (a file it cannot read) stops every rank
    # with the same message instead of leaving the others in the next collective.
    processor = together(lambda: Processor.from_pretrained(init_dir, min_pixels=cfg.data.min_pixels,
                                                           max_pixels=cfg.data.max_pixels))
    num_items = stage.load(processor, ctx)
    check_batch_size(cfg.train.batch_size, dist_info.world_size * stage.batch_split, f"stages.{cfg.name}.train")
    order = StepOrder(num_items, cfg.train.batch_size, ctx.run.seed)
    total_steps = cfg.train.steps or stage.steps_per_batch * order.steps_for_epochs(cfg.train.epochs)
    log0(stage.describe(total_steps))

    policy, hf_model = build_policy(init_dir, ctx.model, dist_info)
    # on CUDA the plan's peak goes beside the measured one in metrics.jsonl (mem/plan_peak_gib)
    plan_peak_gib = planned_peak_gib(cfg, ctx.model, hf_model.config, dist_info.world_size,
                                     dist_info.device) if dist_info.device.type == "cuda" else None
    trainer = together(functools.partial(Trainer, policy, optim=cfg.optim, train=cfg.train, checkpoint=cfg.checkpoint,
                                         stage_dir=ctx.stage_dir, dist_info=dist_info, total_steps=total_steps,
                                         log_every=ctx.run.log_every, flops_per_token=flops_per_token(hf_model),
                                         plan_peak_gib=plan_peak_gib))
    trainer.stop_every = stage.steps_per_batch  # a preemption checkpoint falls between batches, as every other
    resumed = trainer.resume()
    merge_size = processor.merge_size if vision_tower(hf_model) is not None else None
    stage.fit(Run(ctx, processor, order, policy, trainer, resumed, init_dir, merge_size))
    trainer.finish()
    export_hf(policy, hf_model, init_dir, ctx.stage_dir / "hf", dist_info)

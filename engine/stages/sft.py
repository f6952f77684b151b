"""Supervised fine-tuning: next-token loss on response tokens only, averaged over the step's response tokens.

Used twice in SPECS work: to pretrain the toy base model (tiny.toml) and as the SFT cold-start ablation.
"""

import dataclasses
from typing import ClassVar

import torch

from engine.data import Processor, Sample, collate, encode_rows, plan_micro_batches
from engine.packed_rows import num_targets, pack_samples, to_device
from engine.stages import StageContext
from engine.stages._train import Run, run_training
from engine.stages.common import read_rows
from engine.stages.config import SFTStageConfig
from kernels import fused_nll, plan_bins


@dataclasses.dataclass
class SFTStage:
    """The encoded samples and the current step's loss normaliser."""

    cfg: SFTStageConfig
    samples: list[Sample] = dataclasses.field(default_factory=list)
    source: str = ""
    num_bad_rows: int = 0
    world_size: int = 1
    step_targets: int = 1
    """Response tokens of the current step over all ranks: the loss normaliser."""
    steps_per_batch: ClassVar[int] = 1
    batch_split: ClassVar[int] = 1

    def load(self, processor: Processor, ctx: StageContext) -> int:
        data = self.cfg.data
        path = ctx.resolve_path(data.train)
        self.samples, report = encode_rows(read_rows(path, data.columns), processor,
                                           template=data.template,
                                           system=data.system or None, response_column=data.response_column,
                                           on_bad_row=data.on_bad_row, max_tokens=data.max_tokens, source=str(path),
                                           max_pixel_bytes=data.max_pixel_bytes)
        if not self.samples:
            raise ValueError(f"{path}: no usable rows ({report.num_skipped} of {report.num_rows} skipped: "
                             f"{report.by_reason})")
        self.source, self.num_bad_rows, self.world_size = str(path), report.num_skipped, ctx.dist.world_size
        return len(self.samples)

    def describe(self, total_steps: int) -> str:
        train, world = self.cfg.train, self.world_size
        return (f"data: {self.source} | {len(self.samples)} samples ({self.num_bad_rows} bad rows skipped) | "
                f"batch {train.batch_size} samples = {world} ranks x {train.batch_size // world} | "
                f"micro-batches of <= {train.micro_batch_tokens} padded tokens per rank | "
                f"{total_steps} steps = {'train.steps' if train.steps else f'{train.epochs} epochs'}")

    def fit(self, run: Run) -> None:
        run.trainer.fit(lambda step: self.micro_batches(run, step), lambda mb: self.loss(run, mb))

    def micro_batches(self, run: Run, step: int) -> tuple[list[dict[str, torch.Tensor]], int]:
        """This rank's micro-batches of optimizer step `step` and the most any rank has; sets the normaliser.

        Every rank sees the whole step's indices, so it plans every rank's micro-batches: neither the normaliser
        nor the lockstep count needs communication.
        """
        indices, rank, world = run.order.step_indices(step), run.ctx.dist.rank, run.ctx.dist.world_size
        mbt = self.cfg.train.micro_batch_tokens
        self.step_targets = max(1, sum(num_targets(self.samples[i]) for i in indices))
        if self.cfg.train.packing:
            # Token-balanced bins over all ranks; each non-empty bin becomes one packed row.
            plan = [[b for b in bins if b] for bins in plan_bins([len(self.samples[i].input_ids) for i in indices],
                                                                  mbt, num_ranks=world)]
            rows = [pack_samples([self.samples[indices[j]] for j in b], merge_size=run.merge_size) for b in plan[rank]]
        else:
            plan = [plan_micro_batches([len(self.samples[i].input_ids) for i in indices[r::world]], mbt)
                    for r in range(world)]
            mine = indices[rank::world]
            rows = [collate([self.samples[mine[j]] for j in g], run.processor.pad_id) for g in plan[rank]]
        return [to_device(r, run.ctx.dist.device) for r in rows], max(len(p) for p in plan)

    def loss(self, run: Run, mb: dict[str, torch.Tensor]):
        """Summed response-token NLL / the step's response tokens; this micro-batch's share of the step's mean.

        kernels.fused_nll computes the gradient in the forward (each token's weight is known before its logits).
        """
        # FSDP2 averages gradients over ranks; scaling by world size makes the result the global token mean.
        scale = run.ctx.dist.world_size / self.step_targets

        def fused(hidden, weight, targets):
            return fused_nll(hidden, weight, targets, hidden.new_full(targets.shape, scale, dtype=torch.float32),
                             impl=self.cfg.loss_impl)

        loss = run.policy(mb, loss_fn=fused)
        nll = loss.detach() / run.ctx.dist.world_size
        num_tokens = mb["attention_mask"].sum() if "attention_mask" in mb else mb["input_ids"].numel()
        return loss, {"train/loss": nll, "train/num_tokens": torch.as_tensor(num_tokens),
                      "train/num_target_tokens": (mb["labels"][:, 1:] != -100).sum()}


def run(cfg: SFTStageConfig, ctx: StageContext) -> None:
    run_training(cfg, ctx, SFTStage(cfg))

"""Supervised fine-tuning: next-token loss on response tokens only, averaged over the step's response tokens.

Used twice in SPECS work: to pretrain the toy base model (tiny.toml) and as the SFT cold-start ablation.
"""

import torch

from engine.checkpoint import export_hf
from engine.data import Processor, collate, encode_rows, load_rows, plan_micro_batches
from engine.fsdp import vision_tower
from engine.log import log0
from engine.packed_rows import num_targets, pack_samples, to_device
from engine.stages import StageContext
from engine.stages.common import StepOrder, build_policy, check_batch_size
from engine.stages.config import SFTStageConfig
from engine.trainer import Trainer
from kernels import plan_bins


def run(cfg: SFTStageConfig, ctx: StageContext) -> None:
    dist_info = ctx.dist
    init_dir = ctx.model_dir(cfg.init)
    processor = Processor.from_pretrained(init_dir, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    data_path = ctx.resolve_path(cfg.data.train)
    samples, report = encode_rows(load_rows(str(data_path)), processor, template=cfg.data.template,
                                  system=cfg.data.system or None, response_column=cfg.data.response_column,
                                  on_bad_row=cfg.data.on_bad_row, max_tokens=cfg.data.max_tokens,
                                  source=str(data_path), max_pixel_bytes=cfg.data.max_pixel_bytes)
    if not samples:
        raise ValueError(f"{data_path}: no usable rows ({report.num_skipped} of {report.num_rows} skipped: "
                         f"{report.by_reason})")
    check_batch_size(cfg.train.batch_size, dist_info.world_size, f"stages.{cfg.name}.train")
    order = StepOrder(len(samples), cfg.train.batch_size, ctx.run.seed)
    total_steps = cfg.train.steps or order.steps_for_epochs(cfg.train.epochs)
    per_rank = cfg.train.batch_size // dist_info.world_size
    log0(f"data: {data_path} | {len(samples)} samples ({report.num_skipped} bad rows skipped) | "
         f"batch {cfg.train.batch_size} samples = {dist_info.world_size} ranks x {per_rank} | "
         f"micro-batches of <= {cfg.train.micro_batch_tokens} padded tokens per rank | "
         f"{total_steps} steps = {'train.steps' if cfg.train.steps else f'{cfg.train.epochs} epochs'}")

    policy, hf_model = build_policy(init_dir, ctx.model, dist_info)
    trainer = Trainer(policy, optim=cfg.optim, train=cfg.train, checkpoint=cfg.checkpoint, stage_dir=ctx.stage_dir,
                      dist_info=dist_info, total_steps=total_steps, log_every=ctx.run.log_every)
    trainer.resume()
    pad_id = processor.pad_id
    world, device = dist_info.world_size, dist_info.device
    step_targets = [1]  # response tokens of the whole step over all ranks: the loss normaliser

    merge_size = processor.merge_size if vision_tower(hf_model) is not None else None

    def micro_batches(step: int) -> list[dict[str, torch.Tensor]]:
        indices = order.step_indices(step)
        # Every rank sees the whole step's indices, so the normaliser needs no communication.
        step_targets[0] = max(1, sum(num_targets(samples[i]) for i in indices))
        if cfg.train.packing:
            # Token-balanced bins, the same number on every rank; each bin becomes one packed row.
            lengths = [len(samples[i].input_ids) for i in indices]
            bins = plan_bins(lengths, cfg.train.micro_batch_tokens, num_ranks=world)[dist_info.rank]
            rows = [pack_samples([samples[indices[j]] for j in b], merge_size=merge_size) for b in bins if b]
        else:
            mine = indices[dist_info.rank :: world]
            groups = plan_micro_batches([len(samples[i].input_ids) for i in mine], cfg.train.micro_batch_tokens)
            rows = [collate([samples[mine[j]] for j in g], pad_id) for g in groups]
        return [to_device(r, device) for r in rows]

    def loss_fn(mb: dict[str, torch.Tensor]):
        nll = -policy(mb).sum()
        # FSDP2 averages gradients over ranks; scaling by world size makes the result the global token mean.
        loss = nll * world / step_targets[0]
        num_tokens = mb["attention_mask"].sum() if "attention_mask" in mb else mb["input_ids"].numel()
        return loss, {"loss": nll / step_targets[0], "num_tokens": torch.as_tensor(num_tokens),
                      "num_target_tokens": (mb["labels"][:, 1:] != -100).sum()}

    trainer.fit(micro_batches, loss_fn)
    export_hf(policy, hf_model, init_dir, ctx.stage_dir / "hf", dist_info)

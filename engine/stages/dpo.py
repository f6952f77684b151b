"""DPO + SFT cold start (the SPECS hybrid loss): loss = DPO(chosen, rejected) + sft_weight x NLL(chosen).

Pairs are packed rows: a micro-batch holds whole pairs, chosen and rejected responses of the same prompt side by
side, and `kernels.dpo_loss` computes the loss from the hidden states at the response positions (no logits).
The reference model's sequence log-probs are computed once, before the first step, and stored in
`<stage>/ref_logps.pt`, so no second model is resident while training (when the reference is the starting
checkpoint, the default, the policy itself computes them before its first update).

Normalisation over a step (all micro-batches, all ranks): the DPO term is the mean over the step's pairs, the SFT
term the mean over the step's chosen response tokens (`token-mean`) or chosen sequences (`seq-mean`).
"""

import gc
from pathlib import Path

import torch

from engine.checkpoint import export_hf
from engine.data import Processor, Sample, encode_rows, load_rows
from engine.dist import all_reduce
from engine.fsdp import vision_tower
from engine.log import log0
from engine.packed_rows import num_targets, pack_samples, to_device
from engine.stages import StageContext
from engine.stages.common import StepOrder, build_policy, check_batch_size
from engine.stages.config import DPOStageConfig
from engine.trainer import Trainer
from kernels import dpo_loss, plan_bins

Pair = tuple[Sample, Sample]


def encode_pairs(cfg: DPOStageConfig, processor: Processor, path: Path) -> list[Pair]:
    """(chosen, rejected) samples of every row where both encode; a row bad on either side is dropped, counted."""
    rows = load_rows(str(path))
    common = dict(template=cfg.data.template, system=cfg.data.system or None, on_bad_row=cfg.data.on_bad_row,
                  max_tokens=cfg.data.max_tokens, source=str(path),
                  max_pixel_bytes=cfg.data.max_pixel_bytes // 2)  # chosen and rejected each keep their own
    chosen, _ = encode_rows(rows, processor, response_column=cfg.dpo.chosen_column, **common)
    rejected, _ = encode_rows(rows, processor, response_column=cfg.dpo.rejected_column, **common)
    by_id = {s.row_id: s for s in rejected}
    if len(by_id) != len(rejected):
        raise ValueError(f"{path}: row ids are not unique; give every row a distinct `id`")
    pairs = [(c, by_id[c.row_id]) for c in chosen if c.row_id in by_id]
    log0(f"data: {path} | {len(rows)} rows -> {len(pairs)} pairs ({len(rows) - len(pairs)} dropped as bad rows)")
    if not pairs:
        raise ValueError(f"{path}: no usable (chosen, rejected) pairs")
    return pairs


def pair_batch(pairs: list[Pair], indices: list[int], merge_size: int | None) -> dict:
    """One packed row: the chosen responses of `indices`, then their rejected twins (k-th pairs with k-th)."""
    samples = [pairs[i][0] for i in indices] + [pairs[i][1] for i in indices]
    batch = pack_samples(samples, merge_size=merge_size)
    batch["is_chosen"] = torch.tensor([True] * len(indices) + [False] * len(indices))
    batch["pair_index"] = torch.tensor(indices)
    batch["num_chosen_targets"] = int(batch["target_cu"][len(indices)])
    return batch


@torch.no_grad()
def reference_logps(policy, pairs: list[Pair], ctx: StageContext, micro_batch_tokens: int,
                    merge_size: int | None) -> torch.Tensor:
    """Sequence log-probs [P, 2] (chosen, rejected) under `policy`; each rank does its share, then one all-reduce."""
    dist_info = ctx.dist
    mine = list(range(dist_info.rank, len(pairs), dist_info.world_size))
    lengths = [len(pairs[i][0].input_ids) + len(pairs[i][1].input_ids) for i in mine]
    bins = [b for b in plan_bins(lengths, micro_batch_tokens)[0] if b] if mine else []
    # FSDP2: every rank runs the same number of forwards; a rank with fewer repeats a batch and discards it.
    num = int(all_reduce(torch.tensor([len(bins)], device=dist_info.device), "max").item())  # sync
    out = torch.zeros(len(pairs), 2, device=dist_info.device)
    for i in range(num):
        b = bins[i] if i < len(bins) else (bins[0] if bins else [0])
        indices = [mine[j] for j in b] if mine else [0]
        batch = to_device(pair_batch(pairs, indices, merge_size), dist_info.device)
        logp = policy(batch)
        if i >= len(bins) or not mine:
            continue
        counts = torch.diff(batch["target_cu"].long()).tolist()  # sync: a few ints
        sums = torch.stack([x.sum() for x in torch.split(logp, counts)])
        k = len(indices)
        out[batch["pair_index"], 0], out[batch["pair_index"], 1] = sums[:k], sums[k:]
    return all_reduce(out).cpu()


def run(cfg: DPOStageConfig, ctx: StageContext) -> None:
    dist_info, world = ctx.dist, ctx.dist.world_size
    init_dir = ctx.model_dir(cfg.init)
    ref_dir = ctx.model_dir(cfg.ref) if cfg.ref else init_dir
    processor = Processor.from_pretrained(init_dir, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    pairs = encode_pairs(cfg, processor, ctx.resolve_path(cfg.data.train))
    check_batch_size(cfg.train.batch_size, world, f"stages.{cfg.name}.train")
    order = StepOrder(len(pairs), cfg.train.batch_size, ctx.run.seed)
    total_steps = cfg.train.steps or order.steps_for_epochs(cfg.train.epochs)
    log0(f"dpo: {len(pairs)} pairs | batch {cfg.train.batch_size} pairs | {total_steps} steps | beta {cfg.dpo.beta} "
         f"| sft_weight {cfg.dpo.sft_weight} ({cfg.dpo.sft_norm}) | reference {ref_dir}")

    policy, hf_model = build_policy(init_dir, ctx.model, dist_info)
    merge_size = processor.merge_size if vision_tower(hf_model) is not None else None
    trainer = Trainer(policy, optim=cfg.optim, train=cfg.train, checkpoint=cfg.checkpoint, stage_dir=ctx.stage_dir,
                      dist_info=dist_info, total_steps=total_steps, log_every=ctx.run.log_every)
    resumed = trainer.resume()
    ref_file = ctx.stage_dir / "ref_logps.pt"
    if ref_file.is_file():
        ref_logps = torch.load(ref_file)
    else:
        if resumed:
            raise RuntimeError(f"{ref_file} is missing but the stage resumes from a checkpoint; delete "
                               f"{ctx.stage_dir / 'checkpoints'} to start the stage over")
        if ref_dir == init_dir:  # the untouched policy is the reference: no second model
            ref_logps = reference_logps(policy, pairs, ctx, cfg.train.micro_batch_tokens, merge_size)
        else:
            ref_policy, _ = build_policy(ref_dir, ctx.model, dist_info)
            ref_logps = reference_logps(ref_policy, pairs, ctx, cfg.train.micro_batch_tokens, merge_size)
            del ref_policy
            gc.collect()
        if dist_info.is_main:
            torch.save(ref_logps, ref_file)
    ref_logps = ref_logps.to(dist_info.device)
    step = {"pairs": 1, "chosen_targets": 1}

    def micro_batches(s: int) -> list[dict]:
        indices = order.step_indices(s)
        step["pairs"] = len(indices)
        step["chosen_targets"] = max(1, sum(num_targets(pairs[i][0]) for i in indices))
        lengths = [len(pairs[i][0].input_ids) + len(pairs[i][1].input_ids) for i in indices]
        bins = plan_bins(lengths, cfg.train.micro_batch_tokens, num_ranks=world)[dist_info.rank]
        return [to_device(pair_batch(pairs, [indices[j] for j in b], merge_size), dist_info.device) for b in bins if b]

    def loss_fn(mb: dict):
        k = len(mb["pair_index"])
        share = k / step["pairs"]  # this micro-batch's share of the step's pair mean
        # dpo_loss averages SFT over this micro-batch; rescale it to the step-wide normaliser.
        sft_scale = mb["num_chosen_targets"] / step["chosen_targets"] if cfg.dpo.sft_norm == "token-mean" else share
        sft_weight = cfg.dpo.sft_weight * sft_scale / share
        refs = ref_logps[mb["pair_index"]]

        def fused(hidden, weight, targets):
            mask = torch.ones_like(targets, dtype=torch.bool)
            return dpo_loss(hidden, weight, targets, mask, mb["target_cu"], mb["is_chosen"], refs[:, 0], refs[:, 1],
                            beta=cfg.dpo.beta, sft_weight=sft_weight, sft_norm=cfg.dpo.sft_norm,
                            label_smoothing=cfg.dpo.label_smoothing, impl=cfg.dpo.loss_impl)

        loss, m = policy(mb, loss_fn=fused)
        stats = {name: m[name] * share for name in ("dpo_loss", "reward_margin", "reward_accuracy",
                                                     "rewards_chosen", "rewards_rejected")}
        stats.update(loss=loss.detach() * share, sft_loss=m["sft_loss"] * sft_scale,
                     num_tokens=torch.tensor(float(mb["input_ids"].numel())))
        # FSDP2 averages gradients over ranks; the world-size factor makes the sum over ranks the step's loss.
        return loss * share * world, stats

    trainer.fit(micro_batches, loss_fn)
    export_hf(policy, hf_model, init_dir, ctx.stage_dir / "hf", dist_info)

"""GRPO: prompts -> n completions each (rollout backend) -> rule rewards -> group-normalised advantages ->
packed micro-batches -> kernels.grpo_loss (clip-higher) -> FSDP2 update -> the new weights into the backend.

One rollout batch gives one optimizer step (on-policy); the old log-probs are recomputed by the trainer with a
no-grad forward just before the loss, so the importance ratio starts at exactly 1. Each rank samples for its own
share of the step's prompts (seeded by step and rank, so a resumed run samples the same completions).
Not yet here (see the issues): several PPO mini-batches/epochs per rollout batch, the KL to a reference model,
truncated importance correction with the backend's log-probs, the vLLM backend.
"""

import time

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from engine.checkpoint import export_hf
from engine.config_stages import GRPOStageConfig
from engine.data import IGNORE_INDEX, Processor, Sample, encode_rows, load_rows
from engine.dist import all_reduce
from engine.fsdp import vision_tower
from engine.log import log0
from engine.packing import num_targets, pack_samples, to_device
from engine.rewards import RewardConfig, score
from engine.rollout import BuiltinBackend, SamplingParams
from engine.stages import StageContext
from engine.stages.common import StepOrder, build_policy, check_batch_size
from engine.trainer import Trainer
from kernels import grpo_loss, plan_bins


def group_advantages(rewards: torch.Tensor, scale_by_std: bool, eps: float = 1e-6) -> torch.Tensor:
    """[G, n] rewards -> [G, n] advantages: centred on the group mean, divided by the group std (GRPO) or not."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + eps) if scale_by_std else centred


def training_sample(prompt: Sample, completion_ids: list[int]) -> Sample:
    """Prompt + completion as one sample whose labels are the completion tokens."""
    ids = list(prompt.input_ids) + list(completion_ids)
    labels = [IGNORE_INDEX] * len(prompt.input_ids) + list(completion_ids)
    mm = list(prompt.mm_token_type_ids) + [0] * len(completion_ids)
    return Sample(ids, labels, mm, prompt.pixel_values, prompt.image_grid_thw, len(prompt.input_ids), prompt.row_id,
                  answer=prompt.answer, choices=prompt.choices)


def run(cfg: GRPOStageConfig, ctx: StageContext) -> None:
    dist_info, world, rank = ctx.dist, ctx.dist.world_size, ctx.dist.rank
    init_dir = ctx.model_dir(cfg.init)
    processor = Processor.from_pretrained(init_dir, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    path = ctx.resolve_path(cfg.data.train)
    prompts, report = encode_rows(load_rows(str(path)), processor, template=cfg.data.template,
                                  system=cfg.data.system or None, on_bad_row=cfg.data.on_bad_row,
                                  max_tokens=cfg.data.max_tokens, source=str(path))
    check_batch_size(cfg.train.batch_size, world, f"stages.{cfg.name}.train")
    order = StepOrder(len(prompts), cfg.train.batch_size, ctx.run.seed)
    total_steps = cfg.train.steps or order.steps_for_epochs(cfg.train.epochs)
    n = cfg.rollout.n
    log0(f"grpo: {len(prompts)} prompts ({report.num_skipped} bad rows skipped) | {cfg.train.batch_size} prompts x "
         f"{n} completions a step | {total_steps} steps | clip [{cfg.grpo.clip_low}, {cfg.grpo.clip_high}] | "
         f"agg {cfg.grpo.agg} | rollout {cfg.rollout.backend}, max {cfg.rollout.max_new_tokens} new tokens")

    policy, hf_model = build_policy(init_dir, ctx.model, dist_info)
    merge_size = processor.merge_size if vision_tower(hf_model) is not None else None
    trainer = Trainer(policy, optim=cfg.optim, train=cfg.train, checkpoint=cfg.checkpoint, stage_dir=ctx.stage_dir,
                      dist_info=dist_info, total_steps=total_steps, log_every=ctx.run.log_every)
    trainer.resume()
    backend = BuiltinBackend(init_dir, device=dist_info.device, processor=processor)
    reward_cfg = RewardConfig(format_weight=cfg.grpo.format_weight, accuracy_weight=cfg.grpo.accuracy_weight)
    step_state: dict = {}

    def sync_weights() -> None:
        # Every rank keeps a full inference copy: gather the full tensors (collective) and load them into it.
        sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
        backend.update_weights((k.removeprefix("hf."), v) for k, v in sd.items())

    def micro_batches(step: int) -> list[dict]:
        t0 = time.perf_counter()
        sync_weights()  # the previous step's update (or the resumed checkpoint) reaches the sampler
        mine = order.step_indices(step)[rank::world]
        sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  max_new_tokens=cfg.rollout.max_new_tokens,
                                  seed=ctx.run.seed * 1_000_003 + step * world + rank)
        groups = backend.generate([prompts[i] for i in mine], n, sampling)
        t1 = time.perf_counter()
        rewards = [[score(c.text, prompts[i].answer, prompts[i].choices, cfg=reward_cfg) for c in g]
                   for i, g in zip(mine, groups, strict=True)]
        totals = torch.tensor([[r.total for r in g] for g in rewards])
        adv = group_advantages(totals, cfg.grpo.scale_by_std)
        flat = (totals == totals[:, :1]).all(dim=1)  # every completion of the group got the same reward
        keep = [g for g in range(len(mine)) if not (cfg.grpo.filter_equal_groups and bool(flat[g]))]
        samples, advantages = [], []
        for g in keep or [0]:  # nothing left: train on one group at zero weight so every rank still steps
            for j, c in enumerate(groups[g]):
                samples.append(training_sample(prompts[mine[g]], c.token_ids))
                advantages.append(float(adv[g, j]) if keep else 0.0)
        lens = [len(c.token_ids) for g in groups for c in g]
        step_state.update(
            local_tokens=sum(num_targets(s) for s in samples), local_seqs=len(samples),
            stats={"reward": totals.sum(), "format_acc": torch.tensor(sum(r.format > 0 for g in rewards for r in g)),
                   "accuracy": torch.tensor(sum(r.accuracy > 0 for g in rewards for r in g)),
                   "response_len": torch.tensor(float(sum(lens))), "kept_groups": torch.tensor(float(len(keep))),
                   "rollout_s": torch.tensor(t1 - t0)})
        # Step-wide normalisers (all ranks): response tokens and sequences that are trained on.
        norm = torch.tensor([step_state["local_tokens"], step_state["local_seqs"], len(mine) * n], dtype=torch.float)
        step_state["tokens"], step_state["seqs"], step_state["completions"] = all_reduce(norm).tolist()  # sync
        bins = plan_bins([len(s.input_ids) for s in samples], cfg.train.micro_batch_tokens)[0]
        rows = []
        for b in bins:
            if not b:
                continue
            row = pack_samples([samples[j] for j in b], merge_size=merge_size)
            counts = torch.diff(row["target_cu"].long())
            row["advantages"] = torch.repeat_interleave(torch.tensor([advantages[j] for j in b]), counts)
            row["first"] = len(rows) == 0
            rows.append(to_device(row, dist_info.device))
        return rows

    def loss_fn(mb: dict):
        num_tokens, num_seqs = int(mb["target_cu"][-1]), len(mb["target_cu"]) - 1
        share = num_tokens / max(1.0, step_state["tokens"]) if cfg.grpo.agg == "token-mean" else \
            num_seqs / max(1.0, step_state["seqs"])
        with torch.no_grad():
            old = policy(mb, temperature=cfg.rollout.temperature)  # on-policy: the ratio starts at exactly 1

        def fused(hidden, weight, targets):
            mask = torch.ones_like(targets, dtype=torch.bool)
            return grpo_loss(hidden, weight, targets, mb["advantages"], old, mask, cu_seqlens=mb["target_cu"],
                             clip_low=cfg.grpo.clip_low, clip_high=cfg.grpo.clip_high, agg=cfg.grpo.agg,
                             temperature=cfg.rollout.temperature, return_entropy=True,
                             norm_len=cfg.rollout.max_new_tokens)

        loss, m = policy(mb, loss_fn=fused)
        stats = {"loss": loss.detach() * share, "clip_frac": m["clip_frac"] * share, "kl": m["approx_kl"] * share,
                 "entropy": m["entropy_mean"] * share, "num_tokens": torch.tensor(float(mb["input_ids"].numel()))}
        if mb["first"]:  # rollout-level stats once per rank, scaled so that the sum over ranks is the step's value
            c, r = max(1.0, step_state["completions"]), step_state["stats"]
            stats.update({k: r[k].float() / c for k in ("reward", "format_acc", "accuracy", "response_len")})
            stats.update(kept_groups=r["kept_groups"], rollout_s=r["rollout_s"] / world)
        return loss * share * world, stats

    trainer.fit(micro_batches, loss_fn)
    export_hf(policy, hf_model, init_dir, ctx.stage_dir / "hf", dist_info)

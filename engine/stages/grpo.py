"""GRPO: prompts -> n completions each (rollout backend) -> rule rewards -> group-normalised advantages ->
packed micro-batches -> kernels.grpo_loss (clip-higher, optional KL) -> FSDP2 update -> new weights to the backend.

A rollout batch (`train.batch_size` prompts x `rollout.n`) feeds `grpo.mini_batches` x `grpo.ppo_epochs`
optimizer steps (1 x 1 by default: on-policy). With several steps per rollout (or truncated importance sampling,
`grpo.tis_cap`), the trainer computes the old log-probs of every completion right after sampling with a no-grad
forward; with one on-policy step it skips that forward and the loss takes old = the current log-probs (importance
ratio exactly 1, as TRL does with num_iterations = 1). It computes the reference model's log-probs when
`grpo.kl_coef` > 0, and keeps the backend's own sampling log-probs for truncated importance sampling. Each rank
samples its own share of the prompts (seeded by rollout index and rank, so a resumed run samples the same
completions) and splits its prompt groups into mini-batches. Checkpoints fall between rollout batches, so a resume
never needs a half-used rollout.
"""

import random
import time

import torch
from torch.distributed.tensor import DTensor

from engine.checkpoint import export_hf
from engine.data import IGNORE_INDEX, Processor, Sample, encode_rows, load_rows
from engine.dist import all_reduce
from engine.fsdp import resolve_dtype, vision_tower
from engine.log import log0
from engine.packed_rows import num_targets, pack_samples, to_device
from engine.rewards import RewardConfig, score
from engine.rollout import SamplingParams, make_backend
from engine.stages import StageContext
from engine.stages.common import StepOrder, build_policy, check_batch_size
from engine.stages.config import GRPOStageConfig
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
                  answer=prompt.answer, choices=prompt.choices, pixel_loader=prompt.pixel_loader)


def run(cfg: GRPOStageConfig, ctx: StageContext) -> None:
    dist_info, world, rank = ctx.dist, ctx.dist.world_size, ctx.dist.rank
    g, r_cfg = cfg.grpo, cfg.rollout
    init_dir = ctx.model_dir(cfg.init)
    processor = Processor.from_pretrained(init_dir, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    path = ctx.resolve_path(cfg.data.train)
    prompts, report = encode_rows(load_rows(str(path)), processor, template=cfg.data.template,
                                  system=cfg.data.system or None, on_bad_row=cfg.data.on_bad_row,
                                  max_tokens=cfg.data.max_tokens, source=str(path),
                                  max_pixel_bytes=cfg.data.max_pixel_bytes)
    check_batch_size(cfg.train.batch_size, world * g.mini_batches, f"stages.{cfg.name}.train")
    order = StepOrder(len(prompts), cfg.train.batch_size, ctx.run.seed)
    k = g.steps_per_rollout
    on_policy = k == 1 and not g.tis_cap  # one update per rollout batch: no separate old-log-prob pass needed
    total_steps = cfg.train.steps or k * order.steps_for_epochs(cfg.train.epochs)
    n = r_cfg.n
    log0(f"grpo: {len(prompts)} prompts ({report.num_skipped} bad rows skipped) | {cfg.train.batch_size} prompts x "
         f"{n} completions a rollout, {g.mini_batches} mini-batches x {g.ppo_epochs} epochs | {total_steps} steps | "
         f"clip [{g.clip_low}, {g.clip_high}] | agg {g.agg} | kl {g.kl_coef} ({g.kl_estimator}) | tis cap "
         f"{g.tis_cap or 'off'} | rollout {r_cfg.backend}, max {r_cfg.max_new_tokens} new tokens | old log-probs "
         f"{'= current (on-policy, no extra forward)' if on_policy else 'from a no-grad forward after sampling'}")

    policy, hf_model = build_policy(init_dir, ctx.model, dist_info)
    ref_policy = None
    if g.kl_coef > 0:
        ref_policy, _ = build_policy(ctx.model_dir(cfg.ref or cfg.init), ctx.model, dist_info)
        ref_policy.requires_grad_(False)
    merge_size = processor.merge_size if vision_tower(hf_model) is not None else None
    trainer = Trainer(policy, optim=cfg.optim, train=cfg.train, checkpoint=cfg.checkpoint, stage_dir=ctx.stage_dir,
                      dist_info=dist_info, total_steps=total_steps, log_every=ctx.run.log_every)
    trainer.resume()
    # fp32 inference copy on CPU (exact tests); bf16 on GPU, like the trainer's compute dtype.
    sample_dtype = resolve_dtype(ctx.model.dtype, dist_info.device)[0]
    backend = make_backend(r_cfg.backend, init_dir, device=dist_info.device, processor=processor, dtype=sample_dtype,
                           gpu_memory_utilization=r_cfg.gpu_memory_utilization, enforce_eager=r_cfg.enforce_eager,
                           max_model_len=r_cfg.max_model_len or cfg.data.max_tokens, seed=ctx.run.seed,
                           max_batch_rows=r_cfg.max_batch_rows, compile_decode=r_cfg.compile_decode)
    reward_cfg = RewardConfig(format_weight=g.format_weight, accuracy_weight=g.accuracy_weight)
    batch: dict = {"index": -1}  # the current rollout batch
    step_state: dict = {}

    def sync_weights() -> None:
        # Every rank keeps a full inference copy. Stream the weights into it one tensor at a time: each shard is
        # cast to the sampler's dtype and all-gathered (a collective, in the same order on every rank), so the
        # peak is one full tensor rather than a whole fp32 state dict (28 GB for 7B) per rank.
        def full_tensors():
            for name, p in policy.named_parameters():
                t = p.detach().to(sample_dtype)
                yield name.removeprefix("hf."), t.full_tensor() if isinstance(t, DTensor) else t

        backend.update_weights(full_tensors())

    def new_rollout(index: int) -> None:
        t0 = time.perf_counter()
        backend.wake()  # the sampler's weights and KV cache come back to the accelerator (no-op on CPU)
        sync_weights()  # the previous update (or the resumed checkpoint) reaches the sampler
        mine = order.step_indices(index)[rank::world]
        sampling = SamplingParams(temperature=r_cfg.temperature, top_p=r_cfg.top_p, max_new_tokens=r_cfg.max_new_tokens,
                                  seed=ctx.run.seed * 1_000_003 + index * world + rank)
        groups = backend.generate([prompts[i] for i in mine], n, sampling)
        backend.sleep()  # give the accelerator memory back to the trainer until the next rollout
        t1 = time.perf_counter()
        rewards = [[score(c.text, prompts[i].answer, prompts[i].choices, cfg=reward_cfg) for c in grp]
                   for i, grp in zip(mine, groups, strict=True)]
        totals = torch.tensor([[r.total for r in grp] for grp in rewards])
        adv = group_advantages(totals, g.scale_by_std)
        flat = (totals == totals[:, :1]).all(dim=1)  # every completion of the group got the same reward
        keep = [j for j in range(len(mine)) if not (g.filter_equal_groups and bool(flat[j]))]
        samples, advantages, rollout_lp, group_of = [], [], [], []
        for j in keep or [0]:  # nothing left: one group at zero weight, so that every rank still steps
            for s, c in enumerate(groups[j]):
                samples.append(training_sample(prompts[mine[j]], c.token_ids))
                advantages.append(float(adv[j, s]) if keep else 0.0)
                rollout_lp.append(torch.tensor(c.logprobs, dtype=torch.float32))
                group_of.append(j)
        # On-policy without TIS the old policy is the current one: the loss takes old = logp (ratio exactly 1)
        # and this no-grad forward over every completion is skipped.
        old = None if on_policy else per_sample_logps(policy, samples, r_cfg.temperature)
        ref = per_sample_logps(ref_policy, samples, r_cfg.temperature) if ref_policy is not None else None
        lens = [len(c.token_ids) for grp in groups for c in grp]
        batch.update(index=index, samples=samples, advantages=advantages, old=old, ref=ref, rollout_lp=rollout_lp,
                     group_of=group_of, groups=sorted(set(group_of)), zero_weight=not keep, stats={
                         "reward": totals.sum(), "format_acc": torch.tensor(sum(r.format > 0 for grp in rewards
                                                                                 for r in grp)),
                         "accuracy": torch.tensor(sum(r.accuracy > 0 for grp in rewards for r in grp)),
                         "response_len": torch.tensor(float(sum(lens))), "kept_groups": torch.tensor(float(len(keep))),
                         "rollout_s": torch.tensor(time.perf_counter() - t0), "sample_s": torch.tensor(t1 - t0)},
                     completions=float(all_reduce(torch.tensor([len(mine) * n], dtype=torch.float)).item()))  # sync

    def per_sample_logps(model, samples: list[Sample], temperature: float) -> list[torch.Tensor]:
        """No-grad log-probs of each sample's response tokens; every rank runs the same number of forwards."""
        bins = [b for b in plan_bins([len(s.input_ids) for s in samples], cfg.train.micro_batch_tokens)[0] if b]
        num = int(all_reduce(torch.tensor([len(bins)], device=dist_info.device), "max").item())  # sync
        out: list[torch.Tensor | None] = [None] * len(samples)
        with torch.no_grad():
            for i in range(num):
                b = bins[min(i, len(bins) - 1)]  # a rank with fewer bins repeats its last one (FSDP lockstep)
                row = to_device(pack_samples([samples[j] for j in b], merge_size=merge_size), dist_info.device)
                logp = model(row, temperature=temperature).float().cpu()
                for j, part in zip(b, torch.split(logp, torch.diff(row["target_cu"].long()).tolist()), strict=True):
                    out[j] = part
        return out

    def micro_batches(step: int) -> list[dict]:
        index, within = divmod(step, k)
        if batch["index"] != index:
            new_rollout(index)
        epoch, mb = divmod(within, g.mini_batches)
        groups = list(batch["groups"])
        if g.mini_batches > 1:  # a fresh split of this rank's groups in every epoch
            random.Random(f"{ctx.run.seed}/{index}/{epoch}/{rank}").shuffle(groups)
        chosen = set(groups[mb::g.mini_batches])
        picked = [j for j, grp in enumerate(batch["group_of"]) if grp in chosen]
        zero = batch["zero_weight"] or not picked
        picked = picked or [0]  # this rank has no group in this mini-batch: one sample at zero weight
        samples = [batch["samples"][j] for j in picked]
        local_tokens = 0 if zero else sum(num_targets(s) for s in samples)
        norm = all_reduce(torch.tensor([local_tokens, 0 if zero else len(samples)], dtype=torch.float))  # sync
        step_state.update(tokens=float(norm[0]), seqs=float(norm[1]), first_in_rollout=within == 0)
        rows = []
        for b in plan_bins([len(s.input_ids) for s in samples], cfg.train.micro_batch_tokens)[0]:
            if not b:
                continue
            ids = [picked[j] for j in b]
            row = pack_samples([batch["samples"][j] for j in ids], merge_size=merge_size)
            counts = torch.diff(row["target_cu"].long())
            adv = torch.tensor([0.0 if zero else batch["advantages"][j] for j in ids])
            row["advantages"] = torch.repeat_interleave(adv, counts)
            if batch["old"] is not None:
                row["old"] = torch.cat([batch["old"][j] for j in ids])
            if batch["ref"] is not None:
                row["ref"] = torch.cat([batch["ref"][j] for j in ids])
            row["rollout_lp"] = torch.cat([batch["rollout_lp"][j] for j in ids])
            row["first"] = len(rows) == 0
            rows.append(to_device(row, dist_info.device))
        return rows

    def loss_fn(mb: dict):
        num_tokens, num_seqs = int(mb["target_cu"][-1]), len(mb["target_cu"]) - 1
        share = num_tokens / max(1.0, step_state["tokens"]) if g.agg == "token-mean" else \
            num_seqs / max(1.0, step_state["seqs"])
        adv, stats = mb["advantages"], {}
        if g.tis_cap:
            # exp(trainer - rollout) log-prob gap per token, truncated; a positive per-token weight scales both
            # clip branches alike, so it folds into the advantage.
            w = torch.exp(mb["old"] - mb["rollout_lp"]).clamp(max=g.tis_cap)
            adv = adv * w
            stats["tis_weight"] = w.mean() * share

        def fused(hidden, weight, targets):
            mask = torch.ones_like(targets, dtype=torch.bool)
            return grpo_loss(hidden, weight, targets, adv, mb.get("old"), mask, cu_seqlens=mb["target_cu"],
                             ref_logprobs=mb.get("ref"), kl_coef=g.kl_coef, kl_estimator=g.kl_estimator,
                             clip_low=g.clip_low, clip_high=g.clip_high, agg=g.agg, temperature=r_cfg.temperature,
                             return_entropy=True, norm_len=r_cfg.max_new_tokens, impl=g.loss_impl)

        loss, m = policy(mb, loss_fn=fused)
        stats.update({"loss": loss.detach() * share, "clip_frac": m["clip_frac"] * share,
                      "kl": m["approx_kl"] * share, "entropy": m["entropy_mean"] * share,
                      "num_tokens": torch.tensor(float(mb["input_ids"].numel()))})
        if "kl_mean" in m:
            stats["ref_kl"] = m["kl_mean"] * share
        if mb["first"] and step_state["first_in_rollout"]:
            # Rollout-level stats once per rank and rollout, scaled so that the sum over ranks is the batch's value.
            c, r = max(1.0, batch["completions"]), batch["stats"]
            stats.update({key: r[key].float() / c for key in ("reward", "format_acc", "accuracy", "response_len")})
            stats.update(kept_groups=r["kept_groups"], rollout_s=r["rollout_s"] / world)
        return loss * share * world, stats

    trainer.fit(micro_batches, loss_fn)
    backend.close()  # before the export and the next stage, which need the accelerator memory
    export_hf(policy, hf_model, init_dir, ctx.stage_dir / "hf", dist_info)

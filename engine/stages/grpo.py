"""GRPO: prompts -> n completions each (rollout backend) -> rewards (rules; an LLM judge for open-ended answers when
`judge.enabled`) -> group-normalised advantages ->
packed micro-batches -> kernels.grpo_loss (clip-higher, optional KL) -> FSDP2 update -> new weights to the backend.

The loop (`GRPOStage.fit`) reads as the algorithm:

    for each rollout batch:   batch = collect(...)            (engine/stages/experience.py)
        for each epoch, mini-batch:   train step on that mini-batch's groups
        (each step is logged; checkpoints fall between rollout batches, so a resume never needs a half-used one)

A rollout batch (`train.batch_size` prompts x `rollout.n`) feeds `grpo.mini_batches` x `grpo.ppo_epochs` optimizer
steps (1 x 1 by default: on-policy). With several steps per rollout (or truncated importance sampling,
`grpo.tis_cap`), `collect` computes the old log-probs of every completion right after sampling with a no-grad
forward; with one on-policy step it skips that forward and the loss takes old = the current log-probs (importance
ratio exactly 1, as TRL does with num_iterations = 1). It computes the reference model's log-probs when
`grpo.kl_coef` > 0, and keeps the backend's own sampling log-probs for truncated importance sampling.
"""

import dataclasses
import functools
import random
import time

import torch

from engine.data import Processor, Sample, encode_rows
from engine.dist import max_and_sum
from engine.fsdp import resolve_dtype
from engine.packed_rows import num_targets, pack_samples, to_device
from engine.reward_boxes import box_iou_threshold
from engine.reward_judge import RewardJudge, RowInfo, check_ready, row_infos
from engine.rewards import RewardConfig
from engine.rollout import backend_label, make_backend
from engine.stages import StageContext
from engine.stages._train import Run, run_training
from engine.stages.common import build_policy, read_rows, together_if_local
from engine.stages.config import GRPOStageConfig
from engine.stages.experience import Collector, RolloutBatch, collect
from kernels import grpo_loss, plan_bins


@dataclasses.dataclass
class MiniBatch:
    """This rank's packed rows of one optimizer step, and the step's loss normalisers over all ranks."""

    rows: list[dict]
    num_passes: int
    """The most rows any rank has (FSDP2 lockstep)."""
    num_tokens: float
    """Response tokens of the step (token-mean aggregation)."""
    num_seqs: float
    """Completions of the step (seq-mean aggregations)."""


@dataclasses.dataclass
class GRPOStage:
    """The prompts and the stage's settings; all per-rollout state lives in the `RolloutBatch`."""

    cfg: GRPOStageConfig
    prompts: list[Sample] = dataclasses.field(default_factory=list)
    infos: dict[str, RowInfo] = dataclasses.field(default_factory=dict)
    """Row id -> question, declared answer type, data source (the judge and per-source metrics read them)."""
    num_bad_rows: int = 0
    steps_per_batch: int = dataclasses.field(init=False)
    """Optimizer steps per rollout batch: grpo.mini_batches x grpo.ppo_epochs."""
    batch_split: int = dataclasses.field(init=False)

    def __post_init__(self):
        self.steps_per_batch = self.cfg.grpo.steps_per_rollout
        self.batch_split = self.cfg.grpo.mini_batches  # each rank splits its prompt groups into mini-batches

    @property
    def on_policy(self) -> bool:
        """One update per rollout batch and no TIS: no separate old-log-prob pass is needed."""
        return self.steps_per_batch == 1 and not self.cfg.grpo.tis_cap

    def load(self, processor: Processor, ctx: StageContext) -> int:
        if self.cfg.judge.enabled:
            check_ready(self.cfg.judge)  # a missing key or a bad URL stops the stage here, before any rollout
        data, path = self.cfg.data, ctx.resolve_path(self.cfg.data.train)
        rows = read_rows(path, data.columns)
        self.infos = row_infos(rows)
        self.prompts, report = encode_rows(rows, processor, template=data.template,
                                           system=data.system or None, on_bad_row=data.on_bad_row,
                                           max_tokens=data.max_tokens, source=str(path),
                                           max_pixel_bytes=data.max_pixel_bytes)
        self.num_bad_rows = report.num_skipped
        return len(self.prompts)

    def describe(self, total_steps: int) -> str:
        g, r = self.cfg.grpo, self.cfg.rollout
        return (f"grpo: {len(self.prompts)} prompts ({self.num_bad_rows} bad rows skipped) | "
                f"{self.cfg.train.batch_size} prompts x {r.n} completions a rollout, {g.mini_batches} mini-batches x "
                f"{g.ppo_epochs} epochs | {total_steps} steps | clip [{g.clip_low}, {g.clip_high}] | agg {g.agg} | "
                f"kl {g.kl_coef} ({g.kl_estimator}) | tis cap {g.tis_cap or 'off'} | rollout "
                f"{backend_label(r.backend)}, max {r.max_new_tokens} new tokens | old log-probs "
                + ("= current (on-policy, no extra forward)" if self.on_policy
                   else "from a no-grad forward after sampling"))

    def fit(self, run: Run) -> None:
        """for each rollout batch: collect; for each epoch and mini-batch: one optimizer step (logged)."""
        g, trainer, k = self.cfg.grpo, run.trainer, self.steps_per_batch
        assert trainer.step % k == 0, f"step {trainer.step}: checkpoints fall between rollout batches of {k} steps"
        collector = self.collector(run)
        for index in range(trainer.step // k, trainer.total_steps // k):
            start_s = time.perf_counter()
            # Box rewards tighten their IoU threshold with progress: V-Triune's step is 1-based, one per rollout batch.
            collector.reward = dataclasses.replace(collector.reward, box_iou_threshold=box_iou_threshold(
                g.box_iou, index + 1, trainer.total_steps // k))
            batch = collect(collector, index)
            for epoch in range(g.ppo_epochs):
                for part in range(g.mini_batches):
                    first = epoch == 0 and part == 0  # rollout metrics go with the first step of the batch
                    mb = self.mini_batch(run, batch, epoch, part)
                    trainer.run_step(mb.rows, functools.partial(self.loss, run, mb), num_passes=mb.num_passes,
                                     extra=batch.stats if first else None, start_s=start_s if first else None)
        collector.backend.close()  # before the export and the next stage, which need the accelerator memory

    def collector(self, run: Run) -> Collector:
        """The rollout backend (a full inference copy per rank), the reference model if any, and the settings."""
        cfg, ctx = self.cfg, run.ctx
        ref_policy = None
        if cfg.grpo.kl_coef > 0:
            ref_policy, _ = build_policy(ctx.model_dir(cfg.ref or cfg.init), ctx.model, ctx.dist)
            ref_policy.requires_grad_(False)
        # fp32 inference copy on CPU (exact tests); bf16 on GPU, like the trainer's compute dtype.
        sample_dtype = resolve_dtype(ctx.model.dtype, ctx.dist.device)[0]
        r = cfg.rollout
        # Built on every rank: one rank that cannot build it stops every rank with its message.
        backend = together_if_local(functools.partial(
            make_backend, r.backend, run.init_dir, device=ctx.dist.device, processor=run.processor,
            dtype=sample_dtype, gpu_memory_utilization=r.gpu_memory_utilization, enforce_eager=r.enforce_eager,
            max_model_len=r.max_model_len or cfg.data.max_tokens, seed=ctx.run.seed, max_batch_rows=r.max_batch_rows,
            compile_decode=r.compile_decode, batching=r.batching, require=r.require,
            tensor_parallel_size=r.tensor_parallel_size), r.backend)
        reward = RewardConfig(format_weight=cfg.grpo.format_weight, accuracy_weight=cfg.grpo.accuracy_weight)
        judge = None
        if cfg.judge.enabled and cfg.judge.open_answers:
            judge_cfg = dataclasses.replace(cfg.judge, cache_path=cfg.judge.cache_path
                                            or str(ctx.stage_dir / "judge_cache.jsonl"))
            judge = RewardJudge(judge_cfg, rank=ctx.dist.rank)
        return Collector(run.policy, ref_policy, backend, self.prompts, run.order, r, cfg.grpo, reward, ctx.dist,
                         ctx.run.seed, sample_dtype, cfg.train.micro_batch_tokens, run.merge_size, not self.on_policy,
                         judge, self.infos)

    def mini_batch(self, run: Run, batch: RolloutBatch, epoch: int, part: int) -> MiniBatch:
        """Mini-batch `part` of `epoch`: every mini_batches-th of this rank's prompt groups (freshly shuffled in each
        epoch), packed into rows of at most `train.micro_batch_tokens` with per-token advantages and log-probs."""
        g, ctx = self.cfg.grpo, run.ctx
        groups = batch.groups
        if g.mini_batches > 1:  # a fresh split of this rank's groups in every epoch
            random.Random(f"{ctx.run.seed}/{batch.index}/{epoch}/{ctx.dist.rank}").shuffle(groups)
        chosen = set(groups[part::g.mini_batches])
        picked = [j for j, grp in enumerate(batch.group_of) if grp in chosen]
        zero = batch.zero_weight or not picked
        picked = picked or [0]  # this rank has no group in this mini-batch: one sample at zero weight
        samples = [batch.samples[j] for j in picked]
        bins = [b for b in plan_bins([len(s.input_ids) for s in samples], self.cfg.train.micro_batch_tokens)[0] if b]
        rows = [to_device(self.row(run, batch, [picked[j] for j in b], zero), ctx.dist.device) for b in bins]
        local = [0 if zero else sum(num_targets(s) for s in samples), 0 if zero else len(samples)]
        # One exchange gives the lockstep count and the step's normalisers over all ranks (completions are per rank).
        (num_passes,), (num_tokens, num_seqs) = max_and_sum([len(rows)], local, ctx.dist.device)
        return MiniBatch(rows, num_passes, float(num_tokens), float(num_seqs))

    @staticmethod
    def row(run: Run, batch: RolloutBatch, ids: list[int], zero: bool) -> dict:
        """One packed row of samples `ids` with per-token advantages (0 when `zero`) and old/ref/rollout log-probs."""
        row = pack_samples([batch.samples[j] for j in ids], merge_size=run.merge_size)
        counts = torch.diff(row["target_cu"].long())
        row["num_targets"] = int(counts.sum())  # on the host now, so the loss needs no sync for it
        adv = torch.tensor([0.0 if zero else batch.advantages[j] for j in ids])
        row["advantages"] = torch.repeat_interleave(adv, counts)
        if batch.old_logps is not None:
            row["old"] = torch.cat([batch.old_logps[j] for j in ids])
        if batch.ref_logps is not None:
            row["ref"] = torch.cat([batch.ref_logps[j] for j in ids])
        row["rollout_lp"] = torch.cat([batch.rollout_logps[j] for j in ids])
        return row

    def loss(self, run: Run, mb: MiniBatch, row: dict):
        """Clipped surrogate of one packed row, this row's share of the step's aggregate (kernels.grpo_loss):

            L = -agg_t min(rho_t A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) A_t) + kl_coef x KL_t(pi || pi_ref),
            rho_t = exp(log pi(y_t) - log pi_old(y_t)),

        with A_t scaled by the truncated importance weight min(exp(log pi_old - log pi_rollout), tis_cap) when
        `grpo.tis_cap` is set. agg is the token mean over the step (token-mean) or a mean over its sequences.
        """
        g, r = self.cfg.grpo, self.cfg.rollout
        num_seqs = len(row["target_cu"]) - 1
        share = row["num_targets"] / max(1.0, mb.num_tokens) if g.agg == "token-mean" else \
            num_seqs / max(1.0, mb.num_seqs)
        adv, stats = row["advantages"], {}
        if g.tis_cap:
            # exp(trainer - rollout) log-prob gap per token, truncated; a positive per-token weight scales both
            # clip branches alike, so it folds into the advantage.
            w = torch.exp(row["old"] - row["rollout_lp"]).clamp(max=g.tis_cap)
            adv = adv * w
            stats["policy/tis_weight"] = w.mean() * share

        def fused(hidden, weight, targets):
            mask = torch.ones_like(targets, dtype=torch.bool)
            return grpo_loss(hidden, weight, targets, adv, row.get("old"), mask, cu_seqlens=row["target_cu"],
                             ref_logprobs=row.get("ref"), kl_coef=g.kl_coef, kl_estimator=g.kl_estimator,
                             clip_low=g.clip_low, clip_high=g.clip_high, agg=g.agg, temperature=r.temperature,
                             return_entropy=True, norm_len=r.max_new_tokens, impl=g.loss_impl)

        loss, m = run.policy(row, loss_fn=fused)
        stats.update({"train/loss": loss.detach() * share, "policy/clip_frac": m["clip_frac"] * share,
                      "policy/approx_kl": m["approx_kl"] * share, "policy/entropy": m["entropy_mean"] * share,
                      "train/num_tokens": torch.tensor(float(row["input_ids"].numel()))})
        if "kl_mean" in m:
            stats["policy/ref_kl"] = m["kl_mean"] * share
        return loss * share * run.ctx.dist.world_size, stats


def run(cfg: GRPOStageConfig, ctx: StageContext) -> None:
    run_training(cfg, ctx, GRPOStage(cfg))

"""GRPO experience: one rollout batch of scored completions, ready for policy-gradient steps.

    collect = sync weights -> generate -> score -> advantages -> filter -> old / ref log-probs

Each rank samples its own share of the rollout batch's prompts (every world_size-th), seeded by the rollout index
and the rank, so a resumed run samples the same completions. The steps are small named functions, each with its
formula or contract in the docstring; `collect` calls them in order and returns a typed `RolloutBatch`.
"""

import dataclasses
import time

import torch
from torch.distributed.tensor import DTensor

from engine.data import IGNORE_INDEX, Sample
from engine.dist import DistInfo, lockstep
from engine.model import Policy
from engine.packed_rows import pack_samples, to_device
from engine.reward_judge import JudgeTally, RewardJudge, RowInfo, open_item
from engine.rewards import Reward, RewardConfig, answer_type, score
from engine.rollout import Completion, RolloutBackend, SamplingParams, WeightStream
from engine.sections import RolloutConfig
from engine.stages.common import StepOrder, together_if_local
from engine.stages.config import GRPOConfig
from kernels import plan_bins


@dataclasses.dataclass
class RolloutBatch:
    """This rank's completions of one rollout batch as training samples, with everything the loss needs.

    Lists are per sample (prompt + one completion); log-prob lists hold one fp32 tensor per sample, one value per
    response token.
    """

    index: int
    """Rollout batch number (0-based): optimizer steps [index * k, (index + 1) * k) train on it."""
    samples: list[Sample]
    advantages: list[float]
    group_of: list[int]
    """The prompt group (this rank's prompt number) of each sample."""
    rollout_logps: list[torch.Tensor]
    """Log-probs of the sampled tokens under the rollout backend (for truncated importance sampling)."""
    old_logps: list[torch.Tensor] | None
    """Log-probs under the policy right after sampling; None on-policy (the loss takes old = current)."""
    ref_logps: list[torch.Tensor] | None
    """Log-probs under the reference model; None without a KL penalty."""
    zero_weight: bool
    """No group survived the filter: the samples of one group stand in at zero advantage, so every rank steps."""
    stats: dict[str, torch.Tensor]
    """Rollout metrics, this rank's share: the sum over ranks is the batch's value."""

    @property
    def groups(self) -> list[int]:
        return sorted(set(self.group_of))


@dataclasses.dataclass
class Collector:
    """What `collect` needs: the policy and its sampler, the prompts and their order, and the settings."""

    policy: Policy
    ref_policy: Policy | None
    backend: RolloutBackend
    prompts: list[Sample]
    order: StepOrder
    rollout: RolloutConfig
    grpo: GRPOConfig
    reward: RewardConfig
    dist: DistInfo
    seed: int
    sample_dtype: torch.dtype
    micro_batch_tokens: int
    merge_size: int | None
    need_old: bool
    """Compute old log-probs after sampling (several steps per rollout, or TIS); else old = current."""
    judge: RewardJudge | None = None
    """Grades open-ended answers the rules score wrong (engine/reward_judge.py); None: rules only."""
    infos: dict[str, RowInfo] = dataclasses.field(default_factory=dict)
    """Row id -> question, declared answer type and data source (for the judge and per-source metrics)."""


def collect(c: Collector, index: int) -> RolloutBatch:
    """Rollout batch `index`: sync weights -> generate -> score -> advantages -> filter -> old / ref log-probs."""
    start_s = time.perf_counter()
    rank, world, n = c.dist.rank, c.dist.world_size, c.rollout.n
    c.backend.wake()  # the sampler's weights and KV cache come back to the accelerator (no-op on CPU)
    sync_weights(c.policy, c.backend, c.sample_dtype)  # the previous update (or the resumed checkpoint)
    step_indices = c.order.step_indices(index)
    prompts = [c.prompts[i] for i in step_indices[rank::world]]
    seed = c.seed * 1_000_003 + index * world + rank  # by rollout and rank: a resumed run samples the same
    # One rank's failure to sample (e.g. out of memory) stops every rank with its message (a small gather).
    groups = together_if_local(lambda: generate(c.backend, prompts, c.rollout, seed=seed), c.backend)
    timing = c.backend.timing.metrics() if c.backend.timing is not None else {}
    c.backend.sleep()  # give the accelerator memory back to the trainer until the next rollout
    rewards, tally = score_groups(groups, prompts, c.reward, c.infos, c.judge)
    totals = torch.tensor([[r.total for r in grp] for grp in rewards])
    adv = group_advantages(totals, c.grpo.scale_by_std)
    keep = filter_groups(totals, c.grpo.filter_equal_groups)
    samples, advantages, rollout_lp, group_of = [], [], [], []
    for j in keep or [0]:  # nothing left: one group at zero weight, so that every rank still steps
        for s, completion in enumerate(groups[j]):
            samples.append(training_sample(prompts[j], completion.token_ids))
            advantages.append(float(adv[j, s]) if keep else 0.0)
            rollout_lp.append(torch.tensor(completion.logprobs, dtype=torch.float32))
            group_of.append(j)
    temperature = c.rollout.temperature
    old = response_logps(c.policy, samples, c, temperature) if c.need_old else None
    ref = response_logps(c.ref_policy, samples, c, temperature) if c.ref_policy is not None else None
    # Means over the batch's completions: every rank knows how many there are, so no communication.
    stats = rollout_stats(groups, rewards, totals, num_kept=len(keep), num_completions=len(step_indices) * n)
    stats["time/rollout_s"] = torch.tensor(time.perf_counter() - start_s) / world
    if tally is not None:
        stats.update(judge_stats(tally, num_completions=len(step_indices) * n, world=world))
    stats.update(source_stats(rewards, [c.infos.get(p.row_id) for p in prompts],
                              [c.infos.get(c.prompts[i].row_id) for i in step_indices], n))
    stats.update({k: torch.tensor(v) / world for k, v in timing.items()})  # generate: prefill / decode / tail
    return RolloutBatch(index, samples, advantages, group_of, rollout_lp, old, ref, not keep, stats)


def sync_weights(policy: Policy, backend: RolloutBackend, dtype: torch.dtype) -> None:
    """Stream the policy's weights into the backend's full inference copy, one tensor at a time.

    Each shard is cast to the sampler's dtype and all-gathered (a collective, in the same order on every rank) as the
    backend consumes it, so the peak is one full tensor rather than a whole fp32 state dict (28 GB for 7B) per rank;
    the names and (global) shapes go first, so a backend can reject a mismatch before loading anything.
    """
    def full_tensors():
        for name, p in policy.named_parameters():
            t = p.detach().to(dtype)
            yield name.removeprefix("hf."), t.full_tensor() if isinstance(t, DTensor) else t

    shapes = {name.removeprefix("hf."): tuple(p.shape) for name, p in policy.named_parameters()}
    backend.update_weights(WeightStream(shapes, full_tensors))


def generate(backend: RolloutBackend, prompts: list[Sample], cfg: RolloutConfig, seed: int) -> list[list[Completion]]:
    """`cfg.n` completions per prompt, as result[prompt][sample]; the same seed and weights give the same ones."""
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                              seed=seed)
    return backend.generate(prompts, cfg.n, sampling)


def score_groups(groups: list[list[Completion]], prompts: list[Sample], cfg: RewardConfig,
                 infos: dict[str, RowInfo] | None = None,
                 judge: RewardJudge | None = None) -> tuple[list[list[Reward]], JudgeTally | None]:
    """Reward of every completion: r = format_weight x format + accuracy_weight x accuracy, the accuracy by rules
    (rewards.score) or, for an open-ended row the rules score wrong, by the judge (a collective with a judge: every
    rank calls it). Returns the rewards as result[prompt][sample] and the judge's tally (None without a judge)."""
    declared = [((infos or {}).get(p.row_id) or RowInfo("")).answer_type for p in prompts]  # e.g. "boxes"
    rewards = [[score(c.text, p.answer, p.choices, cfg=cfg, declared_type=t) for c in grp]
               for p, grp, t in zip(prompts, groups, declared, strict=True)]
    if judge is None:
        return rewards, None
    flat, items = [], []
    for p, grp in zip(prompts, rewards, strict=True):
        info = (infos or {}).get(p.row_id) or RowInfo("")
        kind = answer_type(p.answer, p.choices, info.answer_type)  # once per prompt: unknown types counted once
        flat += grp
        items += [open_item(r, kind, info.question, p.answer) for r in grp]
    return rewards, judge.grade(flat, items, cfg)


def group_advantages(rewards: torch.Tensor, scale_by_std: bool, eps: float = 1e-6) -> torch.Tensor:
    """[G, n] rewards -> [G, n] advantages, A_gi = (r_gi - mean_i r_gi) / (std_i r_gi + eps) (GRPO; the std is the
    unbiased one), or only centred, A_gi = r_gi - mean_i r_gi (Dr. GRPO) when not `scale_by_std`."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + eps) if scale_by_std else centred


def filter_groups(rewards: torch.Tensor, drop_equal: bool) -> list[int]:
    """Groups to train on: with `drop_equal`, those whose n rewards are not all the same (DAPO's dynamic sampling,
    without resampling): an all-equal group has zero advantage everywhere and carries no signal."""
    flat = (rewards == rewards[:, :1]).all(dim=1)
    return [j for j in range(len(rewards)) if not (drop_equal and bool(flat[j]))]


def training_sample(prompt: Sample, completion_ids: list[int]) -> Sample:
    """Prompt + completion as one sample whose labels are the completion tokens."""
    ids = list(prompt.input_ids) + list(completion_ids)
    labels = [IGNORE_INDEX] * len(prompt.input_ids) + list(completion_ids)
    mm = list(prompt.mm_token_type_ids) + [0] * len(completion_ids)
    return Sample(ids, labels, mm, prompt.pixel_values, prompt.image_grid_thw, len(prompt.input_ids), prompt.row_id,
                  answer=prompt.answer, choices=prompt.choices, pixel_loader=prompt.pixel_loader)


@torch.no_grad()
def response_logps(model: Policy, samples: list[Sample], c: Collector, temperature: float) -> list[torch.Tensor]:
    """No-grad log-probs log softmax(logits / temperature)[token] of each sample's response tokens, on the CPU."""
    bins = [b for b in plan_bins([len(s.input_ids) for s in samples], c.micro_batch_tokens)[0] if b]
    out: list[torch.Tensor | None] = [None] * len(samples)
    for b, real in lockstep(bins, c.dist.device):
        row = pack_samples([samples[j] for j in b], merge_size=c.merge_size)
        counts = torch.diff(row["target_cu"].long()).tolist()  # a host tensor: no sync
        logp = model(to_device(row, c.dist.device), temperature=temperature).float().cpu()  # sync: kept on the host
        if not real:
            continue
        for j, part in zip(b, torch.split(logp, counts), strict=True):
            out[j] = part
    return out


def rollout_stats(groups: list[list[Completion]], rewards: list[list[Reward]], totals: torch.Tensor, *,
                  num_kept: int, num_completions: int) -> dict[str, torch.Tensor]:
    """This rank's share of the batch means: reward, format and answer accuracy, response length; kept groups."""
    c = max(1.0, float(num_completions))
    lens = [len(x.token_ids) for grp in groups for x in grp]
    return {"rollout/reward": totals.sum().float() / c,
            "rollout/format_acc": torch.tensor(sum(r.format > 0 for grp in rewards for r in grp)).float() / c,
            "rollout/accuracy": torch.tensor(sum(r.accuracy > 0 for grp in rewards for r in grp)).float() / c,
            "rollout/response_len": torch.tensor(float(sum(lens))).float() / c,
            "rollout/kept_groups": torch.tensor(float(num_kept))}


def judge_stats(t: JudgeTally, *, num_completions: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's share of the judge metrics: requests sent (rank 0 counts them all), completions left to the rules
    after a failed or over-budget call, the share of completions whose accuracy the judge decided, and its time."""
    c = max(1.0, float(num_completions))
    return {"rollout/judge_calls": torch.tensor(float(t.num_requests)),
            "rollout/judge_failures": torch.tensor(float(t.num_failures)),
            "rollout/judged_frac": torch.tensor(float(t.num_judged)) / c,
            "time/judge_s": torch.tensor(t.seconds) / world}


def source_stats(rewards: list[list[Reward]], mine: list[RowInfo | None], batch: list[RowInfo | None],
                 n: int) -> dict[str, torch.Tensor]:
    """This rank's share of reward, accuracy and format means per data source (V-Triune's source-level monitoring),
    as `rollout/source/<name>/<metric>`. `mine` are this rank's prompts' infos, `batch` every prompt of the rollout
    batch (the same list on every rank, so every rank emits the same keys); nothing when the data names no source."""
    counts: dict[str, int] = {}
    for info in batch:
        if info is not None and info.data_source:
            counts[info.data_source] = counts.get(info.data_source, 0) + n
    out = {f"rollout/source/{src}/{m}": torch.tensor(0.0) for src in counts for m in ("reward", "accuracy", "format")}
    for info, grp in zip(mine, rewards, strict=True):
        if info is None or not info.data_source:
            continue
        c, key = float(counts[info.data_source]), f"rollout/source/{info.data_source}"
        out[f"{key}/reward"] += sum(r.total for r in grp) / c
        out[f"{key}/accuracy"] += sum(r.accuracy > 0 for r in grp) / c
        out[f"{key}/format"] += sum(r.format > 0 for r in grp) / c
    return out

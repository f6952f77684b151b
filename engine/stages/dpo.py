"""DPO + SFT cold start (the SPECS hybrid loss): loss = DPO(chosen, rejected) + sft_weight x NLL(chosen).

Pairs are packed rows: a micro-batch holds whole pairs, chosen and rejected responses of the same prompt side by
side, and `kernels.dpo_loss` computes the loss from the hidden states at the response positions (no logits).
The reference model's sequence log-probs are computed once, before the first step, and stored in
`<stage>/ref_logps.pt`, so no second model is resident while training (when the reference is the starting
checkpoint, the default, the policy itself computes them before its first update).

Normalisation over a step (all micro-batches, all ranks): the DPO term is the mean over the step's pairs, the SFT
term the mean over the step's chosen response tokens (`token-mean`) or chosen sequences (`seq-mean`).
"""

import dataclasses
import gc
from pathlib import Path
from typing import ClassVar

import torch

from engine import atomic
from engine.data import Processor, Sample, encode_rows
from engine.dist import all_reduce, gather_object, lockstep, on_main
from engine.log import log0, logger
from engine.packed_rows import num_targets, pack_samples, to_device
from engine.stages import StageContext
from engine.stages._train import Run, run_training
from engine.stages.common import build_policy, read_rows
from engine.stages.config import DPOStageConfig
from kernels import dpo_loss, plan_bins

Pair = tuple[Sample, Sample]


def encode_pairs(cfg: DPOStageConfig, processor: Processor, path: Path) -> list[Pair]:
    """(chosen, rejected) samples of every row where both encode; a row bad on either side is dropped, counted."""
    rows = read_rows(path, cfg.data.columns)
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
    batch["num_chosen_targets"] = int(batch["target_cu"][len(indices)])  # a host tensor: no sync
    return batch


@torch.no_grad()
def reference_logps(policy, pairs: list[Pair], ctx: StageContext, micro_batch_tokens: int,
                    merge_size: int | None) -> torch.Tensor:
    """Sequence log-probs [P, 2] (chosen, rejected) under `policy`; each rank does its share, then one all-reduce."""
    dist_info = ctx.dist
    mine = list(range(dist_info.rank, len(pairs), dist_info.world_size))
    lengths = [len(pairs[i][0].input_ids) + len(pairs[i][1].input_ids) for i in mine]
    bins = [b for b in plan_bins(lengths, micro_batch_tokens)[0] if b] if mine else []
    out = torch.zeros(len(pairs), 2, device=dist_info.device)
    for indices, real in lockstep([[mine[j] for j in b] for b in bins], dist_info.device, filler=[0]):
        batch = pair_batch(pairs, indices, merge_size)
        counts = torch.diff(batch["target_cu"].long()).tolist()  # a host tensor: no sync
        logp = policy(to_device(batch, dist_info.device))
        if not real:
            continue
        sums = torch.stack([x.sum() for x in torch.split(logp, counts)])
        k = len(indices)
        out[batch["pair_index"], 0], out[batch["pair_index"], 1] = sums[:k], sums[k:]
    return all_reduce(out).cpu()


@dataclasses.dataclass
class DPOStage:
    """The pairs, the reference log-probs and the current step's normalisers."""

    cfg: DPOStageConfig
    pairs: list[Pair] = dataclasses.field(default_factory=list)
    ref_dir: Path | None = None
    ref_logps: torch.Tensor | None = None
    """[P, 2] sequence log-probs of (chosen, rejected) under the reference model."""
    step_pairs: int = 1
    """Pairs of the current step over all ranks: the DPO term's normaliser."""
    step_chosen_targets: int = 1
    """Chosen response tokens of the current step over all ranks: the token-mean SFT term's normaliser."""
    steps_per_batch: ClassVar[int] = 1
    batch_split: ClassVar[int] = 1

    def load(self, processor: Processor, ctx: StageContext) -> int:
        self.ref_dir = ctx.model_dir(self.cfg.ref or self.cfg.init)
        self.pairs = encode_pairs(self.cfg, processor, ctx.resolve_path(self.cfg.data.train))
        return len(self.pairs)

    def describe(self, total_steps: int) -> str:
        d = self.cfg.dpo
        return (f"dpo: {len(self.pairs)} pairs | batch {self.cfg.train.batch_size} pairs | {total_steps} steps | "
                f"beta {d.beta} | sft_weight {d.sft_weight} ({d.sft_norm}) | reference {self.ref_dir}")

    def fit(self, run: Run) -> None:
        self.ref_logps = self.reference(run).to(run.ctx.dist.device)
        run.trainer.fit(lambda step: self.micro_batches(run, step), lambda mb: self.loss(run, mb))

    def reference(self, run: Run) -> torch.Tensor:
        """The stored reference log-probs, or compute them (before the first update) and store them."""
        ctx, mbt = run.ctx, self.cfg.train.micro_batch_tokens
        ref_file = ctx.stage_dir / "ref_logps.pt"
        stored = self.stored_reference(ref_file)
        # Every rank computes or none does (a collective): one rank that cannot read the file computes with all.
        if all(gather_object(stored is not None)):
            return stored
        # The untouched policy is the reference: no second model. Once training has begun (a resume) it is not.
        if self.ref_dir == run.init_dir and not run.resumed:
            ref_logps = reference_logps(run.policy, self.pairs, ctx, mbt, run.merge_size)
        else:
            ref_policy, _ = build_policy(self.ref_dir, ctx.model, ctx.dist)
            ref_logps = reference_logps(ref_policy, self.pairs, ctx, mbt, run.merge_size)
            del ref_policy
            gc.collect()

        def store() -> None:  # rank 0; a full disk stops every rank with its message
            with atomic.replacing(ref_file, ref_logps.numel() * ref_logps.element_size()) as tmp:
                torch.save(ref_logps, tmp)

        on_main(store)
        return ref_logps

    def stored_reference(self, ref_file: Path) -> torch.Tensor | None:
        """The log-probs in `ref_file` when it holds them for these pairs, else None (said once)."""
        if not ref_file.is_file():
            return None
        try:
            ref_logps = torch.load(ref_file, weights_only=True)
        except Exception as e:  # written atomically now; an older run's crash could leave it cut short
            logger.warning(f"{ref_file} is unreadable ({type(e).__name__}: {e}): computing it again")
            return None
        if not isinstance(ref_logps, torch.Tensor) or tuple(ref_logps.shape) != (len(self.pairs), 2):
            logger.warning(f"{ref_file} does not hold [{len(self.pairs)}, 2] log-probs: computing them again")
            return None
        return ref_logps

    def micro_batches(self, run: Run, step: int) -> tuple[list[dict], int]:
        """This rank's packed rows of whole pairs for optimizer step `step` and the most rows any rank has (every
        rank plans all ranks' bins, so no communication); sets the step's normalisers."""
        indices, world = run.order.step_indices(step), run.ctx.dist.world_size
        self.step_pairs = len(indices)
        self.step_chosen_targets = max(1, sum(num_targets(self.pairs[i][0]) for i in indices))
        lengths = [len(self.pairs[i][0].input_ids) + len(self.pairs[i][1].input_ids) for i in indices]
        plan = [[b for b in bins if b] for bins in plan_bins(lengths, self.cfg.train.micro_batch_tokens,
                                                              num_ranks=world)]
        rows = [to_device(pair_batch(self.pairs, [indices[j] for j in b], run.merge_size), run.ctx.dist.device)
                for b in plan[run.ctx.dist.rank]]
        return rows, max(len(p) for p in plan)

    def loss(self, run: Run, mb: dict):
        """DPO + sft_weight x NLL(chosen), rescaled to this micro-batch's share of the step-wide normalisers."""
        d = self.cfg.dpo
        share = len(mb["pair_index"]) / self.step_pairs  # this micro-batch's share of the step's pair mean
        # dpo_loss averages SFT over this micro-batch; rescale it to the step-wide normaliser.
        sft_scale = mb["num_chosen_targets"] / self.step_chosen_targets if d.sft_norm == "token-mean" else share
        sft_weight = d.sft_weight * sft_scale / share
        refs = self.ref_logps[mb["pair_index"]]

        def fused(hidden, weight, targets):
            mask = torch.ones_like(targets, dtype=torch.bool)
            return dpo_loss(hidden, weight, targets, mask, mb["target_cu"], mb["is_chosen"], refs[:, 0], refs[:, 1],
                            beta=d.beta, sft_weight=sft_weight, sft_norm=d.sft_norm,
                            label_smoothing=d.label_smoothing, impl=d.loss_impl)

        loss, m = run.policy(mb, loss_fn=fused)
        stats = {f"dpo/{name}": m[name] * share for name in ("reward_margin", "reward_accuracy", "rewards_chosen",
                                                             "rewards_rejected")}
        stats.update({"train/loss": loss.detach() * share, "train/dpo_loss": m["dpo_loss"] * share,
                      "train/sft_loss": m["sft_loss"] * sft_scale,
                      "train/num_tokens": torch.tensor(float(mb["input_ids"].numel()))})
        # FSDP2 averages gradients over ranks; the world-size factor makes the sum over ranks the step's loss.
        return loss * share * run.ctx.dist.world_size, stats


def run(cfg: DPOStageConfig, ctx: StageContext) -> None:
    run_training(cfg, ctx, DPOStage(cfg))

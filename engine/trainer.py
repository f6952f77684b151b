"""The optimizer-step loop shared by the training stages.

A stage gives the trainer, for each optimizer step, this rank's micro-batches, the most micro-batches any rank has
in this step if the stage knows it (None: the ranks ask each other, one more host sync), and a loss function:
    loss_fn(micro_batch) -> (loss to backward, {name: tensor}) where each stat is this micro-batch's share, so
                            that the sum over micro-batches and ranks is the step's value (e.g. "train/loss")
`fit(step_batches, loss_fn)` runs the steps with `step_batches(step) -> (micro-batches, num_passes)` supplying
them; a stage with its own loop (GRPO: a rollout batch feeds several steps) calls `run_step` itself. The trainer
accumulates gradients, keeps FSDP2 collectives in lockstep, clips, skips non-finite updates, steps the optimizer
and schedule, logs metrics and saves/restores checkpoints. It knows nothing about the stages.
"""

import functools
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from engine.checkpoint import Checkpointer
from engine.dist import DistInfo, all_reduce, lockstep, on_main
from engine.fsdp import build_optimizer, build_scheduler
from engine.log import log0, logger
from engine.metrics import Metrics
from engine.preempt import KEY as PREEMPT_KEY
from engine.preempt import Preempted, stat
from engine.sections import CheckpointConfig, OptimConfig, TrainConfig

MicroBatch = dict[str, torch.Tensor]
LossFn = Callable[[MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    def __init__(self, model: nn.Module, *, optim: OptimConfig, train: TrainConfig, checkpoint: CheckpointConfig,
                 stage_dir: Path, dist_info: DistInfo, total_steps: int, log_every: int = 1,
                 flops_per_token: float = 0.0, plan_peak_gib: float | None = None):
        self.model = model
        self.optim_cfg, self.train_cfg, self.dist = optim, train, dist_info
        self.total_steps = total_steps
        self.optimizer = build_optimizer(model, optim)
        self.scheduler = build_scheduler(self.optimizer, optim, total_steps)
        self.checkpointer = Checkpointer(Path(stage_dir) / "checkpoints", checkpoint, dist_info)
        self.every = checkpoint.every
        self.metrics = Metrics(Path(stage_dir) / "metrics.jsonl", is_main=dist_info.is_main, total_steps=total_steps,
                               log_every=log_every, name=Path(stage_dir).name, flops_per_token=flops_per_token,
                               device=dist_info.device, world_size=dist_info.world_size, plan_peak_gib=plan_peak_gib)
        self.step = 0  # optimizer steps done
        self.stop_every = 1
        """A preemption stop (and its checkpoint) waits for a step that is a multiple of this (GRPO: of a rollout
        batch's steps, so that a resume never needs a half-used rollout batch)."""
        self.stop_requested = False
        self.num_skipped = 0
        self.bad_in_a_row = 0

    # ------------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "num_skipped": self.num_skipped, "bad_in_a_row": self.bad_in_a_row,
                "scheduler": self.scheduler.state_dict()}

    def save(self) -> None:
        self.checkpointer.save(self.step, self.model, self.optimizer, self.state())

    def resume(self) -> bool:
        """Load the newest usable checkpoint of this stage, if any (a damaged newer one is reported and set aside);
        cut metrics.jsonl back to it."""
        state = self.checkpointer.load_latest(self.model, self.optimizer, keys=tuple(self.state()))
        if state is None:
            on_main(lambda: self.metrics.truncate(0))  # a crash before the first checkpoint: start the file over
            return False
        self.step, self.num_skipped, self.bad_in_a_row = state["step"], state["num_skipped"], state["bad_in_a_row"]
        self.scheduler.load_state_dict(state["scheduler"])
        on_main(lambda: self.metrics.truncate(self.step))  # rank 0's file; its error stops every rank
        log0(f"resume: from step {self.step}/{self.total_steps} ({self.checkpointer.path(self.step)})")
        return True

    # ------------------------------------------------------------------------------------------------------
    def fit(self, step_batches: Callable[[int], tuple[list[MicroBatch], int | None]], loss_fn: LossFn) -> None:
        """Run optimizer steps until `total_steps`; `step_batches(step)` (0-based) gives each step's micro-batches
        and the most any rank has (or None)."""
        while self.step < self.total_steps:
            start_s = time.perf_counter()  # building the batches counts as part of the step
            micro_batches, num_passes = step_batches(self.step)
            self.run_step(micro_batches, loss_fn, num_passes=num_passes, start_s=start_s)

    def run_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn, *, num_passes: int | None = None,
                 extra: dict | None = None, start_s: float | None = None) -> dict[str, float]:
        """One optimizer step, then count it, log it and save a checkpoint every `checkpoint.every` steps."""
        start_s = time.perf_counter() if start_s is None else start_s
        # The preemption request rides in the step's one all-reduce, so every rank stops after the same step.
        values = self.train_step(micro_batches, loss_fn, num_passes=num_passes, extra={**(extra or {}), **stat()})
        self.stop_requested |= values.pop(PREEMPT_KEY) > 0  # the same on every rank: it was all-reduced
        self.step += 1
        stop = self.stop_requested and self.step % self.stop_every == 0
        # Rank 0 appends to metrics.jsonl; an error there (a full disk) stops every rank before the next step's
        # collectives (sync: one small broadcast a step, after the step's own host sync).
        on_main(functools.partial(self.metrics.log, self.step, values, step_s=time.perf_counter() - start_s))
        if (self.every and self.step % self.every == 0 and self.step < self.total_steps) or stop:
            self.save()
        if stop:
            raise Preempted(f"stage {self.metrics.name} after step {self.step}/{self.total_steps}, checkpoint "
                            f"{self.checkpointer.path(self.step)}")
        return values

    def finish(self) -> None:
        """The final checkpoint (unless the last step saved one) and the stage's throughput summary."""
        if self.step not in self.checkpointer.steps():
            self.save()
        self.metrics.summary()

    def train_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn, *, num_passes: int | None = None,
                   extra: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns the step's metrics (same on every rank).

        `num_passes` is the most micro-batches any rank has, if the caller knows it (else one more host sync).
        `extra` holds more stats of this rank (e.g. a rollout's), summed over ranks with the loss stats.
        """
        if not micro_batches:
            raise ValueError(f"rank {self.dist.rank} got no micro-batch for step {self.step}")
        passes = lockstep(micro_batches, self.dist.device, num=num_passes)
        totals: dict[str, torch.Tensor] = {}
        for i, (mb, real) in enumerate(passes):
            # Reduce-scatter gradients only after the last micro-batch; earlier ones accumulate locally.
            self.model.set_requires_gradient_sync(i == len(passes) - 1)
            loss, stats = loss_fn(mb)
            if real:
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v.detach().float()
            else:
                loss = loss * 0.0
            loss.backward()
        for k, v in (extra or {}).items():
            totals[k] = totals.get(k, 0.0) + v.detach().float()
        names = sorted(totals)
        packed = torch.stack([torch.as_tensor(totals[k], device=self.dist.device).reshape(()) for k in names]) \
            if names else torch.zeros(0, device=self.dist.device)
        all_reduce(packed)  # one all-reduce for every stat of the step; read back with the grad norm below
        grad_norm_t = self._clip_grad_norm()
        *stat_values, grad_norm = torch.cat([packed, grad_norm_t.reshape(1).float()]).tolist()  # sync: the step's
        values = dict(zip(names, stat_values, strict=True))  # stats and grad norm reach the host together

        finite = math.isfinite(values.get("train/loss", 0.0)) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.num_skipped += 1
            self.bad_in_a_row += 1
            logger.warning(f"step {self.step + 1}: non-finite loss {values.get('train/loss')} or grad norm "
                           f"{grad_norm}; update skipped ({self.bad_in_a_row} in a row, {self.num_skipped} in this "
                           f"stage)")
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():
            # The schedule follows the step count even when an update was skipped; torch warns about that order.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        if self.bad_in_a_row >= self.train_cfg.max_bad_steps:
            last = self.checkpointer.steps()
            raise NonFiniteError(
                f"{self.bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient norm "
                f"(train.max_bad_steps = {self.train_cfg.max_bad_steps}); stopping. The last good checkpoint is "
                f"{self.checkpointer.path(last[-1]) if last else 'none (no checkpoint was saved yet)'}. "
                "Lower optim.lr, check the data, or raise train.max_bad_steps.")
        values.update({"train/grad_norm": grad_norm, "train/lr": lr, "train/skipped": not finite,
                       "train/num_skipped": self.num_skipped})
        return values

    def _clip_grad_norm(self) -> torch.Tensor:
        """Clip gradients to `optim.max_grad_norm`; returns the total norm before clipping (on the device)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.optim_cfg.max_grad_norm or float("inf")  # 0 disables clipping but still measures
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros((), device=self.dist.device)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

"""The optimizer-step loop shared by the training stages (SFT now; DPO and GRPO plug in the same way).

A stage gives the trainer two functions:
    micro_batches(step) -> list of this rank's micro-batches for optimizer step `step` (0-based)
    loss_fn(micro_batch) -> (loss to backward, {name: tensor}) where each stat is this micro-batch's share, so
                            that the sum over micro-batches and ranks is the step's value (e.g. "loss")
The trainer accumulates gradients, keeps FSDP2 collectives in lockstep, clips, skips non-finite updates,
steps the optimizer and schedule, logs metrics and saves/restores checkpoints.
"""

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from engine.checkpoint import Checkpointer
from engine.dist import DistInfo, all_reduce
from engine.fsdp import build_optimizer, build_scheduler
from engine.log import log0, logger
from engine.metrics import Metrics
from engine.sections import CheckpointConfig, OptimConfig, TrainConfig

MicroBatch = dict[str, torch.Tensor]
LossFn = Callable[[MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    def __init__(self, model: nn.Module, *, optim: OptimConfig, train: TrainConfig, checkpoint: CheckpointConfig,
                 stage_dir: Path, dist_info: DistInfo, total_steps: int, log_every: int = 1):
        self.model = model
        self.optim_cfg, self.train_cfg, self.dist = optim, train, dist_info
        self.total_steps = total_steps
        self.optimizer = build_optimizer(model, optim)
        self.scheduler = build_scheduler(self.optimizer, optim, total_steps)
        self.checkpointer = Checkpointer(Path(stage_dir) / "checkpoints", checkpoint, dist_info)
        self.every = checkpoint.every
        self.metrics = Metrics(Path(stage_dir) / "metrics.jsonl", is_main=dist_info.is_main,
                               total_steps=total_steps, log_every=log_every)
        self.step = 0  # optimizer steps done
        self.num_skipped = 0
        self.bad_in_a_row = 0

    # ------------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "num_skipped": self.num_skipped, "bad_in_a_row": self.bad_in_a_row,
                "scheduler": self.scheduler.state_dict()}

    def save(self) -> None:
        self.checkpointer.save(self.step, self.model, self.optimizer, self.state())

    def resume(self) -> bool:
        """Load the newest complete checkpoint of this stage, if any; cut metrics.jsonl back to it."""
        steps = self.checkpointer.steps()
        if not steps:
            self.metrics.truncate(0)  # a crash before the first checkpoint: start the file over
            return False
        state = self.checkpointer.load(steps[-1], self.model, self.optimizer)
        self.step, self.num_skipped, self.bad_in_a_row = state["step"], state["num_skipped"], state["bad_in_a_row"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.metrics.truncate(self.step)
        log0(f"resume: from step {self.step}/{self.total_steps} ({self.checkpointer.path(self.step)})")
        return True

    # ------------------------------------------------------------------------------------------------------
    def fit(self, micro_batches: Callable[[int], list[MicroBatch]], loss_fn: LossFn) -> None:
        """Run optimizer steps until `total_steps`; saves every `checkpoint.every` steps and at the end."""
        while self.step < self.total_steps:
            start_s = time.perf_counter()
            values = self.train_step(micro_batches(self.step), loss_fn)
            self.step += 1
            values["step_s"] = time.perf_counter() - start_s
            values["tokens_per_s"] = values.get("num_tokens", 0.0) / values["step_s"]
            self.metrics.log(self.step, values)
            if self.every and self.step % self.every == 0 and self.step < self.total_steps:
                self.save()
        if self.step not in self.checkpointer.steps():
            self.save()

    def train_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns the step's metrics (same on every rank)."""
        if not micro_batches:
            raise ValueError(f"rank {self.dist.rank} got no micro-batch for step {self.step}")
        # Every rank must run the same number of forward/backward passes: FSDP2 all-gathers and
        # reduce-scatters inside them. Ranks with fewer micro-batches repeat their first one at zero weight.
        num_mb = int(all_reduce(torch.tensor([len(micro_batches)], device=self.dist.device), "max").item())  # sync
        totals: dict[str, torch.Tensor] = {}
        for i in range(num_mb):
            real = i < len(micro_batches)
            # Reduce-scatter gradients only after the last micro-batch; earlier ones accumulate locally.
            self.model.set_requires_gradient_sync(i == num_mb - 1)
            loss, stats = loss_fn(micro_batches[i] if real else micro_batches[0])
            if real:
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v.detach().float()
            else:
                loss = loss * 0.0
            loss.backward()
        names = sorted(totals)
        packed = torch.stack([torch.as_tensor(totals[k], device=self.dist.device).reshape(()) for k in names])
        packed = all_reduce(packed).tolist()  # sync: one all-reduce for every stat of the step
        values = dict(zip(names, packed, strict=True))

        grad_norm = self._clip_grad_norm()
        finite = math.isfinite(values.get("loss", 0.0)) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.num_skipped += 1
            self.bad_in_a_row += 1
            logger.warning(f"step {self.step + 1}: non-finite loss {values.get('loss')} or grad norm {grad_norm}; "
                           f"update skipped ({self.bad_in_a_row} in a row, {self.num_skipped} in this stage)")
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
        values.update(grad_norm=grad_norm, lr=lr, skipped=not finite, num_skipped=self.num_skipped)
        return values

    def _clip_grad_norm(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.optim_cfg.max_grad_norm or float("inf")  # 0 disables clipping but still measures
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)  # sync

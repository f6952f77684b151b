"""Per-stage metrics: one JSON object per optimizer step in `<stage>/metrics.jsonl`, and the progress line.

Keys are grouped by a slash prefix (`train/loss`, `rollout/reward`, `perf/mfu`, `time/step_s`, `mem/...`); the
README's metrics table lists every key with its unit. Only rank 0 writes. On resume the file is cut back to the
checkpoint's step (a last line torn by a crash or a full disk is trimmed, with a warning), so a restarted stage
appends exactly the lines an uninterrupted run would have written; an append that fails is cut back too.
Throughput and MFU are per step in the file; the averages in the progress line's ETA and in the end-of-stage
summary leave out the first `WARMUP_STEPS` steps of the process (allocator warm-up, compilation, first rollout).
"""

import json
import resource
import time
from pathlib import Path

import torch

from engine import atomic
from engine.log import log0
from engine.tracking import log_metrics

WARMUP_STEPS = 2
"""Steps of each process left out of the averaged throughput, MFU and ETA."""

# Peak dense bf16 tensor-core TFLOP/s per GPU, from the vendors' data sheets (SXM parts unless named).
# Matched against torch.cuda.get_device_name() in this order, so more specific names come first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
                    ("H800", 989.0), ("H20", 148.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
                    ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0))


def peak_flops_per_s(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one `device`; None on CPU or for a GPU missing from PEAK_BF16_TFLOPS (no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def memory_gib() -> dict[str, float]:
    """Peak memory of this process: reserved by the CUDA caching allocator, or resident (host) on CPU."""
    if torch.cuda.is_available():
        return {"mem/max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                "mem/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"mem/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux reports KiB


class Metrics:
    def __init__(self, path: Path, *, is_main: bool, total_steps: int, log_every: int = 1, name: str = "",
                 flops_per_token: float = 0.0, device: torch.device | None = None, world_size: int = 1,
                 plan_peak_gib: float | None = None):
        self.path = Path(path)
        self.is_main = is_main
        self.total_steps = total_steps
        self.log_every = log_every
        self.name = name
        self.flops_per_token = flops_per_token
        self.plan_peak_gib = plan_peak_gib
        """The memory plan's peak for this stage (engine/plan.py), logged beside the measured one on CUDA."""
        peak = peak_flops_per_s(device) if device is not None else None
        self.peak_flops = peak * world_size if peak and flops_per_token else None  # every rank's peak
        self.num_logged = 0  # steps logged by this process
        self.warm_start_s: float | None = None  # wall clock when the warm-up steps were over
        self.warm_tokens = 0.0
        self.warm_step_s = 0.0

    def truncate(self, last_step: int) -> None:
        """Drop lines of steps after `last_step` (written after the checkpoint we resume from)."""
        if not (self.is_main and self.path.is_file()):
            return
        kept = [row for row in atomic.read_jsonl(self.path) if row["step"] <= last_step]  # trims a torn last line
        atomic.write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def log(self, step: int, values: dict, *, step_s: float) -> None:
        """Append `values` for `step` (1-based) with the step's time, throughput, MFU and memory; print the progress
        line every `log_every` steps."""
        if not self.is_main:
            return
        tokens = values.get("train/num_tokens", 0.0)
        record = {"step": step, **values, "time/step_s": step_s, "perf/tok_per_s": tokens / step_s}
        if self.peak_flops:
            record["perf/mfu"] = tokens * self.flops_per_token / step_s / self.peak_flops
        record.update(memory_gib())
        if self.plan_peak_gib is not None:
            record["mem/plan_peak_gib"] = self.plan_peak_gib
        self.num_logged += 1
        if self.num_logged == WARMUP_STEPS:
            self.warm_start_s = time.perf_counter()
        elif self.num_logged > WARMUP_STEPS:
            self.warm_tokens += tokens
            self.warm_step_s += step_s
        atomic.append_text(self.path, json.dumps(record) + "\n")  # cut back if the disk fills mid-line
        log_metrics(self.name, step, record)  # TensorBoard / W&B, when run.trackers has them
        if step % self.log_every == 0 or step == self.total_steps:
            log0(self.progress_line(step, record))

    def _eta_min(self, step: int) -> float | None:
        if self.warm_start_s is None or self.num_logged <= WARMUP_STEPS:
            return None
        per_step_s = (time.perf_counter() - self.warm_start_s) / (self.num_logged - WARMUP_STEPS)  # wall clock
        return per_step_s * (self.total_steps - step) / 60

    def progress_line(self, step: int, v: dict) -> str:
        width = len(str(self.total_steps))
        parts = [f"{self.name} step {step:0{width}d}/{self.total_steps} ({100 * step / self.total_steps:4.1f}%)",
                 f"loss {v['train/loss']:.4f}", f"gnorm {v['train/grad_norm']:.3f}", f"lr {v['train/lr']:.2e}",
                 f"{v['perf/tok_per_s']:,.0f} tok/s"]
        if "rollout/reward" in v:  # RL stages: what the samples of this rollout batch earned
            parts.insert(2, f"reward {v['rollout/reward']:.3f} (format {v['rollout/format_acc']:.2f}, "
                            f"acc {v['rollout/accuracy']:.2f})")
        if "dpo/reward_accuracy" in v:  # DPO: preference accuracy and margin
            parts.insert(2, f"pref acc {v['dpo/reward_accuracy']:.2f} margin {v['dpo/reward_margin']:.2f}")
        if "perf/mfu" in v:
            parts.append(f"mfu {100 * v['perf/mfu']:.1f}%")
        if "mem/max_reserved_gib" in v:
            parts.append(f"mem {v['mem/max_reserved_gib']:.1f} GiB")
        else:
            parts.append(f"rss {v['mem/max_rss_gib']:.1f} GiB")
        parts.append(f"{1000 * v['time/step_s']:.0f} ms")
        if "time/rollout_s" in v:
            parts.append(f"rollout {v['time/rollout_s']:.1f} s")
        eta = self._eta_min(step)
        parts.append(f"eta {eta:.1f}m" if eta is not None else "eta -")
        if v.get("train/skipped"):
            parts.append("SKIPPED (non-finite)")
        return " | ".join(parts)

    def summary(self) -> None:
        """One line: mean throughput and MFU of this process's steps after the warm-up."""
        num = self.num_logged - WARMUP_STEPS
        if not self.is_main or num <= 0 or self.warm_step_s <= 0:
            return
        tok_per_s = self.warm_tokens / self.warm_step_s
        mfu = f", mfu {100 * tok_per_s * self.flops_per_token / self.peak_flops:.1f}%" if self.peak_flops else ""
        log0(f"{self.name}: {tok_per_s:,.0f} tok/s{mfu}, {1000 * self.warm_step_s / num:.0f} ms/step over {num} "
             f"steps (the first {WARMUP_STEPS} left out as warm-up)")

"""Per-stage metrics: one JSON object per optimizer step in `<stage>/metrics.jsonl`, and the progress line.

Only rank 0 writes. On resume the file is cut back to the checkpoint's step, so a restarted stage appends
exactly the lines an uninterrupted run would have written.
"""

import json
import resource
import time
from pathlib import Path

import torch

from engine.log import log0


class Metrics:
    def __init__(self, path: Path, *, is_main: bool, total_steps: int, log_every: int = 1):
        self.path = Path(path)
        self.is_main = is_main
        self.total_steps = total_steps
        self.log_every = log_every
        self.start_s = time.perf_counter()
        self.first_step: int | None = None

    def truncate(self, last_step: int) -> None:
        """Drop lines of steps after `last_step` (written after the checkpoint we resume from)."""
        if not (self.is_main and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict) -> None:
        """Append `values` for `step` (1-based) and print the progress line every `log_every` steps."""
        if not self.is_main:
            return
        if self.first_step is None:
            self.first_step, self.start_s = step, time.perf_counter() - values.get("step_s", 0.0)
        record = {"step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if step % self.log_every == 0 or step == self.total_steps:
            log0(self.progress_line(step, values))

    def progress_line(self, step: int, v: dict) -> str:
        elapsed_s = time.perf_counter() - self.start_s
        done = step - self.first_step + 1
        eta_min = elapsed_s / done * (self.total_steps - step) / 60
        width = len(str(self.total_steps))
        parts = [f"step {step:0{width}d}/{self.total_steps} ({100 * step / self.total_steps:4.1f}%)",
                 f"loss {v['loss']:.4f}", f"gnorm {v['grad_norm']:.3f}", f"lr {v['lr']:.2e}",
                 f"{v['tokens_per_s']:,.0f} tok/s"]
        if "reward" in v:  # RL stages: what the samples of this step earned
            parts.insert(2, f"reward {v['reward']:.3f} (format {v['format_acc']:.2f}, acc {v['accuracy']:.2f})")
        if "reward_accuracy" in v:  # DPO: preference accuracy and margin
            parts.insert(2, f"pref acc {v['reward_accuracy']:.2f} margin {v['reward_margin']:.2f}")
        if torch.cuda.is_available():
            parts.append(f"mem {torch.cuda.max_memory_reserved() / 2**30:.1f} GiB")
        else:  # peak resident memory of this process (Linux reports KiB)
            parts.append(f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
        parts += [f"{1000 * v['step_s']:.0f} ms", f"eta {eta_min:.1f}m"]
        if v.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        return " | ".join(parts)

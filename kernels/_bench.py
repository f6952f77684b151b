"""Benchmark helpers shared by bench/bench_*.py: timing, peak extra memory, the printed table and CSV rows.

CSV columns (bench/results/<op>.csv): op, provider, mode, shape, dtype, metric, unit, p50, p20, p80, gpu, torch,
triton, git_sha, timestamp.
"""

import csv
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

COLUMNS = ["op", "provider", "mode", "shape", "dtype", "metric", "unit", "p50", "p20", "p80", "gpu", "torch",
           "triton", "git_sha", "timestamp"]


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of `fn()`; CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def peak_extra_gib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory above what was allocated before `fn()` (GiB); NaN on CPU."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


class Results:
    """Collects rows, prints the table, appends to bench/results/<op>.csv."""

    def __init__(self, op: str, results_dir: Path):
        self.op, self.path = op, Path(results_dir) / f"{op}.csv"
        self.rows: list[dict] = []
        try:
            import triton
            self.triton = triton.__version__
        except ImportError:
            self.triton = "none"
        self.sha, self.now = _git_sha(), time.strftime("%Y-%m-%dT%H:%M:%S")

    def add(self, provider: str, mode: str, shape: str, dtype: str, ms: tuple[float, float, float],
            flops: float | None = None, extra_gib: float = float("nan"), ref_ms: float | None = None) -> None:
        p50, p20, p80 = ms
        tflops = flops / (p50 * 1e-3) / 1e12 if flops else float("nan")
        speedup = ref_ms / p50 if ref_ms else float("nan")
        self.rows.append(dict(provider=provider, mode=mode, shape=shape, dtype=dtype, p50=p50, p20=p20, p80=p80,
                              tflops=tflops, extra_gib=extra_gib, speedup=speedup))

    def print_table(self) -> None:
        print(f"\n{self.op} on {device_name()} (torch {torch.__version__}, triton {self.triton})")
        print("| op | provider | mode | shape | dtype | p50 ms | p20-p80 ms | TFLOP/s | extra GiB | x eager |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in self.rows:
            print(f"| {self.op} | {r['provider']} | {r['mode']} | {r['shape']} | {r['dtype']} | {r['p50']:.2f} | "
                  f"{r['p20']:.2f}-{r['p80']:.2f} | {r['tflops']:.1f} | {r['extra_gib']:.2f} | {r['speedup']:.2f} |")

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            for r in self.rows:
                common = dict(op=self.op, provider=r["provider"], mode=r["mode"], shape=r["shape"], dtype=r["dtype"],
                              gpu=device_name(), torch=torch.__version__, triton=self.triton, git_sha=self.sha,
                              timestamp=self.now)
                w.writerow({**common, "metric": "time", "unit": "ms", "p50": f"{r['p50']:.4f}",
                            "p20": f"{r['p20']:.4f}", "p80": f"{r['p80']:.4f}"})
                w.writerow({**common, "metric": "tflops", "unit": "TFLOP/s", "p50": f"{r['tflops']:.3f}", "p20": "",
                            "p80": ""})
                w.writerow({**common, "metric": "peak_extra_mem", "unit": "GiB", "p50": f"{r['extra_gib']:.4f}",
                            "p20": "", "p80": ""})
        print(f"appended {3 * len(self.rows)} rows to {self.path}")


def check_against_eager(ours: Callable, eager: Callable, inputs: tuple, *, floor: float = 1e-3) -> None:
    """Ours vs eager once before timing, by STYLE section 8's rule: on the loss and both gradients, ours may be
    off the fp32 eager result by twice what eager itself is off in the input dtype, plus `floor` (all relative to
    the largest fp32 value). A bf16 eager rounds its logits to bf16, ours accumulates them in fp32, so a fixed
    bf16 tolerance against bf16 eager would blame ours for eager's error (GRPO's exp(ref - logp) amplifies it).
    `inputs[0]` and `inputs[1]` are hidden and weight; the functions return a scalar loss. Exits on failure."""
    hidden, weight, rest = inputs[0], inputs[1], inputs[2:]

    def run(fn, h, w):
        loss = fn(h, w, *rest)
        return [loss.detach().float(), *(g.float() for g in torch.autograd.grad(loss, (h, w)))]

    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref32, ref_lowp, got = run(eager, h32, w32), run(eager, hidden, weight), run(ours, hidden, weight)
    for what, a, lp, r in zip(("loss", "grad_hidden", "grad_weight"), got, ref_lowp, ref32, strict=True):
        scale = r.abs().max().clamp(min=1e-12)
        err, eager_err = ((a - r).abs().max() / scale).item(), ((lp - r).abs().max() / scale).item()
        tol = 2 * eager_err + floor
        print(f"check {what}: ours {err:.2e}, eager in {hidden.dtype} {eager_err:.2e} off fp32 eager (tol {tol:.2e})")
        if not err <= tol:
            raise SystemExit(f"ours disagrees with fp32 eager on {what}: {err:.2e} > {tol:.2e}")


def with_onepass_buffer(fn: Callable, mib: int) -> Callable:
    """`fn` run with kernels._onepass.DEFAULT_BUFFER_BYTES = mib MiB (the buffer size is a tuning knob: bigger
    chunks mean fewer read-modify-writes of the [V, H] weight gradient, smaller ones less memory)."""
    from kernels import _onepass

    def run(*args):
        old = _onepass.DEFAULT_BUFFER_BYTES
        _onepass.DEFAULT_BUFFER_BYTES = mib << 20
        try:
            return fn(*args)
        finally:
            _onepass.DEFAULT_BUFFER_BYTES = old
    return run

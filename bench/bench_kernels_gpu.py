"""The decisive GPU benchmark of kernels/: every fused loss against torch eager, the cuBLAS ceiling and the goal
table, in one run sized for a short device window (about 1.5 minutes on an H100/H200, see ESTIMATE below).

    bash bench/gpu_check.sh kernels                     # on the lent GPU: CUDA tests, then this script
    python bench/bench_kernels_gpu.py [--out DIR] [--ops grpo-8x1k dpo-4x2x1k] [--compile] [--budget-s 160]
    python bench/bench_kernels_gpu.py --cpu --out /tmp/x   # CPU mode: same code paths at H=64, V=1000, N/32

Steps, in order (every row is printed as soon as it is measured, so a killed run still leaves its rows):
1. cuBLAS ceiling at the exact shapes (H=3584, V=152064, bf16) for C = 512, 1024, 2048, 4096 tokens: logits
   x[C,H] @ W[V,H]^T with an fp32 output (torch.mm out_dtype, torch >= 2.8; otherwise a bf16 output, said in
   the row), dx = d[C,V] @ W, dW += d^T @ x into a bf16 [V,H] (addmm_). TFLOP/s = 2CVH / time. The ceiling
   used for the floors is the best TFLOP/s of these 12 measurements.
2. One row per (op, config). Ops (row labels; shapes on a GPU, CPU mode divides tokens by 32):
     logprobs-16k, logprobs-4k  fused_logprobs fwd+bwd, N = 16,384 / 4,096, a random per-token upstream
                                gradient (what RL losses send)
     nll-16k                    kernels.fused_nll with token weights (token-mean SFT over 80% of the tokens),
                                N = 16,384; skipped with a line when this checkout has no fused_nll
     grpo-8x1k                  grpo_loss, 8 x 1,024 tokens, token-mean DAPO clip + k3 KL (bench/bench_grpo.py)
     dpo-4x2x1k                 dpo_loss + SFT, 4 pairs = 8 sequences x 1,024 tokens, the reference model's
                                log-probs computed no-grad inside the timed step (as bench/bench_dpo.py does)
   Configs: eager (full [N, V] logits in bf16, fp32 log_softmax, autograd; the functions of
   bench_logprobs / bench_grpo / bench_dpo), recompute (impl="recompute"), onepass-<S>M (impl="onepass" with
   kernels._onepass.DEFAULT_BUFFER_BYTES = S MiB, S = 128, 256, 512, 1024; in CPU mode the buffer is scaled by
   V / 152064 so the chunk count matches the GPU's), compile (torch.compile of eager; only with --compile, about a
   minute of compiling per op), recompute-filter (logprobs ops only: fused_logprobs(filter_eps=2^-12), the
   approximate backward that skips vocabulary tiles of negligible probability; its config cell shows the share of
   vocabulary columns kept; exec TF/s counts 8NVH, an upper bound. These random inputs have a flat softmax, so
   expect ~100% kept: the row measures the filter's overhead and error, not its gain on a real model's peaked
   distributions; never a default, never in the goal summary). DPO's reference pass follows the config:
   recompute uses logprobs_fwd (the Triton forward, as bench_dpo), onepass uses fused_logprobs(impl="onepass")
   under no_grad (cuBLAS logits per chunk).
   DPO's one-pass chunks hold whole pairs: a 2,048-token pair is more than even the 1024 MiB buffer holds, so
   the buffer grows to one pair (up to kernels._onepass.MAX_PAIR_BUFFER_BYTES) and the four onepass-<S>M DPO
   rows run the same chunks (expect equal times; they are kept to show it).
3. Phase times: the fastest recompute/onepass config of each op run once under torch.profiler; kernel time
   grouped into matmul (cuBLAS/cutlass gemm kernels), each Triton kernel of kernels/ by name (found by grepping
   `def _*_kernel` there), casts/copies/elementwise, other (with its largest kernel named). A profiler failure
   prints why and the run goes on. CPU mode profiles CPU ops instead (only to exercise the code).
4. The goal summary: per goal row, the fastest recompute/onepass config among those that meet the memory goal
   (how the defaults get chosen), and PASS/FAIL.

Columns of the row table:
  ms p50          median of 5 timed steps after 2 warmups (CPU mode: 3 after 1; CUDA events on a GPU,
                  kernels/_bench.time_ms); one step = forward + backward of both gradients (autograd.grad w.r.t.
                  hidden and weight)
  useful TF/s     useful FLOPs / time: 6NVH (logits, dH, dW) for logprobs/NLL/GRPO; DPO 8NVH (+2NVH for the
                  forward-only reference pass; no row is forward-only otherwise)
  exec TF/s       FLOPs the config executes / time: eager 6NVH; recompute 8NVH (its backward recomputes the
                  logits); onepass 6NVH for NLL/GRPO/DPO and 8NVH for logprobs (a generic autograd op: the
                  upstream gradient arrives in backward, so the logits are computed twice); DPO +2NVH everywhere
  extra GiB       peak CUDA memory above what was allocated before the step, gradients included
                  (kernels/_bench.peak_extra_gib); n/a on CPU
  err val/dH/dW   max |ours - ref| / max |ref| of the loss (logprobs: the [N] log-probs), grad_hidden and
                  grad_weight, where ref = the same eager math in fp32 on the same bf16 inputs upcast to fp32
                  (chunked over tokens: 2,048 at a time keeps the fp32 logits near 1.2 GB instead of 10 GB)
  clip flips      GRPO only: masked tokens whose clip decision (the clipped branch wins) differs between the
                  config's log-probs and the fp32 reference's. Rounding moves a token across a clip boundary
                  (ratio = 1 - clip_low or 1 + clip_high): its gradient jumps between -A * ratio and 0, an O(1)
                  difference that says nothing about precision and would dominate grad_weight's max error (a
                  vocabulary row is mostly one token's). So when flips > 0, err dH/dW are measured on the rest:
                  the flipped tokens' advantages are set to 0 on both sides (their policy-gradient term vanishes,
                  no new flips can appear), the step and the reference are rerun, and the all-token errors go to
                  the JSONL (err_*_all). err val stays the all-token loss error: the loss is continuous across a
                  clip boundary. CPU mode puts 32 tokens exactly on a boundary so that this path runs there too
  x eager         ms / eager ms, both measured in this run (the goals are ratios to this)
  x floor         ms / floor ms, floor = floor FLOPs at the measured cuBLAS ceiling: 8NVH for logprobs (exact
                  grad_weight needs the probabilities again in backward), 6NVH for NLL and GRPO (the gradient is
                  known in the forward), 8NVH for DPO (6NVH + the 2NVH reference forward)
  goal            the goal row: x eager limit, extra memory limit (GiB)
  verdict         PASS, FAIL (time / mem / error: ...), base (eager), n/a (CPU)
Results are appended to <out>/kernels_gpu.jsonl, one JSON object per ceiling measurement, row, phase profile and
skip, each with the device name, torch and triton versions, git sha and timestamp.

Robustness: every row runs inside try/except (an OOM or an exception becomes a FAIL row and the run goes on),
memory is freed between rows, and a time budget (--budget-s) stops adding rows and phases once spent, naming
what it skipped. Exit status: 0, or 2 when a row raised (a bug or an OOM to look at) or the CPU self-check of the
fp32 reference failed; goal FAILs are results, not errors.

ESTIMATE (H100/H200, from the H200 times in docs/LOG.md and the H100 ones in ENVIRONMENT.md): 32 rows x 9
steps (1 error check + 2 warmup + 5 timed + 1 memory) of 25-140 ms each ~ 25 s; fp32 references (8-10NVH in
fp32 at ~50 TFLOP/s, TF32 off, plus a 6NVH rerun per GRPO config with clip flips) ~ 10 s; Triton JIT (mostly
cached by the CUDA tests that run first), CUDA/cuBLAS start, input setup and 5 profiles ~ 30 s; python/torch
import ~ 10 s: about 75 s, half the 160 s default budget. --compile adds about a minute per op.
"""

import argparse
import gc
import inspect
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if "--cpu" in sys.argv:  # hide any GPU before torch starts, so CPU mode times and allocates on the CPU only
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, str(REPO))  # run from a plain checkout: import `kernels` and `bench`

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from bench._phases import phase_times, print_phases, triton_kernel_names  # noqa: E402
from bench.bench_logprobs import eager as eager_logp  # noqa: E402
from kernels import _onepass, dpo_loss, fused_logprobs  # noqa: E402
from kernels._bench import device_name, peak_extra_gib, time_ms  # noqa: E402

# bench_grpo and bench_dpo are imported inside their ops: if kernels/ changes under one of them (a moved helper),
# that op becomes a FAIL row instead of the whole device run dying at import.

GPU_H, GPU_V = 3584, 152064
CPU_H, CPU_V, CPU_DIV = 64, 1000, 32  # CPU mode: reduced H and V, tokens divided by CPU_DIV
CEILING_TOKENS = (512, 1024, 2048, 4096)
BUFFER_MIB = (128, 256, 512, 1024)
# Goal rows: (x eager limit, extra GiB limit); eager is measured in the same run.
GOALS = {"logprobs-16k": (0.84, 1.3), "logprobs-4k": (0.87, 1.2), "nll-16k": (0.67, 1.3), "grpo-8x1k": (0.78, 1.3),
         "dpo-4x2x1k": (0.70, 1.5)}
OURS = ("recompute", "onepass")  # exact configs only: recompute-filter is approximate and never a default
FILTER_EPS = 2.0**-12  # below bf16's resolution of a unit target-token gradient (2^-8) by a factor 16
# NVH multiples: useful work, the floor, and what each config executes (see the module docstring).
USEFUL = {"logprobs": 6, "nll": 6, "grpo": 6, "dpo": 8}
FLOOR = {"logprobs": 8, "nll": 6, "grpo": 6, "dpo": 8}
EXECUTED = {"logprobs": {"eager": 6, "compile": 6, "recompute": 8, "onepass": 8, "recompute-filter": 8},
            "nll": {"eager": 6, "compile": 6, "recompute": 8, "onepass": 6},
            "grpo": {"eager": 6, "compile": 6, "recompute": 8, "onepass": 6},
            "dpo": {"eager": 8, "compile": 8, "recompute": 10, "onepass": 8}}
COLUMNS = ["op", "config", "shape", "ms p50", "useful TF/s", "exec TF/s", "extra GiB", "err val", "err dH", "err dW",
           "clip flips", "x eager", "x floor", "goal", "verdict"]


# --------------------------------------------------------------------------------------------------- helpers
def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"  # the device machine's copy of the tree may have no .git


def short(e: BaseException) -> str:
    """One line of an exception (torch's dispatcher errors run to pages)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


def fmt(x, spec=".2f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return format(x, spec) if isinstance(x, float) else str(x)


def clean(x):
    """JSON-safe: NaN/inf -> None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def filter_stats() -> dict:
    """kernels._common.FILTER_STATS, or a dict that never changes in a checkout without filter_eps."""
    try:
        from kernels._common import FILTER_STATS
    except ImportError:
        return {"kept": 0, "seen": 0}
    return FILTER_STATS


def free_memory(collect: bool = False) -> None:
    """Return cached CUDA blocks between rows. `collect`: also break reference cycles (an exception's traceback
    holds the failed step's tensors); only then, since gc.collect costs ~0.35 s a call once dynamo is imported."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def onepass_buffer(nbytes: int | None):
    """kernels._onepass.DEFAULT_BUFFER_BYTES = nbytes for the whole step: fused_logprobs reads it again in its
    backward, so kernels/_bench.with_onepass_buffer (forward call only) is not enough here."""
    if nbytes is None:
        yield
        return
    old = _onepass.DEFAULT_BUFFER_BYTES
    _onepass.DEFAULT_BUFFER_BYTES = nbytes
    try:
        yield
    finally:
        _onepass.DEFAULT_BUFFER_BYTES = old


def rel_err(a: torch.Tensor, r: torch.Tensor) -> float:
    a, r = a.detach().float(), r.detach().float()
    return ((a - r).abs().max() / r.abs().max().clamp(min=1e-30)).item()


def step(fn: Callable, hidden, weight, upstream):
    """One forward + backward: (value detached, grad_hidden, grad_weight). value is the loss, or the [N]
    log-probs when `upstream` (the per-token gradient) is given."""
    out = fn(hidden, weight)
    gh, gw = torch.autograd.grad(out if upstream is None else (out * upstream).sum(), (hidden, weight))
    return out.detach(), gh, gw


class Guard:
    """The global time budget: after `budget_s`, nothing new starts; what was skipped is remembered."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s, self.skipped = time.monotonic(), budget_s, []

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def ok(self, what: str) -> bool:
        if self.elapsed() <= self.budget_s:
            return True
        self.skipped.append(what)
        return False


class Sink:
    """Appends JSON lines to <out>/kernels_gpu.jsonl at once (a killed run keeps what it measured)."""

    def __init__(self, out: Path, mode: str):
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = "none"
        self.path = out / "kernels_gpu.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.meta = dict(device=device_name(), mode=mode, torch=torch.__version__, triton=triton_version,
                         git_sha=git_sha(), timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.count = 0

    def write(self, kind: str, **rec) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, **{k: clean(v) for k, v in rec.items()}, **self.meta}) + "\n")
        self.count += 1


# ---------------------------------------------------------------------------------------- fp32 reference
def logp32(hidden32, weight32, targets, chunks) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([eager_logp(hidden32[s], weight32, targets[s]) for s in chunks])


class Fp32Reference:
    """The eager math in fp32 on the bf16 inputs upcast to fp32, chunked over tokens so 16,384 tokens never hold
    [N, V] fp32 logits (10 GB, three times over with autograd). The loss is a function of the [N] log-probs
    (`tail`), so: log-probs chunk by chunk (no grad); loss and g = dLoss/dlogp by autograd on the [N] vector; then
    each chunk's logits again with autograd, backward with g. Same values as unchunked fp32 eager (checked in CPU
    mode, --cpu), with TF32 off (torch's default for fp32 matmuls, forced in main)."""

    def __init__(self, hidden, weight, targets, chunk: int):
        self.h32 = hidden.detach().float()
        self.w32 = weight.detach().float().requires_grad_()
        self.targets = targets
        n = hidden.shape[0]
        self.chunks = [slice(s, min(n, s + chunk)) for s in range(0, n, chunk)]
        self.logp = logp32(self.h32, self.w32.detach(), targets, self.chunks)

    def __call__(self, tail: Callable[[torch.Tensor], torch.Tensor]):
        """(loss, grad_hidden, grad_weight) in fp32 of tail(logp)."""
        lp = self.logp.clone().requires_grad_()
        loss = tail(lp)
        (g,) = torch.autograd.grad(loss, lp)
        dh, dw = torch.empty_like(self.h32), torch.zeros_like(self.w32)
        for s in self.chunks:
            hc = self.h32[s].detach().requires_grad_()
            gh, gw = torch.autograd.grad(eager_logp(hc, self.w32, self.targets[s]), (hc, self.w32),
                                         grad_outputs=g[s])
            dh[s] = gh
            dw += gw
            del gh, gw
        return loss.detach(), dh, dw


# -------------------------------------------------------------------------------------------------- ops
@dataclass
class Config:
    name: str  # row label: eager, recompute, onepass-256M, compile
    impl: str  # eager, compile, recompute, onepass: selects the executed FLOPs
    fn: Callable  # fn(hidden, weight) -> loss, or [N] log-probs for logprobs ops
    buffer_bytes: int | None = None


@dataclass
class Op:
    name: str  # goal row label
    kind: str  # logprobs, nll, grpo, dpo
    shape: str
    n: int
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    fns: dict  # impl -> fn(hidden, weight)
    tail: Callable  # fp32 [N] log-probs -> the loss the fns compute (for the reference)
    upstream: torch.Tensor | None = None  # logprobs: per-token upstream gradient; the value is then [N] logp
    eager32: Callable | None = None  # eager on fp32 hidden/weight (CPU self-check), when fns["eager"] is not
    grpo: dict = field(default_factory=dict)  # GRPO: mask, decision(logp), variant(flip) -> (fns, tail)


def logprobs_op(name, n, h, v, dtype, dev, seed) -> Op:
    g = torch.Generator(device=dev).manual_seed(seed)
    hidden = torch.randn(n, h, device=dev, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device=dev, dtype=dtype, generator=g) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=dev, generator=g)
    upstream = torch.randn(n, device=dev, generator=g)  # per-token upstream gradient, as RL losses send
    fns = {"eager": lambda hh, ww: eager_logp(hh, ww, targets),
           "recompute": lambda hh, ww: fused_logprobs(hh, ww, targets),
           "onepass": lambda hh, ww: fused_logprobs(hh, ww, targets, impl="onepass"),
           "recompute-filter": lambda hh, ww: fused_logprobs(hh, ww, targets, filter_eps=FILTER_EPS)}
    return Op(name, "logprobs", f"N={n} H={h} V={v}", n, hidden, weight, targets, fns,
              tail=lambda lp: (lp * upstream).sum(), upstream=upstream)


def nll_op(name, n, h, v, dtype, dev, seed) -> Op:
    g = torch.Generator(device=dev).manual_seed(seed)
    hidden = torch.randn(n, h, device=dev, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device=dev, dtype=dtype, generator=g) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=dev, generator=g)
    keep = torch.rand(n, device=dev, generator=g) > 0.2  # 20% prompt tokens with weight 0
    wts = keep.float() / keep.sum()  # token-mean SFT

    def nll(impl):
        return lambda hh, ww: kernels.fused_nll(hh, ww, targets, wts, impl=impl)

    fns = {"eager": lambda hh, ww: -(wts * eager_logp(hh, ww, targets)).sum(), "recompute": nll("recompute"),
           "onepass": nll("onepass")}
    return Op(name, "nll", f"N={n} H={h} V={v}", n, hidden, weight, targets, fns, tail=lambda lp: -(wts * lp).sum())


def clip_decision(logp, old, adv):
    """bench_grpo's clip: True where the clipped branch wins (the token then gets no policy gradient)."""
    from bench.bench_grpo import CLIP_HIGH, CLIP_LOW

    ratio = torch.exp((logp - old).clamp(-20, 20))
    return -adv * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH) > -adv * ratio


def grpo_tail(old, ref, mask):
    """bench_grpo.eager_grpo after its log-probs (kept identical; the CPU self-check compares the two)."""
    from bench.bench_grpo import CLIP_HIGH, CLIP_LOW, KL_COEF

    def tail(adv):
        def loss(lp):
            ratio = torch.exp((lp - old).clamp(-20, 20))
            pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
            kl = torch.exp(ref - lp) - (ref - lp) - 1
            m = mask.float()
            return ((pg + KL_COEF * kl) * m).sum() / m.sum()
        return loss
    return tail


def grpo_op(name, b, t, h, v, dtype, dev, seed, boundary_tokens: int = 0) -> Op:
    from bench.bench_grpo import CLIP_HIGH, CLIP_LOW, eager_grpo, ours_grpo
    from bench.bench_grpo import make_inputs as grpo_inputs

    n = b * t
    hidden, weight, targets, adv, old, ref, mask = grpo_inputs(n, h, v, dtype, dev, seed)
    if boundary_tokens:
        # CPU mode: put some masked tokens exactly on a clip boundary of the fp32 reference (ratio = 1 - clip_low
        # or 1 + clip_high), so that rounding flips a few decisions and the clip-flip path runs here too; the GPU
        # keeps bench_grpo's inputs, where bf16 eager flips tokens by itself.
        idx = torch.nonzero(mask).flatten()[:boundary_tokens]
        lp = logp32(hidden.detach().float(), weight.detach().float(), targets, [idx])
        bound = torch.tensor([1 + CLIP_HIGH, 1 - CLIP_LOW], device=dev).repeat(len(idx))[:len(idx)]
        old[idx] = lp - bound.log()

    def fns(adv_):
        rest = (targets, adv_, old, ref, mask)
        return {"eager": lambda hh, ww: eager_grpo(hh, ww, *rest),
                "recompute": lambda hh, ww: ours_grpo(hh, ww, *rest),
                "onepass": lambda hh, ww: ours_grpo(hh, ww, *rest, impl="onepass")}

    tail = grpo_tail(old, ref, mask)
    # Per-config log-probs for the clip decision: the same forward each loss runs (eager's log_softmax, the Triton
    # forward for recompute, the one-pass chunks for onepass, under the row's buffer setting).
    logp_fns = {"eager": lambda hh, ww: eager_logp(hh, ww, targets),
                "recompute": lambda hh, ww: fused_logprobs(hh, ww, targets),
                "onepass": lambda hh, ww: fused_logprobs(hh, ww, targets, impl="onepass")}
    extra = dict(mask=mask, logp_fns=logp_fns, decision=lambda lp: clip_decision(lp, old, adv),
                 variant=lambda flip: (fns(adv.masked_fill(flip, 0.0)), tail(adv.masked_fill(flip, 0.0))))
    return Op(name, "grpo", f"B={b} T={t} H={h} V={v}", n, hidden, weight, targets, fns(adv),
              tail=tail(adv), grpo=extra)


def onepass_dpo(hidden, weight, ref_weight, targets, mask, cu, is_chosen):
    """bench_dpo.ours_dpo with impl="onepass" for the reference pass too (cuBLAS logits per chunk, no grad)."""
    from bench.bench_dpo import BETA, SFT_WEIGHT, _seq_sums

    with torch.no_grad():
        ref_lp = fused_logprobs(hidden, ref_weight, targets, impl="onepass")
    ref_seq = _seq_sums(ref_lp * mask, cu)  # the masked sequence sums (the bench's sequences are all T long)
    return dpo_loss(hidden, weight, targets, mask, cu, is_chosen, ref_seq[is_chosen], ref_seq[~is_chosen],
                    beta=BETA, sft_weight=SFT_WEIGHT, sft_norm="token-mean", impl="onepass")[0]


def dpo_op(name, pairs, t, h, v, dtype, dev, seed, ref_chunk) -> Op:
    from bench.bench_dpo import BETA, SFT_WEIGHT, _seq_sums, eager_dpo, ours_dpo
    from bench.bench_dpo import make_inputs as dpo_inputs

    b = 2 * pairs
    hidden, weight, ref_weight, targets, mask, cu, is_chosen = dpo_inputs(b, t, h, v, dtype, dev, seed)
    rest = (targets, mask, cu, is_chosen)
    fns = {"eager": lambda hh, ww: eager_dpo(hh, ww, ref_weight, *rest),
           "recompute": lambda hh, ww: ours_dpo(hh, ww, ref_weight, *rest),
           "onepass": lambda hh, ww: onepass_dpo(hh, ww, ref_weight, *rest)}
    h32 = hidden.detach().float()
    n = hidden.shape[0]
    chunks = [slice(s, min(n, s + ref_chunk)) for s in range(0, n, ref_chunk)]
    ref_lp32 = logp32(h32, ref_weight.float(), targets, chunks)  # the fp32 reference's own reference pass
    del h32

    def tail(lp):  # bench_dpo.eager_dpo after its log-probs (the CPU self-check compares the two)
        m = mask.float()
        ref_seq = _seq_sums(ref_lp32 * m, cu)
        seq = _seq_sums(lp * m, cu)
        margin = (seq[is_chosen] - ref_seq[is_chosen]) - (seq[~is_chosen] - ref_seq[~is_chosen])
        dpo = -F.logsigmoid(BETA * margin).mean()
        tok_chosen = is_chosen.repeat_interleave(cu[1:] - cu[:-1])
        sft = -(lp * m)[tok_chosen].sum() / m[tok_chosen].sum()
        return dpo + SFT_WEIGHT * sft

    return Op(name, "dpo", f"P={pairs} T={t} H={h} V={v}", n, hidden, weight, targets, fns, tail=tail,
              eager32=lambda hh, ww: eager_dpo(hh, ww, ref_weight.float(), *rest))


def build_op(name: str, cpu: bool, dtype, dev, ref_chunk: int) -> Op:
    h, v, div = (CPU_H, CPU_V, CPU_DIV) if cpu else (GPU_H, GPU_V, 1)
    seed = list(GOALS).index(name)
    if name == "logprobs-16k":
        return logprobs_op(name, 16384 // div, h, v, dtype, dev, seed)
    if name == "logprobs-4k":
        return logprobs_op(name, 4096 // div, h, v, dtype, dev, seed)
    if name == "nll-16k":
        return nll_op(name, 16384 // div, h, v, dtype, dev, seed)
    if name == "grpo-8x1k":
        return grpo_op(name, 8, 1024 // div, h, v, dtype, dev, seed, boundary_tokens=32 if cpu else 0)
    return dpo_op(name, 4, 1024 // div, h, v, dtype, dev, seed, ref_chunk)


def filter_supported() -> bool:
    """Whether this checkout's fused_logprobs takes filter_eps (older ones, benched for a baseline, do not)."""
    return "filter_eps" in inspect.signature(fused_logprobs).parameters


def configs(op: Op, cpu: bool, with_compile: bool) -> list[Config]:
    v = op.weight.shape[0]
    out = [Config("eager", "eager", op.fns["eager"]), Config("recompute", "recompute", op.fns["recompute"])]
    for mib in BUFFER_MIB:
        # CPU mode: scale the buffer by V / 152064 so it holds as many tokens (and makes as many chunks) as on a GPU
        nbytes = round((mib << 20) * v / GPU_V) if cpu else mib << 20
        out.append(Config(f"onepass-{mib}M", "onepass", op.fns["onepass"], nbytes))
    if "recompute-filter" in op.fns and filter_supported():
        out.append(Config("recompute-filter", "recompute-filter", op.fns["recompute-filter"]))
    if with_compile:  # last: its first call compiles for about a minute, and the time guard may stop it
        out.append(Config("compile", "compile", torch.compile(op.fns["eager"])))
    return out


# ------------------------------------------------------------------------------------------ measurements
def runs(fn: Callable) -> bool:
    try:
        fn()
        return True
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def ceiling_at(c: int, w: torch.Tensor, g: torch.Generator, warmup: int, reps: int) -> list:
    """[(product, output kind, p50 ms)] of the three products for C = c tokens (its buffers die on return)."""
    v, h = w.shape
    x = torch.randn(c, h, device=w.device, generator=g).to(w.dtype)
    d = (torch.randn(c, v, device=w.device, generator=g) * 1e-3).to(w.dtype)
    z = torch.empty(c, v, device=w.device, dtype=torch.float32)
    dx = torch.empty(c, h, device=w.device, dtype=w.dtype)
    dw = torch.zeros(v, h, device=w.device, dtype=w.dtype)
    # The one-pass path asks cuBLAS for fp32 logits straight from bf16 operands (torch >= 2.8 on CUDA, the call
    # kernels/_onepass._mm_into makes); where that is missing, time its fallback (bf16 output, then upcast).
    logits_calls = [("fp32 (out_dtype)", lambda: torch.mm(x, w.T, out_dtype=torch.float32, out=z)),
                    ("bf16, then copy to fp32 (no out_dtype)", lambda: z.copy_(torch.mm(x, w.T)))]
    logits_out, logits = next((kind, fn) for kind, fn in logits_calls if runs(fn))
    products = [("logits x @ W^T", logits_out, logits), ("dx = d @ W", "bf16", lambda: torch.mm(d, w, out=dx)),
                ("dW += d^T @ x", "bf16 (addmm_)", lambda: dw.addmm_(d.T, x))]
    return [(name, kind, time_ms(fn, warmup=warmup, reps=reps)[0]) for name, kind, fn in products]


def measure_ceiling(cpu: bool, dev, warmup: int, reps: int, sink: Sink, guard: Guard) -> float:
    """Best TFLOP/s of the three cuBLAS products at the exact shapes; prints its own small table."""
    h, v, div = (CPU_H, CPU_V, CPU_DIV) if cpu else (GPU_H, GPU_V, 1)
    dtype = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(v, h, device=dev, generator=g) * h**-0.5).to(dtype)
    print(f"\ncuBLAS ceiling, bf16 operands, H={h} V={v} ({'CPU mode: meaningless times' if cpu else device_name()})")
    print("| product | C tokens | output | ms p50 | TFLOP/s |")
    print("|---|---|---|---|---|")
    best = float("nan")
    for c in (t // div for t in CEILING_TOKENS):
        if not guard.ok(f"ceiling C={c}"):
            break
        try:
            for name, out_kind, ms in ceiling_at(c, w, g, warmup, reps):
                tflops = 2 * c * v * h / (ms * 1e-3) / 1e12
                best = tflops if math.isnan(best) else max(best, tflops)
                print(f"| {name} | {c} | {out_kind} | {ms:.3f} | {tflops:.1f} |", flush=True)
                sink.write("ceiling", product=name, tokens=c, hidden=h, vocab=v, output=out_kind, ms_p50=ms,
                           tflops=tflops)
        except Exception as e:  # noqa: BLE001 - a failed shape is reported, the run goes on
            print(f"| ceiling C={c} | FAIL {short(e)} |", flush=True)
        free_memory()
    print(f"ceiling used for the floors: {fmt(best, '.1f')} TFLOP/s")
    return best


def print_header() -> None:
    print("\n| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))


def run_row(op: Op, cfg: Config, ref_out, ref: Fp32Reference, eager_ms, ceiling, cpu, args) -> dict:
    """Measure one (op, config); returns the row dict (printed and written by the caller)."""
    nvh = op.n * op.weight.shape[0] * op.weight.shape[1]
    row = dict(op=op.name, config=cfg.name, shape=op.shape, dtype=str(op.hidden.dtype).removeprefix("torch."),
               impl=cfg.impl, buffer_mib=None if cfg.buffer_bytes is None else cfg.buffer_bytes / 2**20)
    with onepass_buffer(cfg.buffer_bytes):
        def call():
            return step(cfg.fn, op.hidden, op.weight, op.upstream)

        stats = filter_stats()
        before = dict(stats)
        out = call()  # also the first call: Triton JIT and torch.compile happen here, outside the timing
        if stats["seen"] > before["seen"]:
            row["filter_kept"] = (stats["kept"] - before["kept"]) / (stats["seen"] - before["seen"])
        errs = [rel_err(a, r) for a, r in zip(out, ref_out, strict=True)]
        del out
        row.update(err_val_all=errs[0], err_dh_all=errs[1], err_dw_all=errs[2], clip_flips=None)
        if op.grpo and cfg.impl in op.grpo["logp_fns"]:
            with torch.no_grad():
                lp = op.grpo["logp_fns"][cfg.impl](op.hidden, op.weight)
            flip = (op.grpo["decision"](lp) != op.grpo["decision"](ref.logp)) & op.grpo["mask"]
            row["clip_flips"] = int(flip.sum())
            del lp
            if row["clip_flips"]:
                fns, tail = op.grpo["variant"](flip)
                out = step(fns[cfg.impl], op.hidden, op.weight, op.upstream)
                ref_rest = ref(tail)
                # The loss itself is continuous across a clip boundary (only its slope jumps), so its error stays
                # the all-token one; zeroing advantages could also cancel the loss to near 0 and blow up its
                # relative error.
                errs = [errs[0]] + [rel_err(a, r) for a, r in zip(out[1:], ref_rest[1:], strict=True)]
                del out, ref_rest
        row.update(err_val=errs[0], err_dh=errs[1], err_dw=errs[2])
        free_memory()
        p50, p20, p80 = time_ms(call, warmup=args.warmup, reps=args.reps)
        gib = peak_extra_gib(call)
    useful = USEFUL[op.kind] * nvh
    executed = EXECUTED[op.kind][cfg.impl] * nvh
    floor_ms = FLOOR[op.kind] * nvh / (ceiling * 1e12) * 1e3 if ceiling and not math.isnan(ceiling) else math.nan
    row.update(ms_p50=p50, ms_p20=p20, ms_p80=p80, useful_tflops=useful / (p50 * 1e-3) / 1e12,
               exec_tflops=executed / (p50 * 1e-3) / 1e12, extra_gib=gib,
               x_eager=p50 / eager_ms if eager_ms else math.nan, x_floor=p50 / floor_ms, floor_ms=floor_ms)
    row["verdict"] = verdict(row, op.name, cpu)
    return row


def verdict(row: dict, goal_name: str, cpu: bool) -> str:
    if row.get("error"):
        return f"FAIL (error: {row['error']})"
    if cpu:
        return "n/a (CPU)"
    if row["impl"] == "eager":
        return "base"
    max_x, max_gib = GOALS[goal_name]
    why = []
    if math.isnan(row["x_eager"]):
        why.append("time: no eager row")
    elif row["x_eager"] > max_x:
        why.append("time")
    if not row["extra_gib"] <= max_gib:
        why.append("mem")
    return "PASS" if not why else f"FAIL ({', '.join(why)})"


def print_row(row: dict) -> None:
    goal = GOALS[row["op"]]
    config = row["config"] + (f" (kept {row['filter_kept']:.1%})" if row.get("filter_kept") is not None else "")
    cells = [row["op"], config, row["shape"], fmt(row.get("ms_p50")), fmt(row.get("useful_tflops"), ".1f"),
             fmt(row.get("exec_tflops"), ".1f"), fmt(row.get("extra_gib")), fmt(row.get("err_val"), ".1e"),
             fmt(row.get("err_dh"), ".1e"), fmt(row.get("err_dw"), ".1e"), fmt(row.get("clip_flips")),
             fmt(row.get("x_eager")), fmt(row.get("x_floor")), f"<={goal[0]}x, <={goal[1]} GiB", row["verdict"]]
    print("| " + " | ".join(cells) + " |", flush=True)


# ------------------------------------------------------------------------------------------------- main
def self_check(op: Op, ref_out) -> bool:
    """CPU mode: the chunked fp32 reference (with its copied loss tails) against unchunked fp32 eager."""
    h32 = op.hidden.detach().float().requires_grad_()
    w32 = op.weight.detach().float().requires_grad_()
    got = step(op.eager32 or op.fns["eager"], h32, w32, op.upstream)
    errs = [rel_err(r, a) for a, r in zip(got, ref_out, strict=True)]
    ok = max(errs) < 1e-4
    print(f"self-check {op.name}: chunked fp32 reference vs unchunked fp32 eager: value {errs[0]:.1e}, "
          f"dH {errs[1]:.1e}, dW {errs[2]:.1e}: {'ok' if ok else 'FAIL'}")
    return ok


def run_op(name: str, args, cpu: bool, dev, ceiling: float, sink: Sink, guard: Guard, triton_names) -> dict:
    """All rows of one op; returns {rows, phases, errors, selfcheck_ok}."""
    result = dict(rows=[], phase=None, errors=0, selfcheck_ok=True)
    op = build_op(name, cpu, torch.bfloat16, dev, args.ref_chunk)
    ref = Fp32Reference(op.hidden, op.weight, op.targets, args.ref_chunk)
    loss, dh, dw = ref(op.tail)
    ref_out = (ref.logp if op.upstream is not None else loss, dh, dw)
    if cpu:
        result["selfcheck_ok"] = self_check(op, ref_out)
    eager_ms = None
    for cfg in configs(op, cpu, args.compile):
        if not guard.ok(f"{name} {cfg.name}"):
            continue
        try:
            row = run_row(op, cfg, ref_out, ref, eager_ms, ceiling, cpu, args)
        except Exception as e:  # noqa: BLE001 - an OOM or a bug becomes a FAIL row; the run goes on
            row = dict(op=name, config=cfg.name, shape=op.shape, impl=cfg.impl, error=short(e))
            row["verdict"] = verdict(row, name, cpu)
            result["errors"] += 1
            del e
        free_memory(collect="error" in row)
        if cfg.impl == "eager" and row.get("ms_p50"):
            eager_ms = row["ms_p50"]
        print_row(row)
        sink.write("row", **row)
        result["rows"].append(row)
    ours = [r for r in result["rows"] if r["impl"] in OURS and r.get("ms_p50")]
    if ours and guard.ok(f"{name} phase profile"):
        best = min(ours, key=lambda r: r["ms_p50"])
        cfg = next(c for c in configs(op, cpu, False) if c.name == best["config"])
        try:
            with onepass_buffer(cfg.buffer_bytes):
                ph = phase_times(lambda: step(cfg.fn, op.hidden, op.weight, op.upstream), dev == "cuda",
                                 triton_names)
            ph.update(op=name, config=cfg.name, ms_p50=best["ms_p50"])
            result["phase"] = ph
            sink.write("phase", op=name, config=cfg.name, ms_p50=best["ms_p50"], triton_kernels_ms=ph["triton"],
                       other_top=ph["other_top"], other_top_ms=ph["other_top_ms"],
                       **{f"{k}_ms": v for k, v in ph["groups"].items()})
        except Exception as e:  # noqa: BLE001 - the profile is a diagnostic: report and go on
            print(f"phase profile {name} {cfg.name}: failed, {short(e)}", flush=True)
    return result  # op, ref and their tensors die here; the caller frees the cache


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU mode (reduced shapes; also forced when CUDA is missing)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for kernels_gpu.jsonl")
    p.add_argument("--ops", nargs="+", default=list(GOALS), choices=list(GOALS), help="goal rows to run")
    p.add_argument("--compile", action="store_true", help="add torch.compile of eager (about a minute per op)")
    p.add_argument("--budget-s", type=float, default=None, help="start nothing new after this (default 160, CPU 100)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (default 2, CPU 1)")
    p.add_argument("--reps", type=int, default=None, help="timed steps, the median is reported (default 5, CPU 3)")
    p.add_argument("--ref-chunk", type=int, default=None, help="tokens per chunk of the fp32 reference")
    args = p.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()
    dev = "cpu" if cpu else "cuda"
    args.budget_s = args.budget_s or (100.0 if cpu else 160.0)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 2)
    args.reps = args.reps or (3 if cpu else 5)
    if cpu:  # two shared cores here: more threads than cores only adds contention to tiny matmuls
        torch.set_num_threads(1)
    args.ref_chunk = args.ref_chunk or (64 if cpu else 2048)
    # The fp32 reference must be fp32: TF32 would round its inputs to 10 mantissa bits (torch's default is off).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    guard, sink = Guard(args.budget_s), Sink(args.out, "cpu" if cpu else "gpu")
    print(f"bench_kernels_gpu on {sink.meta['device']} (torch {sink.meta['torch']}, triton {sink.meta['triton']}, "
          f"git {sink.meta['git_sha']}, {sink.meta['timestamp']}); budget {args.budget_s:.0f} s")
    if cpu:
        print(f"CPU mode: H={CPU_H} V={CPU_V}, tokens / {CPU_DIV}; times are not comparable and no verdicts")
    ceiling = measure_ceiling(cpu, dev, args.warmup, args.reps, sink, guard)
    triton_names = triton_kernel_names()
    results = {}
    print_header()
    for name in args.ops:
        if name == "nll-16k" and not hasattr(kernels, "fused_nll"):
            print("fused_nll: not in this checkout, skipped", flush=True)
            sink.write("skip", op=name, why="kernels.fused_nll not in this checkout")
            continue
        if not guard.ok(f"{name} (all rows)"):
            continue
        try:
            results[name] = run_op(name, args, cpu, dev, ceiling, sink, guard, triton_names)
            free_memory(collect=True)
        except Exception as e:  # noqa: BLE001 - e.g. an OOM building the inputs or the reference
            print(f"| {name} | (setup) | FAIL (error: {short(e)}) |", flush=True)
            sink.write("row", op=name, config="(setup)", error=short(e), verdict="FAIL (error)")
            results[name] = dict(rows=[], phase=None, errors=1, selfcheck_ok=True)
            del e
            free_memory(collect=True)
    print_phases(results, cpu)
    print_goals(results, cpu)
    if guard.skipped:
        print(f"\nskipped after the {args.budget_s:.0f} s budget: {', '.join(guard.skipped)}")
        sink.write("skip", what=guard.skipped, why=f"time budget {args.budget_s:.0f} s spent")
    errors = sum(r["errors"] for r in results.values())
    selfcheck = all(r["selfcheck_ok"] for r in results.values())
    print(f"\n{sink.count} records appended to {sink.path}; {guard.elapsed():.0f} s; "
          f"{errors} rows raised; fp32 reference self-check {'ok' if selfcheck else 'FAILED'}"
          f"{'' if cpu else ' (CPU mode only)'}")
    return 0 if errors == 0 and selfcheck else 2


def print_goals(results: dict, cpu: bool) -> None:
    print("\ngoal summary: the fastest recompute/onepass config within the memory goal (the default to choose)")
    print("| goal row | goal | eager ms | fastest within memory | ms | x eager | extra GiB | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (max_x, max_gib) in GOALS.items():
        rows = results.get(name, {}).get("rows", [])
        eager = next((r for r in rows if r["impl"] == "eager" and r.get("ms_p50")), None)
        ours = [r for r in rows if r["impl"] in OURS and r.get("ms_p50")]
        fits = ours if cpu else [r for r in ours if r["extra_gib"] <= max_gib]
        goal = f"<={max_x}x, <={max_gib} GiB"
        if not rows:
            print(f"| {name} | {goal} | - | no rows | - | - | - | - |")
            continue
        if not fits:
            print(f"| {name} | {goal} | {fmt(eager and eager['ms_p50'])} | none within {max_gib} GiB | - | - | - | "
                  f"FAIL (mem) |")
            continue
        best = min(fits, key=lambda r: r["ms_p50"])
        print(f"| {name} | {goal} | {fmt(eager and eager['ms_p50'])} | {best['config']} | {fmt(best['ms_p50'])} | "
              f"{fmt(best['x_eager'])} | {fmt(best['extra_gib'])} | {best['verdict']} |")


if __name__ == "__main__":
    sys.exit(main())

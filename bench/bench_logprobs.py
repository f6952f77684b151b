"""Benchmark per-token log-probs from hidden states: ours (Triton on CUDA, chunked torch on CPU) vs full logits.

    python bench/bench_logprobs.py                      # CUDA: H=3584 V=152064 N=4096,16384 bf16; CPU: reduced
    python bench/bench_logprobs.py --tokens 4096 --compile --modes fwd+bwd

Providers: ours, onepass (ours with impl="onepass": cuBLAS logits per chunk + Triton row kernels), eager
((hidden @ weight.T).float().log_softmax(-1).gather), compile (torch.compile of eager, GPU
and --compile only), liger / cce (Liger-Kernel FLCE, Cut Cross-Entropy; only when importable, reduction "none").
Modes: fwd, and fwd+bwd with a random per-token upstream gradient (what RL losses send).
FLOPs: TFLOP/s use the useful count, fwd 2NVH and fwd+bwd 6NVH for every provider. Ours executes 2NVH forward
and 6NVH backward (logits recompute + grad_hidden + grad_weight), i.e. 8NVH for fwd+bwd.
Memory: peak CUDA memory above the inputs during the call, gradients included.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout: import kernels without install

import torch  # noqa: E402

from kernels import fused_logprobs  # noqa: E402
from kernels._bench import Results, peak_extra_gib, time_ms, with_onepass_buffer  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def providers(args) -> dict:
    """name -> fn(hidden, weight, targets) returning [N] fp32 log-probs, differentiable."""
    out = {"eager": eager, "ours": lambda h, w, t: fused_logprobs(h, w, t),  # eager first: the x-eager base
           "onepass": lambda h, w, t: fused_logprobs(h, w, t, impl="onepass")}
    if torch.cuda.is_available():  # the one-pass buffer (default 512 MiB) is the knob to tune on a GPU
        out["onepass-1024M"] = with_onepass_buffer(out["onepass"], 1024)
    if args.compile and torch.cuda.is_available():
        out["compile"] = torch.compile(eager)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
        out["liger"] = lambda h, w, t: -liger(w, h, t)
    except ImportError:
        print("liger: liger_kernel not importable, skipped")
    try:
        from cut_cross_entropy import linear_cross_entropy
        out["cce"] = lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none")
    except ImportError:
        print("cce: cut_cross_entropy not importable, skipped")
    return {k: v for k, v in out.items() if k in args.providers or args.providers == ["all"]}


def make_call(fn, mode: str, hidden, weight, targets, g):
    """A no-argument callable running one fwd, or one fwd+bwd with upstream gradient g (no .grad accumulation)."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(hidden, weight, targets)
    else:
        def call():
            return torch.autograd.grad((fn(hidden, weight, targets) * g).sum(), [hidden, weight])
    return call


def check_once(device, dtype, h: int, v: int, impl: str = "recompute") -> None:
    """Ours vs an fp32 full-logits reference at a small N: log-probs and both gradients."""
    n = 256
    hidden = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    g = torch.randn(n, device=device)
    out = fused_logprobs(hidden, weight, targets, impl=impl)
    gh, gw = torch.autograd.grad((out * g).sum(), [hidden, weight])
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = eager(h32, w32, targets)
    rh, rw = torch.autograd.grad((ref * g).sum(), [h32, w32])
    errs = {"logp": (out - ref).abs().max().item(),
            "grad_hidden rel": ((gh.float() - rh).abs().max() / rh.abs().max()).item(),
            "grad_weight rel": ((gw.float() - rw).abs().max() / rw.abs().max()).item()}
    shown = ", ".join(f"{k} {e:.2e}" for k, e in errs.items())
    print(f"check {impl} vs fp32 eager (N={n}, H={h}, V={v}, {dtype}): {shown}")
    bound = 1e-3 if dtype == torch.float32 else 3e-2  # bf16 inputs: dlogits enter the grad matmuls in bf16
    if max(errs.values()) > bound:
        raise SystemExit(f"ours disagrees with eager beyond {bound}: {errs}")


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384] if cuda else [512], help="N values")
    p.add_argument("--hidden", type=int, default=3584 if cuda else 256, help="H")
    p.add_argument("--vocab", type=int, default=152064 if cuda else 4096, help="V")
    p.add_argument("--dtype", choices=DTYPES, default="bf16" if cuda else "fp32")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--providers", nargs="+", default=["all"],
                   help="subset of: ours onepass onepass-1024M eager compile liger cce")
    p.add_argument("--compile", action="store_true", help="add torch.compile of eager (GPU only; ~1 min compile)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    device, dtype = ("cuda" if cuda else "cpu"), DTYPES[args.dtype]
    h, v = args.hidden, args.vocab
    torch.manual_seed(0)
    for impl in ("recompute", "onepass"):
        check_once(device, dtype, h, v, impl)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_()
    res, provs = Results("logprobs", args.out), providers(args)
    print("FLOPs: fwd 2NVH; fwd+bwd useful 6NVH (ours executes 8NVH: fwd 2 + recompute 2 + dH 2 + dW 2)")
    for n in args.tokens:
        hidden = torch.randn(n, h, device=device).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), device=device)
        g = torch.randn(n, device=device)  # per-token upstream gradient, as RL losses send
        shape = f"N={n} H={h} V={v}"
        for mode in args.modes:
            ref_ms = None
            for name, fn in provs.items():
                call = make_call(fn, mode, hidden, weight, targets, g)
                flops = (2 if mode == "fwd" else 6) * n * v * h
                try:
                    ms = time_ms(call, warmup=args.warmup, reps=args.reps)
                    gib = peak_extra_gib(call)
                except torch.OutOfMemoryError:
                    print(f"{name} {mode} {shape}: out of memory, skipped")
                    torch.cuda.empty_cache()
                    continue
                if name == "eager":
                    ref_ms = ms[0]
                res.add(name, mode, shape, args.dtype, ms, flops=flops, extra_gib=gib, ref_ms=ref_ms)
    res.print_table()
    res.write()


if __name__ == "__main__":
    main()

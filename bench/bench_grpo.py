"""Benchmark the GRPO loss from hidden states, forward + backward: ours (gradient in the forward) vs torch eager.

    python bench/bench_grpo.py [--out bench/results] [--reps 10]

Providers: `ours` = kernels.grpo_loss (no [N, V] logits; impl="recompute"); `onepass` = the same with
impl="onepass" (each chunk's logits computed once by cuBLAS into a [C, V] buffer: 6NVH); `eager` = full logits
[N, V] in the input dtype, fp32 log_softmax, the same loss, autograd; `liger` = Liger-Kernel's
LigerFusedLinearGRPOLoss (only when importable; timing only: it takes one advantage per sequence and normalises its
own way, so its loss is not compared). Shapes: CUDA = Qwen2.5-VL-7B head (H=3584, V=152064, bf16), 8 sequences x
1024 tokens; CPU = a reduced shape that finishes in seconds. TFLOP/s use the useful count for every provider,
6*N*V*H (logits 2NVH, grad_hidden 2NVH, grad_weight 2NVH); ours executes 8NVH (its backward recomputes the
logits), onepass 6NVH. The [N]-sized loss math is ignored.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout: import `kernels`

import torch  # noqa: E402

from kernels._bench import (  # noqa: E402
    Results,
    check_against_eager,
    peak_extra_gib,
    time_ms,
    with_onepass_buffer,
)
from kernels.grpo_loss import grpo_loss  # noqa: E402

CLIP_LOW, CLIP_HIGH, KL_COEF = 0.2, 0.28, 0.01


def eager_grpo(hidden, weight, targets, adv, old, ref, mask):
    """The plain baseline: full logits, fp32 log_softmax, token-mean DAPO clip + k3 KL, autograd."""
    logits = hidden @ weight.T  # [N, V] in the input dtype
    logp = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).squeeze(1)
    ratio = torch.exp((logp - old).clamp(-20, 20))
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    m = mask.float()
    return ((pg + KL_COEF * kl) * m).sum() / m.sum()


def ours_grpo(hidden, weight, targets, adv, old, ref, mask, impl="recompute"):
    return grpo_loss(hidden, weight, targets, adv, old, mask, ref_logprobs=ref, clip_low=CLIP_LOW,
                     clip_high=CLIP_HIGH, kl_coef=KL_COEF, kl_estimator="k3", impl=impl)[0]


def onepass_grpo(*inputs):
    return ours_grpo(*inputs, impl="onepass")


def liger_grpo(b, t):
    """Liger-Kernel's fused GRPO loss on the same tensors viewed as [B, T]; None when it is not installed."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    loss = LigerFusedLinearGRPOLoss(beta=KL_COEF, epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH, loss_type="dapo",
                                    compiled=torch.cuda.is_available(), use_ref_model=True)

    def fn(hidden, weight, targets, adv, old, ref, mask):
        out = loss(hidden.view(b, t, -1), weight, targets.view(b, t), mask.view(b, t).long(), adv.view(b, t)[:, 0],
                   ref_per_token_logps=ref.view(b, t), old_per_token_logps=old.view(b, t))
        return out[0] if isinstance(out, tuple) else out
    return fn


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(n, h, device=device, dtype=dtype, generator=g)).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=g) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    with torch.no_grad():  # old/ref log-probs near the policy's, so ratios sit around 1 as in training
        logp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(1, targets[:, None]).squeeze(1)
    old = logp + 0.1 * torch.randn(n, device=device, generator=g)
    ref = logp + 0.1 * torch.randn(n, device=device, generator=g)
    adv = torch.randn(n, device=device, generator=g)
    mask = torch.rand(n, device=device, generator=g) > 0.2
    del logp
    return hidden, weight, targets, adv, old, ref, mask


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results", help="folder for grpo_loss.csv")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    b, t, h, v = (8, 1024, 3584, 152064) if cuda else (4, 128, 256, 4096)
    n = b * t
    inputs = make_inputs(n, h, v, dtype, device)
    for fn in (ours_grpo, onepass_grpo):
        check_against_eager(fn, eager_grpo, inputs)
    flops = 6 * n * v * h
    print(f"FLOPs (useful) = 6*N*V*H = 6*{n}*{v}*{h} = {flops:.3e}; ours executes 8NVH (logits recompute), "
          "onepass 6NVH")
    res = Results("grpo_loss", Path(args.out))
    shape = f"B={b} T={t} H={h} V={v}"
    hidden, weight = inputs[:2]
    eager_ms = None
    providers = [("eager", eager_grpo), ("ours", ours_grpo), ("onepass", onepass_grpo)]
    if cuda:  # the one-pass buffer size (default 512 MiB) is the knob to tune on a GPU
        providers += [(f"onepass-{mib}M", with_onepass_buffer(onepass_grpo, mib)) for mib in (256, 1024)]
    if (liger := liger_grpo(b, t)) is not None:
        providers.append(("liger", liger))
    for name, fn in providers:
        def step(fn=fn):
            return torch.autograd.grad(fn(*inputs), (hidden, weight))
        ms = time_ms(step, warmup=2, reps=args.reps)
        eager_ms = ms[0] if name == "eager" else eager_ms
        res.add(name, "fwd+bwd", shape, str(dtype).removeprefix("torch."), ms, flops=flops,
                extra_gib=peak_extra_gib(step), ref_ms=eager_ms)
    res.print_table()
    res.write()


if __name__ == "__main__":
    main()

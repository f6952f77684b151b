"""Benchmark DPO + SFT from hidden states, forward + backward, including the reference model's log-prob pass.

    python bench/bench_dpo.py [--out bench/results] [--reps 10]

One step = the reference log-probs (a second lm_head weight, forward only, no grad) + the policy loss forward +
backward. Providers: `ours` = kernels.fused_logprobs.logprobs_fwd for the reference, kernels.dpo_loss for the policy
(no [N, V] logits); `eager` = full logits [N, V] in the input dtype with fp32 log_softmax for both (the reference
under no_grad), the same loss, autograd; `liger` = Liger-Kernel's LigerFusedLinearDPOLoss with its NLL term and its
own reference pass (only when importable; timing only, its loss is not compared). Shapes: CUDA = Qwen2.5-VL-7B head
(H=3584, V=152064, bf16), 4 pairs = 8 sequences x 1024 tokens; CPU = a reduced shape. FLOPs (useful): 8*N*V*H
(reference 2NVH + policy 6NVH); ours executes 10NVH (the policy backward recomputes the logits); `onepass` =
ours with impl="onepass" (whole pairs per chunk, each chunk's logits computed once: 8NVH).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout: import `kernels`

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels._bench import Results, check_against_eager, peak_extra_gib, time_ms  # noqa: E402
from kernels._common import sequence_logps  # noqa: E402
from kernels.dpo_loss import dpo_loss  # noqa: E402
from kernels.fused_logprobs import logprobs_fwd  # noqa: E402

BETA, SFT_WEIGHT = 0.1, 1.0


def _seq_sums(x, cu):
    # The benchmark's sequences all have the same length, so a reshape gives the per-sequence sums (no sync).
    return x.view(cu.numel() - 1, -1).sum(1)


def eager_dpo(hidden, weight, ref_weight, targets, mask, cu, is_chosen):
    """The plain baseline: full logits for the reference (no grad) and the policy, TRL sigmoid + token-mean NLL."""
    m = mask.float()
    with torch.no_grad():
        ref_lp = torch.log_softmax((hidden @ ref_weight.T).float(), -1).gather(1, targets[:, None]).squeeze(1)
        ref_seq = _seq_sums(ref_lp * m, cu)
    logp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(1, targets[:, None]).squeeze(1)
    seq = _seq_sums(logp * m, cu)
    margin = (seq[is_chosen] - ref_seq[is_chosen]) - (seq[~is_chosen] - ref_seq[~is_chosen])
    dpo = -F.logsigmoid(BETA * margin).mean()
    tok_chosen = is_chosen.repeat_interleave(cu[1:] - cu[:-1])
    sft = -(logp * m)[tok_chosen].sum() / m[tok_chosen].sum()
    return dpo + SFT_WEIGHT * sft


def ours_dpo(hidden, weight, ref_weight, targets, mask, cu, is_chosen, impl="recompute"):
    ref_lp, _, _ = logprobs_fwd(hidden, ref_weight, targets)  # no autograd, no [N, V] logits
    ref_seq = sequence_logps(ref_lp, mask, cu)
    return dpo_loss(hidden, weight, targets, mask, cu, is_chosen, ref_seq[is_chosen], ref_seq[~is_chosen],
                    beta=BETA, sft_weight=SFT_WEIGHT, sft_norm="token-mean", impl=impl)[0]


def onepass_dpo(*inputs):
    return ours_dpo(*inputs, impl="onepass")


def liger_dpo(num_seqs, t):
    """Liger-Kernel's fused DPO + NLL on the same tensors ([chosen..., rejected...] x T); None when not installed."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError:
        return None
    loss = LigerFusedLinearDPOLoss(beta=BETA, alpha=SFT_WEIGHT, compute_nll_loss=True, use_ref_model=True,
                                   compiled=torch.cuda.is_available())

    def fn(hidden, weight, ref_weight, targets, mask, cu, is_chosen):
        order = torch.cat([torch.nonzero(is_chosen).flatten(), torch.nonzero(~is_chosen).flatten()])
        x = hidden.view(num_seqs, t, -1)[order]
        y = targets.masked_fill(~mask, -100).view(num_seqs, t)[order]
        out = loss(weight, x, y, ref_input=x.detach(), ref_weight=ref_weight)
        return out[0] if isinstance(out, tuple) else out
    return fn


def make_inputs(num_seqs, t, h, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    n = num_seqs * t
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=g) * h**-0.5).requires_grad_()
    ref_weight = weight.detach() + 0.01 * h**-0.5 * torch.randn(v, h, device=device, dtype=dtype, generator=g)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    mask = (torch.arange(n, device=device) % t) >= t // 4  # the first quarter of each sequence is the prompt
    cu = torch.arange(0, n + 1, t, device=device, dtype=torch.int32)
    is_chosen = (torch.arange(num_seqs, device=device) % 2) == 0  # chosen, rejected, chosen, ...
    return hidden, weight, ref_weight, targets, mask, cu, is_chosen


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results", help="folder for dpo_loss.csv")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    num_seqs, t, h, v = (8, 1024, 3584, 152064) if cuda else (8, 64, 256, 4096)
    n = num_seqs * t
    inputs = make_inputs(num_seqs, t, h, v, dtype, device)
    for fn in (ours_dpo, onepass_dpo):
        check_against_eager(fn, eager_dpo, inputs)
    flops = 8 * n * v * h
    print(f"FLOPs (useful) = 8*N*V*H = 8*{n}*{v}*{h} = {flops:.3e} (ref fwd 2NVH + policy 6NVH); ours executes "
          "10NVH, onepass 8NVH")
    res = Results("dpo_loss", Path(args.out))
    shape = f"P={num_seqs // 2} T={t} H={h} V={v}"
    hidden, weight = inputs[:2]
    eager_ms = None
    providers = [("eager", eager_dpo), ("ours", ours_dpo), ("onepass", onepass_dpo)]
    if (liger := liger_dpo(num_seqs, t)) is not None:
        providers.append(("liger", liger))
    for name, fn in providers:
        def step(fn=fn):
            return torch.autograd.grad(fn(*inputs), (hidden, weight))
        ms = time_ms(step, warmup=2, reps=args.reps)
        eager_ms = ms[0] if name == "eager" else eager_ms
        res.add(name, "ref fwd + fwd+bwd", shape, str(dtype).removeprefix("torch."), ms, flops=flops,
                extra_gib=peak_extra_gib(step), ref_ms=eager_ms)
    res.print_table()
    res.write()


if __name__ == "__main__":
    main()

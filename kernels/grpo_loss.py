"""GRPO / DAPO clipped policy-gradient loss computed from hidden states, without materialising [N, V] logits.

Per token n (response tokens selected by `mask`):
    ratio = exp(logp - old_logp)                                 (log-ratio clamped to [-20, 20] as in verl)
    pg    = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))      (DAPO clip-higher)
    pg    = min(pg, -c * A) where A < 0, when dual_clip = c > 1                 (dual clip, verl)
    loss  = pg + kl_coef * kl(logp, ref_logp)
then aggregated over tokens (`agg`, see `AGGS`).

The fused path computes the gradient in the forward ("gradient in the forward", as Liger-Kernel's FLCE does):
the per-token loss and dLoss/dlogp are closed-form [N] vectors, turned into grad_hidden / grad_weight right away;
backward only scales the saved gradients by grad_output. Nothing [N, V]-sized is kept between forward and
backward, and the loss tail needs no graph. Two implementations (`impl`):
- "recompute": `logprobs_fwd` (2NVH), then `logprobs_bwd` (recomputes the logits from lse, then dH and dW: 6NVH)
  = 8NVH, O(N + tile) memory.
- "onepass": dLoss/dlogp_n depends on logp_n alone (token weights come from the mask), so kernels/_onepass.py
  computes each chunk's logits once and goes straight from them to the gradients: 6NVH, a [C, V] buffer.

Refs: verl `core_algos.py` (compute_policy_loss, kl_penalty, agg_loss); DAPO arXiv:2503.14476 (clip-higher);
Dr. GRPO arXiv:2503.20783 (constant normaliser); Dual-clip PPO arXiv:1912.09729; k1/k2/k3 estimators:
http://joschu.net/blog/kl-approx.html.

Shapes: N tokens (all sequences concatenated), H hidden size, V vocabulary size, B sequences.
"""

import torch

from kernels import _onepass
from kernels._common import (
    acc_dtype,
    check_common,
    check_cu_seqlens,
    check_vector,
    scale_saved_grads,
    segment_ids,
    sequence_sums,
)
from kernels.fused_logprobs import fused_logprobs_ref, grads_in_forward, logprobs_fwd, onepass_forward

IMPLS = ("recompute", "onepass")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
_LOG_RATIO_CLAMP = 20.0  # verl clamps log-ratios before exp so one stale token cannot overflow the loss


# ----------------------------------------------------------------------------------------------- validation
def _check_grpo(hidden, weight, targets, advantages, old_logprobs, mask, cu_seqlens, ref_logprobs, clip_low,
                clip_high, dual_clip, kl_coef, kl_estimator, temperature, agg, norm_len) -> None:
    check_common(hidden, weight, targets, temperature)
    n, dev = hidden.shape[0], hidden.device
    check_vector("advantages", advantages, n, dev)
    check_vector("old_logprobs", old_logprobs, n, dev)
    check_vector("mask", mask, n, dev, allow_bool=True)
    check_vector("ref_logprobs", ref_logprobs, n, dev)
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if cu_seqlens is None and agg != "token-mean":
        raise ValueError(f"agg={agg!r} needs sequence boundaries: pass cu_seqlens (int32 [B+1]), or use token-mean")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, n, dev)
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"clip_low must be in [0, 1) and clip_high >= 0, got clip_low={clip_low}, "
                         f"clip_high={clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be None or > 1 (verl uses 3.0), got {dual_clip}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} > 0 needs ref_logprobs [N]; pass them or set kl_coef=0")
    if norm_len is not None and not (isinstance(norm_len, int) and norm_len > 0):
        raise ValueError(f"norm_len must be None or a positive int, got {norm_len!r}")


# ------------------------------------------------------------------------------------ sequences and agg
def aggregate_ref(loss_N, m_N, cu_seqlens, agg, norm_len=None) -> torch.Tensor:
    """The aggregations, written per sequence (the spec; `token_weights` is the fused path's linear form)."""
    if agg == "token-mean":
        return (loss_N * m_N).sum() / m_N.sum().clamp(min=1.0)
    seq_sum, seq_cnt = sequence_sums(loss_N * m_N, cu_seqlens), sequence_sums(m_N, cu_seqlens)
    if agg == "seq-mean-token-sum":
        return seq_sum.mean()
    if agg == "seq-mean-token-mean":
        nonempty = seq_cnt > 0
        return (seq_sum / seq_cnt.clamp(min=1e-8))[nonempty].sum() / nonempty.sum().clamp(min=1)
    return seq_sum.sum() / (seq_sum.numel() * _norm_len(cu_seqlens, norm_len))


def _norm_len(cu_seqlens, norm_len):
    return float(norm_len) if norm_len is not None else (cu_seqlens[1:] - cu_seqlens[:-1]).max().to(torch.float32)


def token_weights(m_N, cu_seqlens, agg, norm_len=None) -> torch.Tensor:
    """[N] fp32 w with aggregate_ref(loss) == sum(w * loss): every aggregation is linear in the token losses."""
    if agg == "token-mean":
        return m_N / m_N.sum().clamp(min=1.0)
    b = cu_seqlens.numel() - 1
    if agg == "seq-mean-token-sum":
        return m_N / b
    if agg == "seq-mean-token-sum-norm":
        return m_N / (b * _norm_len(cu_seqlens, norm_len))
    seq_cnt = sequence_sums(m_N, cu_seqlens)
    num_nonempty = (seq_cnt > 0).sum().clamp(min=1)
    return m_N / (seq_cnt.clamp(min=1e-8)[segment_ids(cu_seqlens, m_N.shape[0])] * num_nonempty)


# ---------------------------------------------------------------------------------------- per-token terms
def _grpo_terms_ref(logp, old, adv, ref, clip_low, clip_high, dual_clip, kl_estimator):
    """Per-token pg loss and kl, plain torch (differentiable through autograd)."""
    log_ratio = (logp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    kl = None
    if ref is not None:
        if kl_estimator == "k1":
            kl = logp - ref
        elif kl_estimator == "k2":
            kl = 0.5 * (logp - ref) ** 2
        elif kl_estimator == "k3":
            kl = torch.exp(ref - logp) - (ref - logp) - 1
        else:  # low_var_kl: verl clamps the log-ratio to [-20, 20] and the estimate to [-10, 10]
            d = (ref - logp).clamp(-20, 20)
            kl = (torch.exp(d) - d - 1).clamp(-10, 10)
    return pg, kl


def _grpo_terms_closed_form(logp, old, adv, ref, clip_low, clip_high, dual_clip, kl_estimator):
    """(pg, dpg/dlogp, kl, dkl/dlogp, clipped, dual_active): the same math as `_grpo_terms_ref`, derivatives by hand.

    Subgradient choices match torch's (clamp passes the gradient at its bounds, inclusive) so fused == ref.
    """
    diff = logp - old
    ratio = torch.exp(diff.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped = pg2 > pg1  # the clipped branch wins: ratio is outside the trust region, so no gradient
    pg = torch.where(clipped, pg2, pg1)
    dpg = torch.where(clipped | (diff.abs() > _LOG_RATIO_CLAMP), 0.0, pg1)  # d(-A*ratio)/dlogp = -A*ratio
    dual_active = torch.zeros_like(clipped)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual_active = (adv < 0) & (pg3 < pg)  # the loss is capped at -c*A: constant, no gradient
        pg, dpg = torch.where(dual_active, pg3, pg), torch.where(dual_active, 0.0, dpg)
    kl = dkl = None
    if ref is not None:
        if kl_estimator == "k1":
            kl, dkl = logp - ref, torch.ones_like(logp)
        elif kl_estimator == "k2":
            kl, dkl = 0.5 * (logp - ref) ** 2, logp - ref
        elif kl_estimator == "k3":
            d = ref - logp
            kl, dkl = torch.exp(d) - d - 1, 1 - torch.exp(d)
        else:
            d = ref - logp
            dc = d.clamp(-20, 20)
            kld = torch.exp(dc) - dc - 1
            kl = kld.clamp(-10, 10)
            dkl = torch.where((d.abs() <= 20) & (kld <= 10), 1 - torch.exp(dc), 0.0)
    return pg, dpg, kl, dkl, clipped, dual_active


def _metrics(logp, old, adv, ref, m, clipped, dual_active, kl, entropy, dual_clip) -> dict:
    """Detached 0-d fp32 tensors (no host sync). Means are weighted by mask; min/max over mask > 0."""
    logp, m = logp.detach(), m.detach()
    sel, cnt = m > 0, m.sum().clamp(min=1.0)
    nan = torch.tensor(float("nan"), device=m.device)

    def mmean(x):
        return (x.detach().to(m.dtype) * m).sum() / cnt

    ratio = torch.exp((logp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    out = {
        "clip_frac": mmean(clipped),
        # Schulman's k2 approximation of KL(old || pi), as TRL's PPO trainer logs it (approxkl)
        "approx_kl": mmean(0.5 * (logp - old) ** 2),
        "ratio_mean": mmean(ratio),
        "ratio_min": torch.where(sel.any(), torch.where(sel, ratio, float("inf")).min(), nan),
        "ratio_max": torch.where(sel.any(), torch.where(sel, ratio, float("-inf")).max(), nan),
    }
    if dual_clip is not None:
        out["clip_frac_dual"] = mmean(dual_active)
    if kl is not None:
        out["kl_mean"] = mmean(kl)
    if entropy is not None:
        out["entropy_mean"] = mmean(entropy)
    return out


# ------------------------------------------------------------------------------------------- reference
def grpo_loss_ref(hidden, weight, targets, advantages, old_logprobs, mask, *, cu_seqlens=None, ref_logprobs=None,
                  clip_low=0.2, clip_high=0.28, dual_clip=None, kl_coef=0.0, kl_estimator="k3", temperature=1.0,
                  agg="token-mean", return_entropy=False, norm_len=None):
    """The spec: `fused_logprobs_ref` + the per-token formulas + per-sequence aggregation, autograd throughout."""
    _check_grpo(hidden, weight, targets, advantages, old_logprobs, mask, cu_seqlens, ref_logprobs, clip_low,
                clip_high, dual_clip, kl_coef, kl_estimator, temperature, agg, norm_len)
    logp = fused_logprobs_ref(hidden, weight, targets, temperature=temperature, return_entropy=return_entropy)
    logp, entropy = logp if return_entropy else (logp, None)
    acc = logp.dtype  # fp32 (fp64 only for fp64 inputs, for gradcheck)
    m, adv = mask.to(acc), advantages.to(acc)
    old = logp.detach() if old_logprobs is None else old_logprobs.to(acc)  # None: on-policy, ratio exactly 1
    ref = ref_logprobs.to(acc) if ref_logprobs is not None else None
    pg, kl = _grpo_terms_ref(logp, old, adv, ref, clip_low, clip_high, dual_clip, kl_estimator)
    loss_N = pg + kl_coef * kl if kl_coef > 0 else pg
    loss = aggregate_ref(loss_N, m, cu_seqlens, agg, norm_len)
    with torch.no_grad():
        ratio = torch.exp((logp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
        clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high) > -adv * ratio
        pg_unc = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
        dual_active = (adv < 0) & (-adv * dual_clip < pg_unc) if dual_clip is not None else None
        metrics = _metrics(logp, old, adv, ref, m, clipped, dual_active, kl, entropy, dual_clip)
        metrics["pg_loss"] = aggregate_ref(pg, m, cu_seqlens, agg, norm_len)
        if kl is not None:
            metrics["kl_loss"] = aggregate_ref(kl, m, cu_seqlens, agg, norm_len)
    return loss, metrics


# ------------------------------------------------------------------------------------------ fused path
class GRPOLossFunction(torch.autograd.Function):
    """Gradient in the forward: saves grad_hidden / grad_weight for dLoss, backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, advantages, old_logprobs, ref_logprobs, m, w, temperature, clip_low,
                clip_high, dual_clip, kl_coef, kl_estimator, return_entropy, impl, metrics_out):
        acc = acc_dtype(hidden)
        old = None if old_logprobs is None else old_logprobs.to(acc)  # None: on-policy (old = logp, ratio 1)
        adv = advantages.to(acc)
        ref = ref_logprobs.to(acc) if ref_logprobs is not None else None
        if impl == "onepass":

            def grad_fn(idx, logp_N):  # dLoss/dlogp of a token needs that token's logp only
                lp = logp_N[idx]
                _, dpg, _, dkl, _, _ = _grpo_terms_closed_form(
                    lp, lp if old is None else old[idx], adv[idx], None if ref is None else ref[idx], clip_low,
                    clip_high, dual_clip, kl_estimator)
                return w[idx] * (dpg + kl_coef * dkl if kl_coef > 0 else dpg)

            # the Triton row kernel evaluates the same closed form per row; grad_fn is its torch twin
            grad = _onepass.GRPOGrad(adv, old, ref, w, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, grad_fn)
            logp, entropy, ctx.grads = onepass_forward(ctx, hidden, weight, targets, None, grad, temperature,
                                                       return_entropy)
        else:
            logp, lse, entropy = logprobs_fwd(hidden, weight, targets, temperature=temperature,
                                              return_entropy=return_entropy, _check_range=False)
        if old is None:
            old = logp
        pg, dpg, kl, dkl, clipped, dual_active = _grpo_terms_closed_form(logp, old, adv, ref, clip_low, clip_high,
                                                                         dual_clip, kl_estimator)
        loss_N, dloss_N = pg, dpg
        if kl_coef > 0:
            loss_N, dloss_N = pg + kl_coef * kl, dpg + kl_coef * dkl
        loss = (w * loss_N).sum()
        metrics_out.update(_metrics(logp, old, adv, ref, m, clipped, dual_active, kl, entropy, dual_clip))
        metrics_out["pg_loss"] = (w * pg).sum()
        if kl is not None:
            metrics_out["kl_loss"] = (w * kl).sum()
        if impl != "onepass":
            ctx.grads = grads_in_forward(ctx, hidden, weight, targets, lse, w * dloss_N, temperature)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return (*scale_saved_grads(ctx, grad_output), *([None] * 15))


def grpo_loss(hidden, weight, targets, advantages, old_logprobs, mask, *, cu_seqlens=None, ref_logprobs=None,
              clip_low=0.2, clip_high=0.28, dual_clip=None, kl_coef=0.0, kl_estimator="k3", temperature=1.0,
              agg="token-mean", return_entropy=False, norm_len=None, impl="recompute"):
    """GRPO/DAPO policy loss from hidden states, fused: never holds [N, V] logits.

    Args:
        hidden: [N, H] fp32/bf16/fp16 last hidden states of all sequences, concatenated.
        weight: [V, H] lm_head weight, same dtype and device.
        targets: [N] int32/int64 next-token ids (positions with -100 give logp 0; mask them out).
        advantages: [N] float, per token (broadcast per-sequence advantages before the call).
        old_logprobs: [N] float log-probs under the sampling policy (same temperature); None when the sampling
            policy is the current one (one on-policy update per rollout batch): old = logp, ratio exactly 1, which
            saves the caller a no-grad forward (TRL does the same with num_iterations = 1).
        mask: [N] bool/float; response tokens. Float values weight the tokens (as verl's masks do).
        cu_seqlens: int32/int64 [B+1] sequence boundaries; required by the seq-* aggregations.
        ref_logprobs: [N] float reference-policy log-probs; required when kl_coef > 0.
        clip_low, clip_high: ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO clip-higher: 0.2 / 0.28).
        dual_clip: c > 1 caps the loss of A < 0 tokens at -c*A (verl's clip_ratio_c); None disables.
        kl_coef: weight of the per-token KL penalty added to the loss (0 disables).
        kl_estimator: k1 = logp - ref; k2 = 0.5*(logp - ref)^2; k3 = exp(ref - logp) - (ref - logp) - 1;
            low_var_kl = k3 with ref - logp clamped to [-20, 20] and the result to [-10, 10] (verl; note that
            verl also maps "k3" to this clamped form, here k3 is unclamped).
        temperature: logits are divided by it before the softmax.
        agg: token-mean = sum(m*l) / sum(m) (DAPO); seq-mean-token-mean = mean over sequences with at least one
            masked token of sum(m*l)/sum(m) (GRPO, verl); seq-mean-token-sum = sum(m*l) / B;
            seq-mean-token-sum-norm = sum(m*l) / (B * L) (Dr. GRPO), L = norm_len if given, else the longest
            cu_seqlens segment (prompt included). Dr. GRPO uses a constant L (the generation budget): pass
            norm_len=max_response_tokens to keep the normaliser fixed across batches.
        return_entropy: also report the masked mean entropy (a metric; no gradient flows through it).
        norm_len: the constant L of seq-mean-token-sum-norm; ignored by the other aggregations.
        impl: "recompute" (8NVH: Triton log-probs, then the logits recomputed tile by tile for the gradients;
            O(N + tile) memory; measured on an H200) or "onepass" (6NVH: each chunk's logits computed once by
            cuBLAS into a [C, V] buffer of kernels._onepass.DEFAULT_BUFFER_BYTES; bf16 weights get their
            gradient accumulated in bf16). Both give the same loss and gradients to rounding.
    Returns:
        (loss, metrics): loss is a 0-d fp32 tensor; metrics maps names to detached 0-d fp32 tensors: pg_loss,
        kl_loss (if ref_logprobs), clip_frac (share of masked tokens where the clipped branch won, verl's
        pg_clipfrac), clip_frac_dual (dual clip), approx_kl = masked mean of 0.5*(logp - old)^2 (TRL's approxkl),
        ratio_mean/min/max, kl_mean (if ref_logprobs), entropy_mean (if return_entropy).
    Gradients flow to hidden and weight only (advantages and log-prob inputs are constants). One host sync
    validates cu_seqlens. The graph supports a single backward.
    """
    _check_grpo(hidden, weight, targets, advantages, old_logprobs, mask, cu_seqlens, ref_logprobs, clip_low,
                clip_high, dual_clip, kl_coef, kl_estimator, temperature, agg, norm_len)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not torch.is_grad_enabled():  # needs_input_grad ignores no_grad mode: detach so no backward work is done
        hidden, weight = hidden.detach(), weight.detach()
    m = mask.to(acc_dtype(hidden))
    w = token_weights(m, cu_seqlens, agg, norm_len)
    metrics: dict = {}
    loss = GRPOLossFunction.apply(hidden, weight, targets, advantages.detach(),
                                  None if old_logprobs is None else old_logprobs.detach(),
                                  None if ref_logprobs is None else ref_logprobs.detach(), m, w, float(temperature),
                                  float(clip_low), float(clip_high), dual_clip, float(kl_coef), kl_estimator,
                                  bool(return_entropy), impl, metrics)
    return loss, metrics

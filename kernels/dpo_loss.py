"""DPO (sigmoid, label smoothing) + SFT on the chosen responses, from hidden states, without [N, V] logits.

    pi_s   = sum of masked token log-probs of sequence s                    (policy sequence log-prob)
    m_p    = (pi_c - ref_c) - (pi_r - ref_r)                                 (pair p: k-th chosen, k-th rejected)
    dpo    = mean_p [ -(1 - ls) * logsigmoid(beta * m_p) - ls * logsigmoid(-beta * m_p) ]     (TRL "sigmoid")
    sft    = NLL of the chosen responses (sft_norm: token-mean or seq-mean)
    loss   = dpo + sft_weight * sft                                  (the SPECS hybrid; the paper uses weight 1)

The fused path computes the gradient in the forward, as in `kernels/grpo_loss.py`: logprobs_fwd, the closed-form
dLoss/dlogp per token ([N] vectors), logprobs_bwd, all in forward; backward scales the saved gradients. With
impl="onepass", chunks hold whole pairs (a token's gradient needs its pair's two sequence log-probs), so each
chunk's logits are computed once (kernels/_onepass.py, 6NVH instead of 8NVH).

Refs: DPO arXiv:2305.18290; TRL `DPOTrainer.dpo_loss` (loss_type="sigmoid", label_smoothing from cDPO) and its
RPO NLL term (token-mean over chosen tokens); Liger-Kernel `LigerFusedLinearDPOLoss` (same hybrid, chunked).

Shapes: N tokens (all sequences concatenated), H hidden size, V vocabulary size, B sequences, P = B / 2 pairs.
"""

import torch
import torch.nn.functional as F

from kernels import _onepass
from kernels._common import (
    acc_dtype,
    check_common,
    check_cu_seqlens,
    check_vector,
    log_once,
    scale_saved_grads,
    segment_ids,
    sequence_logps,
    sequence_sums,
)
from kernels.fused_logprobs import fused_logprobs_ref, grads_in_forward, logprobs_fwd, onepass_forward
from kernels.grpo_loss import IMPLS

SFT_NORMS = ("token-mean", "seq-mean")


def _check_dpo(hidden, weight, targets, mask, cu_seqlens, is_chosen, ref_chosen_logps, ref_rejected_logps, beta,
               sft_weight, sft_norm, label_smoothing, temperature):
    """Validate; returns (chosen_idx [P], rejected_idx [P]). Reads is_chosen and cu_seqlens back: host syncs."""
    check_common(hidden, weight, targets, temperature)
    n, dev = hidden.shape[0], hidden.device
    check_vector("mask", mask, n, dev, allow_bool=True)
    check_cu_seqlens(cu_seqlens, n, dev)
    b = cu_seqlens.numel() - 1
    if not isinstance(is_chosen, torch.Tensor) or is_chosen.shape != (b,) or is_chosen.dtype != torch.bool:
        got = f"{tuple(is_chosen.shape)} {is_chosen.dtype}" if isinstance(is_chosen, torch.Tensor) else is_chosen
        raise ValueError(f"is_chosen must be a bool tensor [B={b}] (one flag per cu_seqlens sequence), got {got}")
    if is_chosen.device != dev:
        raise ValueError(f"is_chosen must be on {dev} (the device of hidden), got {is_chosen.device}")
    chosen_idx, rejected_idx = is_chosen.nonzero().squeeze(1), (~is_chosen).nonzero().squeeze(1)  # host sync
    num_pairs = chosen_idx.numel()
    if num_pairs != rejected_idx.numel() or num_pairs == 0:
        raise ValueError(f"is_chosen must mark as many chosen as rejected sequences (at least one pair), got "
                         f"{num_pairs} chosen and {rejected_idx.numel()} rejected")
    check_vector("ref_chosen_logps", ref_chosen_logps, num_pairs, dev)
    check_vector("ref_rejected_logps", ref_rejected_logps, num_pairs, dev)
    if sft_norm not in SFT_NORMS:
        raise ValueError(f"sft_norm must be one of {SFT_NORMS}, got {sft_norm!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if sft_weight < 0:
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
    if not 0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] (TRL's range), got {label_smoothing}")
    return chosen_idx, rejected_idx


def _metrics(pi_c, pi_r, ref_c, ref_r, beta, dpo, sft) -> dict:
    """Detached 0-d fp32 tensors, TRL's quantities: rewards are beta * (policy - reference) sequence log-probs."""
    rc, rr = beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()
    return {"dpo_loss": dpo.detach(), "sft_loss": sft.detach(), "rewards_chosen": rc.mean(),
            "rewards_rejected": rr.mean(), "reward_margin": (rc - rr).mean(),
            "reward_accuracy": (rc > rr).to(rc.dtype).mean(), "logps_chosen": pi_c.detach().mean(),
            "logps_rejected": pi_r.detach().mean()}


def dpo_loss_ref(hidden, weight, targets, mask, cu_seqlens, is_chosen, ref_chosen_logps, ref_rejected_logps, *,
                 beta=0.1, sft_weight=1.0, sft_norm="token-mean", label_smoothing=0.0, temperature=1.0):
    """The spec: `fused_logprobs_ref`, sequence sums, TRL's sigmoid loss and the NLL, autograd throughout."""
    chosen_idx, rejected_idx = _check_dpo(hidden, weight, targets, mask, cu_seqlens, is_chosen, ref_chosen_logps,
                                          ref_rejected_logps, beta, sft_weight, sft_norm, label_smoothing,
                                          temperature)
    logp = fused_logprobs_ref(hidden, weight, targets, temperature=temperature)
    m = mask.to(logp.dtype)
    seq_logp = sequence_logps(logp, m, cu_seqlens)
    pi_c, pi_r = seq_logp[chosen_idx], seq_logp[rejected_idx]
    ref_c, ref_r = ref_chosen_logps.to(logp.dtype), ref_rejected_logps.to(logp.dtype)
    margin = (pi_c - ref_c) - (pi_r - ref_r)
    dpo = (-(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)).mean()
    seq_cnt = sequence_sums(m, cu_seqlens)
    if sft_norm == "token-mean":
        sft = -pi_c.sum() / seq_cnt[chosen_idx].sum().clamp(min=1.0)
    else:
        cnt_c = seq_cnt[chosen_idx]
        nonempty = cnt_c > 0
        sft = -(pi_c / cnt_c.clamp(min=1e-8))[nonempty].sum() / nonempty.sum().clamp(min=1)
    loss = dpo + sft_weight * sft
    return loss, _metrics(pi_c, pi_r, ref_c, ref_r, beta, dpo, sft)


def _dpo_terms(logp, m, cu_seqlens, chosen_idx, rejected_idx, ref_c, ref_r, beta, label_smoothing):
    """(pi_c, pi_r, dpo loss, dLoss_dpo/dseq_logp [B]) from token log-probs, closed form."""
    seq_logp = sequence_sums(logp * m, cu_seqlens)
    pi_c, pi_r = seq_logp[chosen_idx], seq_logp[rejected_idx]
    z = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    num_pairs = z.numel()
    dpo = (-(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)).mean()
    # d dpo / d pi_c = -d dpo / d pi_r = beta/P * (-(1-ls) * sigmoid(-z) + ls * sigmoid(z))
    g_pair = beta / num_pairs * (-(1 - label_smoothing) * torch.sigmoid(-z) + label_smoothing * torch.sigmoid(z))
    g_seq = torch.zeros_like(seq_logp).index_copy(0, chosen_idx, g_pair).index_copy(0, rejected_idx, -g_pair)
    return seq_logp, pi_c, pi_r, dpo, g_seq


def _sft_seq_weights(m, cu_seqlens, chosen_idx, sft_norm):
    """[B] w with SFT = -sum_s w_s * seq_logp_s: weights on the chosen sequences, zero on the rejected ones."""
    seq_cnt = sequence_sums(m, cu_seqlens)
    w_seq = torch.zeros_like(seq_cnt)
    cnt_c = seq_cnt[chosen_idx]
    if sft_norm == "token-mean":
        w_seq[chosen_idx] = 1.0 / cnt_c.sum().clamp(min=1.0)
    else:
        nonempty = cnt_c > 0
        w_seq[chosen_idx] = nonempty.to(cnt_c.dtype) / (cnt_c.clamp(min=1e-8) * nonempty.sum().clamp(min=1))
    return w_seq


def pair_groups(cu_seqlens, chosen_idx, rejected_idx, chunk: int, max_pair: int | None = None
                ) -> list[torch.Tensor] | None:
    """Token rows of consecutive pairs (chosen rows, then rejected rows), packed greedily into chunks of at most
    `chunk` tokens; a pair longer than `chunk` (at most `max_pair`, default `chunk`) gets a chunk of its own. None
    if a pair is longer than `max_pair` (the one-pass path then cannot hold it). One host sync."""
    cu = cu_seqlens.tolist()
    spans = [(cu[c], cu[c + 1], cu[r], cu[r + 1]) for c, r in zip(chosen_idx.tolist(), rejected_idx.tolist(),
                                                                     strict=True)]
    if any((c1 - c0) + (r1 - r0) > (max_pair or chunk) for c0, c1, r0, r1 in spans):
        return None
    groups, cur, size = [], [], 0
    for c0, c1, r0, r1 in spans:
        if cur and size + (c1 - c0) + (r1 - r0) > chunk:
            groups.append(cur)
            cur, size = [], 0
        cur += [range(c0, c1), range(r0, r1)]
        size += (c1 - c0) + (r1 - r0)
    groups.append(cur)
    dev = cu_seqlens.device
    return [torch.tensor([i for r in g for i in r], dtype=torch.int64, device=dev) for g in groups]


class DPOLossFunction(torch.autograd.Function):
    """Gradient in the forward: saves grad_hidden / grad_weight for dLoss, backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, m, cu_seqlens, chosen_idx, rejected_idx, ref_c, ref_r, beta,
                sft_weight, sft_norm, label_smoothing, temperature, impl, metrics_out):
        seg = segment_ids(cu_seqlens, hidden.shape[0])
        w_seq = _sft_seq_weights(m, cu_seqlens, chosen_idx, sft_norm)

        def grad_fn(idx, logp_N):  # exact for the pairs whose tokens are all filled in, i.e. those of idx
            g_seq = _dpo_terms(logp_N, m, cu_seqlens, chosen_idx, rejected_idx, ref_c, ref_r, beta,
                               label_smoothing)[-1]
            return ((g_seq - sft_weight * w_seq)[seg] * m)[idx]

        groups = None
        if impl == "onepass":
            v, elem_bytes = weight.shape[0], acc_dtype(hidden).itemsize
            chunk = _onepass.chunk_tokens(v, elem_bytes=elem_bytes)
            max_pair = max(chunk, _onepass.chunk_tokens(v, _onepass.MAX_PAIR_BUFFER_BYTES, elem_bytes))
            groups = pair_groups(cu_seqlens, chosen_idx, rejected_idx, chunk, max_pair)
            if groups is None:
                log_once("dpo-onepass-fallback", "dpo_loss(impl='onepass'): a pair is longer than the one-pass "
                         "buffer may grow for it (kernels._onepass.MAX_PAIR_BUFFER_BYTES); using impl='recompute'")
        if groups is not None:
            logp, _, ctx.grads = onepass_forward(ctx, hidden, weight, targets, groups, grad_fn, temperature, False)
        else:
            logp, lse, _ = logprobs_fwd(hidden, weight, targets, temperature=temperature, _check_range=False)
        seq_logp, pi_c, pi_r, dpo, _ = _dpo_terms(logp, m, cu_seqlens, chosen_idx, rejected_idx, ref_c, ref_r, beta,
                                                  label_smoothing)
        sft = -(w_seq * seq_logp).sum()
        loss = dpo + sft_weight * sft
        metrics_out.update(_metrics(pi_c, pi_r, ref_c, ref_r, beta, dpo, sft))
        if groups is None:
            ctx.grads = grads_in_forward(ctx, hidden, weight, targets, lse, grad_fn(slice(None), logp), temperature)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return (*scale_saved_grads(ctx, grad_output), *([None] * 14))


def dpo_loss(hidden, weight, targets, mask, cu_seqlens, is_chosen, ref_chosen_logps, ref_rejected_logps, *,
             beta=0.1, sft_weight=1.0, sft_norm="token-mean", label_smoothing=0.0, temperature=1.0,
             impl="recompute"):
    """DPO + SFT hybrid loss from hidden states, fused: never holds [N, V] logits.

    Args:
        hidden: [N, H] fp32/bf16/fp16 last hidden states of all 2P sequences, concatenated.
        weight: [V, H] lm_head weight, same dtype and device.
        targets: [N] int32/int64 next-token ids (-100 gives logp 0; mask such positions out).
        mask: [N] bool/float; response tokens (float values weight tokens).
        cu_seqlens: int32/int64 [B+1] sequence boundaries, B = 2P.
        is_chosen: [B] bool; the k-th chosen sequence pairs with the k-th rejected one (equal counts).
        ref_chosen_logps, ref_rejected_logps: [P] float reference sequence log-probs (same mask and temperature).
        beta: DPO inverse temperature.
        sft_weight: weight of the SFT term (0 gives plain DPO).
        sft_norm: token-mean = sum of chosen masked -logp / number of chosen masked tokens (TRL's RPO NLL);
            seq-mean = mean over chosen sequences with at least one masked token of that sequence's token mean.
        label_smoothing: ls in [0, 0.5], the probability that a preference label is flipped (cDPO, TRL).
        temperature: logits are divided by it before the softmax.
        impl: "recompute" (8NVH, O(N + tile) memory) or "onepass" (6NVH: whole pairs per chunk, each chunk's
            logits computed once into a [C, V] buffer; see kernels/grpo_loss.py `grpo_loss`). A pair longer than
            the buffer holds falls back to "recompute", with a warning.
    Returns:
        (loss, metrics): loss is a 0-d fp32 tensor; metrics are detached 0-d fp32 tensors: dpo_loss, sft_loss,
        rewards_chosen / rewards_rejected (means of beta * (pi - ref)), reward_margin (mean chosen - rejected),
        reward_accuracy (share of pairs whose chosen reward beats the rejected one), logps_chosen /
        logps_rejected (means of the policy sequence log-probs).
    Gradients flow to hidden and weight only. Validation syncs with the host (is_chosen, cu_seqlens). The graph
    supports a single backward.
    """
    chosen_idx, rejected_idx = _check_dpo(hidden, weight, targets, mask, cu_seqlens, is_chosen, ref_chosen_logps,
                                          ref_rejected_logps, beta, sft_weight, sft_norm, label_smoothing,
                                          temperature)
    if not torch.is_grad_enabled():  # needs_input_grad ignores no_grad mode: detach so no backward work is done
        hidden, weight = hidden.detach(), weight.detach()
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    metrics: dict = {}
    acc = acc_dtype(hidden)
    loss = DPOLossFunction.apply(hidden, weight, targets, mask.to(acc), cu_seqlens, chosen_idx, rejected_idx,
                                 ref_chosen_logps.detach().to(acc), ref_rejected_logps.detach().to(acc), float(beta),
                                 float(sft_weight), sft_norm, float(label_smoothing), float(temperature), impl,
                                 metrics)
    return loss, metrics

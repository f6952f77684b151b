"""Per-token log-probs of target tokens computed from hidden states and the lm_head weight, chunk by chunk.

    logp[n] = log_softmax(hidden[n] @ weight.T / temperature)[targets[n]]

The full [N, V] logits are never alive at once: the forward keeps only the per-token log-sum-exp, and the
backward recomputes one chunk of logits at a time. Memory beyond inputs, outputs and gradients is
O(N + chunk x V). This is the plain-torch version; a Triton kernel with the same contract plugs in here.

Shapes: N tokens, H hidden size, V vocabulary size, C tokens per chunk.
"""

import torch


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[1]}], got shape {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N={hidden.shape[0]}], got shape {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32/int64, got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, weight, targets must share a device, got {hidden.device}, {weight.device}, "
                         f"{targets.device}")


class ChunkedLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, temperature, chunk_tokens, ignore_index):
        n = hidden_NH.shape[0]
        logp_N = torch.zeros(n, dtype=torch.float32, device=hidden_NH.device)
        lse_N = torch.zeros(n, dtype=torch.float32, device=hidden_NH.device)
        valid_N = targets_N != ignore_index
        safe_targets_N = torch.where(valid_N, targets_N, 0)
        for s in range(0, n, chunk_tokens):
            # fp32 logits for one chunk only: accumulate the softmax statistics in fp32 whatever the input dtype.
            logits_CV = (hidden_NH[s : s + chunk_tokens] @ weight_VH.T).float() / temperature
            lse_N[s : s + chunk_tokens] = torch.logsumexp(logits_CV, dim=-1)
            tgt = logits_CV.gather(1, safe_targets_N[s : s + chunk_tokens, None]).squeeze(1)
            logp_N[s : s + chunk_tokens] = tgt - lse_N[s : s + chunk_tokens]
        logp_N = torch.where(valid_N, logp_N, 0.0)
        ctx.save_for_backward(hidden_NH, weight_VH, safe_targets_N, valid_N, lse_N)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        return logp_N

    @staticmethod
    def backward(ctx, grad_logp_N):
        hidden_NH, weight_VH, targets_N, valid_N, lse_N = ctx.saved_tensors
        t, c = ctx.temperature, ctx.chunk_tokens
        grad_logp_N = torch.where(valid_N, grad_logp_N.float(), 0.0)
        grad_hidden = torch.empty_like(hidden_NH) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) \
            if ctx.needs_input_grad[1] else None
        for s in range(0, hidden_NH.shape[0], c):
            h_CH = hidden_NH[s : s + c]
            logits_CV = (h_CH @ weight_VH.T).float() / t
            # d logp / d logits = onehot(target) - softmax; scaled by the upstream gradient and 1/temperature.
            g_C = grad_logp_N[s : s + c]
            dlogits_CV = -torch.exp(logits_CV - lse_N[s : s + c, None]) * g_C[:, None]
            dlogits_CV.scatter_add_(1, targets_N[s : s + c, None], g_C[:, None])
            dlogits_CV /= t
            if grad_hidden is not None:
                grad_hidden[s : s + c] = (dlogits_CV @ weight_VH.float()).to(hidden_NH.dtype)
            if grad_weight is not None:
                grad_weight += dlogits_CV.T @ h_CH.float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_VH.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def fused_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                       temperature: float = 1.0, ignore_index: int = -100, chunk_tokens: int = 1024) -> torch.Tensor:
    """Log-probs of `targets` under softmax(hidden @ weight.T / temperature), chunked over tokens.

    Args:
        hidden: [N, H] fp32/bf16/fp16 last hidden states.
        weight: [V, H] lm_head weight, same dtype as hidden.
        targets: [N] int64/int32 token ids; `ignore_index` positions give 0 and no gradient.
        temperature: divides the logits before the softmax.
        chunk_tokens: tokens per chunk; bounds the temporary logits to chunk_tokens x V fp32.
    Returns:
        [N] fp32 log-probs, differentiable with respect to hidden and weight.
    """
    _check(hidden, weight, targets)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return ChunkedLogprobsFunction.apply(hidden, weight, targets, float(temperature), int(chunk_tokens), ignore_index)


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, chunk_tokens: int = 1024) -> torch.Tensor:
    """Public entry; today every device runs the chunked torch path (see `fused_logprobs_ref`)."""
    return fused_logprobs_ref(hidden, weight, targets, temperature=temperature, ignore_index=ignore_index,
                              chunk_tokens=chunk_tokens)

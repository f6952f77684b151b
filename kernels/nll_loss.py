"""Weighted negative log-likelihood (the SFT loss) from hidden states, without [N, V] logits.

    loss = -sum_n w_n * logp_n        w: token weights, e.g. 1 / (response tokens of the step) on response tokens

dLoss/dlogp_n = -w_n is known before any logit is, so the gradient is computed in the forward (as in
kernels/grpo_loss.py) and backward only scales it. impl="onepass": each chunk's logits are computed once by cuBLAS
and one row kernel writes the gradient over them (kernels/_onepass.py, 6NVH); impl="recompute": the Triton
log-probs, then the logits recomputed for the gradient (8NVH).

Shapes: N tokens, H hidden size, V vocabulary size.
"""

import torch

from kernels import _onepass
from kernels._common import acc_dtype, check_common, check_vector, scale_saved_grads
from kernels.fused_logprobs import fused_logprobs_ref, grads_in_forward, logprobs_fwd, onepass_forward
from kernels.grpo_loss import IMPLS


def fused_nll_ref(hidden, weight, targets, weights, *, temperature=1.0, ignore_index=-100):
    """The spec: `fused_logprobs_ref` and a weighted sum, autograd throughout."""
    check_common(hidden, weight, targets, temperature, ignore_index)
    check_vector("weights", weights, hidden.shape[0], hidden.device)
    logp = fused_logprobs_ref(hidden, weight, targets, temperature=temperature, ignore_index=ignore_index)
    return -(weights.to(logp.dtype) * logp).sum()


class NLLLossFunction(torch.autograd.Function):
    """Gradient in the forward: saves grad_hidden / grad_weight of the loss, backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, w, temperature, ignore_index, impl):
        if impl == "onepass":
            logp, _, ctx.grads = onepass_forward(ctx, hidden, weight, targets, None, _onepass.Known(-w), temperature,
                                                 False, ignore_index)
        else:
            logp, lse, _ = logprobs_fwd(hidden, weight, targets, temperature=temperature, ignore_index=ignore_index,
                                        _check_range=False)
            ctx.grads = grads_in_forward(ctx, hidden, weight, targets, lse, -w, temperature, ignore_index)
        return -(w * logp).sum()

    @staticmethod
    def backward(ctx, grad_output):
        return (*scale_saved_grads(ctx, grad_output), None, None, None, None, None)


def fused_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, *,
              temperature: float = 1.0, ignore_index: int = -100, impl: str = "recompute") -> torch.Tensor:
    """Weighted NLL of `targets` under softmax(hidden @ weight.T / temperature), fused: never holds [N, V] logits.

    Args:
        hidden: [N, H] fp32/bf16/fp16 last hidden states; weight: [V, H] lm_head weight, same dtype and device.
        targets: [N] int32/int64 token ids in [0, V), or ignore_index (logp 0, no gradient, whatever its weight).
        weights: [N] float token weights (a token mean: 1 / count on counted tokens, 0 elsewhere).
        temperature: divides the logits before the softmax; > 0.
        impl: "recompute" (8NVH, O(N + tile) memory) or "onepass" (6NVH, a [C, V] fp32 buffer of
            kernels._onepass.DEFAULT_BUFFER_BYTES; bf16 weights get their gradient accumulated in bf16).
    Returns:
        0-d fp32 loss -sum_n weights_n * logp_n; differentiable w.r.t. hidden and weight (one backward).
    Raises:
        ValueError: bad shapes/dtypes/devices, a target outside [0, V) other than ignore_index, unknown impl.
    """
    check_common(hidden, weight, targets, temperature, ignore_index)
    check_vector("weights", weights, hidden.shape[0], hidden.device)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not torch.is_grad_enabled():  # needs_input_grad ignores no_grad mode: detach so no backward work is done
        hidden, weight = hidden.detach(), weight.detach()
    w = weights.detach().to(acc_dtype(hidden)).contiguous()
    return NLLLossFunction.apply(hidden, weight, targets, w, float(temperature), int(ignore_index), impl)

"""Per-token log-probs (and optionally entropy) of target tokens from hidden states and the lm_head weight.

    z = hidden @ weight.T / temperature        lse[n] = logsumexp_v z[n, v]
    logp[n] = z[n, t_n] - lse[n]               entropy[n] = lse[n] - sum_v p[n, v] * z[n, v]

The full [N, V] logits are never alive at once: the forward keeps only the per-token lse (and entropy), and the
backward recomputes the logits tile by tile. Memory beyond inputs, outputs and gradients is O(N + tile).

Layers: `fused_logprobs_ref` (chunked torch, the spec) and the Triton kernels in `kernels/_logprobs_triton.py`
share one contract, `logprobs_fwd` / `logprobs_bwd`. Losses that compute their upstream gradient in the forward
pass (the Liger approach) call those two directly; `FusedLogprobsFunction` wires them into autograd.
Backend: CUDA tensors -> Triton; CPU tensors -> torch reference, or Triton's interpreter when TRITON_INTERPRET=1
(read at call time). Refs: Liger-Kernel fused linear cross-entropy; arXiv:2411.09009 (Cut Cross-Entropy).

Shapes: N tokens, H hidden size, V vocabulary size, C tokens per chunk.
"""

import os

import torch

from kernels import _onepass
from kernels._common import acc_dtype, check_filter_eps, check_targets, filter_threshold, grad_matmuls, log_once

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_CHUNK_TOKENS = 1024


def _backend(device: torch.device, backend: str | None) -> str:
    """'ref' or 'triton' for this call, the one place the choice is made; logged once per choice."""
    if backend is None:
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        backend = "triton" if device.type == "cuda" or interpret else "ref"
        why = "CUDA tensors" if device.type == "cuda" else ("TRITON_INTERPRET=1" if interpret else "CPU tensors")
        log_once(f"backend-{backend}", "fused_logprobs: backend %s (%s)", backend, why, level=20)
    return backend


def _check(hidden, weight, targets, temperature, backend, ignore_index=-100, check_range=True):
    """Validate the common arguments; return contiguous hidden, weight, targets (copies only if needed).
    check_range: targets in [0, V) or ignore_index (one host sync; callers that checked already pass False)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a [N, H] tensor, got shape {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[1]}], got shape {tuple(getattr(weight, 'shape', ()))}")
    if not isinstance(targets, torch.Tensor) or targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N={hidden.shape[0]}], got shape {tuple(getattr(targets, 'shape', ()))}")
    allowed = _FLOAT_DTYPES + ((torch.float64,) if backend == "ref" else ())  # fp64: reference only (gradcheck)
    if hidden.dtype not in allowed:
        raise ValueError(f"hidden dtype must be one of {allowed}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype must match hidden ({hidden.dtype}), got {weight.dtype}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32/int64, got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, weight, targets must share a device, got {hidden.device}, {weight.device}, "
                         f"{targets.device}")
    if weight.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"weight must be non-empty [V, H], got shape {tuple(weight.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if check_range:
        check_targets(targets, weight.shape[0], ignore_index)
    # The kernels index rows by stride with unit inner stride; a non-contiguous input is copied once here.
    return hidden.contiguous(), weight.contiguous(), targets.contiguous()


def _check_vec(name: str, x, n: int, device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.shape != (n,):
        raise ValueError(f"{name} must be a [N={n}] tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point (fp32), got {x.dtype}")
    return x.float().contiguous() if x.dtype != torch.float64 else x.contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Reference: plain torch, chunked over tokens. fp32 statistics whatever the input dtype (fp64 stays fp64).


def _ref_fwd(hidden_NH, weight_VH, targets_N, temperature, ignore_index, return_entropy, chunk_tokens):
    n = hidden_NH.shape[0]
    acc = torch.float64 if hidden_NH.dtype == torch.float64 else torch.float32
    logp_N = torch.zeros(n, dtype=acc, device=hidden_NH.device)
    lse_N = torch.zeros(n, dtype=acc, device=hidden_NH.device)
    ent_N = torch.zeros(n, dtype=acc, device=hidden_NH.device) if return_entropy else None
    valid_N = targets_N != ignore_index
    safe_N = torch.where(valid_N, targets_N, 0)
    for s in range(0, n, chunk_tokens):
        sl = slice(s, s + chunk_tokens)
        # Logits for one chunk only, upcast: the softmax statistics accumulate in fp32.
        z_CV = (hidden_NH[sl] @ weight_VH.T).to(acc) / temperature
        lse_N[sl] = torch.logsumexp(z_CV, dim=-1)
        logp_N[sl] = z_CV.gather(1, safe_N[sl, None]).squeeze(1) - lse_N[sl]
        if return_entropy:
            ent_N[sl] = lse_N[sl] - (torch.softmax(z_CV, -1) * z_CV).sum(-1)
    logp_N = torch.where(valid_N, logp_N, 0.0)
    if return_entropy:
        ent_N = torch.where(valid_N, ent_N, 0.0)
    return logp_N, lse_N, ent_N


def _ref_bwd(hidden_NH, weight_VH, targets_N, lse_N, g_N, ge_N, ent_N, temperature, ignore_index, need_weight_grad,
             chunk_tokens, threshold=None):
    acc = lse_N.dtype
    valid_N = targets_N != ignore_index
    safe_N = torch.where(valid_N, targets_N, 0)
    g_N = torch.where(valid_N, g_N.to(acc), 0.0)
    if ge_N is not None:
        ge_N = torch.where(valid_N, ge_N.to(acc), 0.0)
        c_N = lse_N - ent_N  # sum_v p * z
    grad_hidden = torch.empty_like(hidden_NH)
    grad_weight = torch.zeros(weight_VH.shape, dtype=acc, device=weight_VH.device) if need_weight_grad else None
    w_VH = weight_VH.to(acc)
    for s in range(0, hidden_NH.shape[0], chunk_tokens):
        sl = slice(s, s + chunk_tokens)
        h_CH = hidden_NH[sl]
        z_CV = (h_CH @ weight_VH.T).to(acc) / temperature
        p_CV = torch.exp(z_CV - lse_N[sl, None])
        # d logp / dz = onehot(target) - p;  d entropy / dz = -p * (z - sum_v p z);  then / temperature.
        d_CV = -p_CV * g_N[sl, None]
        d_CV.scatter_add_(1, safe_N[sl, None], g_N[sl, None])
        if ge_N is not None:
            d_CV -= ge_N[sl, None] * p_CV * (z_CV - c_N[sl, None])
        d_CV /= temperature
        grad_hidden[sl] = grad_matmuls(d_CV, w_VH, h_CH.to(acc), grad_weight, threshold).to(hidden_NH.dtype)
    return grad_hidden, grad_weight


# ---------------------------------------------------------------------------------------------------------------
# The shared contract: dispatch once, then the reference or the Triton launchers.


def logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                 ignore_index: int = -100, return_entropy: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 _backend_override: str | None = None, _check_range: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward without autograd.

    Args:
        hidden: [N, H] fp32/bf16/fp16; weight: [V, H] same dtype; targets: [N] int32/int64 (ignore_index allowed).
        chunk_tokens: tokens per chunk on the torch path (bounds its temporary logits to C x V); unused by Triton.
    Returns:
        (logp [N] fp32, lse [N] fp32, entropy [N] fp32 or None); ignored positions give logp 0 and entropy 0.
    Raises:
        ValueError: a target outside [0, V) other than ignore_index (checked with one host sync).
    """
    backend = _backend(hidden.device, _backend_override)
    hidden, weight, targets = _check(hidden, weight, targets, temperature, backend, ignore_index, _check_range)
    with torch.no_grad():
        if backend == "ref" or hidden.shape[0] == 0:
            return _ref_fwd(hidden, weight, targets, float(temperature), ignore_index, return_entropy,
                            int(chunk_tokens))
        from kernels._logprobs_triton import _logprobs_fwd
        return _logprobs_fwd(hidden, weight, targets, float(temperature), ignore_index, return_entropy)


def logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                 grad_logp: torch.Tensor, *, grad_entropy: torch.Tensor | None = None,
                 entropy: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                 need_weight_grad: bool = True, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, filter_eps: float = 0.0,
                 _backend_override: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of sum(grad_logp * logp + grad_entropy * entropy) w.r.t. hidden and weight, without autograd.

    Args:
        lse: [N] fp32 from `logprobs_fwd`; grad_logp: [N] fp32 upstream gradient.
        grad_entropy, entropy: [N] fp32, both or neither (entropy from `logprobs_fwd(return_entropy=True)`).
        need_weight_grad: False skips the grad_weight matmul (and its [V, H] fp32 buffer).
        filter_eps: 0 (exact) or the approximate gradient of `fused_logprobs(filter_eps=...)`.
    Returns:
        (grad_hidden [N, H] in hidden.dtype, grad_weight [V, H] fp32 or None). Targets are not range-checked here
        (they went through `logprobs_fwd`, which produced lse).
    """
    backend = _backend(hidden.device, _backend_override)
    hidden, weight, targets = _check(hidden, weight, targets, temperature, backend, ignore_index, False)
    n = hidden.shape[0]
    lse = _check_vec("lse", lse, n, hidden.device)
    grad_logp = _check_vec("grad_logp", grad_logp, n, hidden.device)
    if (grad_entropy is None) != (entropy is None):
        raise ValueError("grad_entropy and entropy must be given together (entropy from logprobs_fwd)")
    if grad_entropy is not None:
        grad_entropy = _check_vec("grad_entropy", grad_entropy, n, hidden.device)
        entropy = _check_vec("entropy", entropy, n, hidden.device)
    with torch.no_grad():
        threshold = filter_threshold(check_filter_eps(filter_eps), temperature, grad_logp, grad_entropy)
        if backend == "ref" or n == 0:
            return _ref_bwd(hidden, weight, targets, lse, grad_logp, grad_entropy, entropy, float(temperature),
                            ignore_index, need_weight_grad, int(chunk_tokens), threshold)
        from kernels._logprobs_triton import _logprobs_bwd
        return _logprobs_bwd(hidden, weight, targets, lse, grad_logp, grad_entropy, entropy, float(temperature),
                             ignore_index, need_weight_grad, threshold)


class FusedLogprobsFunction(torch.autograd.Function):
    """forward = logprobs_fwd, backward = logprobs_bwd; saves only lse (and entropy), O(N).

    impl="onepass": both directions through kernels/_onepass.py instead (cuBLAS logits per chunk + the Triton row
    kernel; 8NVH in all, every matmul in cuBLAS), entropy gradients included."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, temperature, ignore_index, return_entropy, chunk_tokens,
                backend, impl, filter_eps=0.0):
        if impl == "onepass":
            logp_N, lse_N, ent_N, _, _ = onepass_call(hidden_NH, weight_VH, targets_N, None, temperature=temperature,
                                                      need_h=False, need_w=False, ignore_index=ignore_index,
                                                      return_entropy=return_entropy, backend=backend)
        else:
            logp_N, lse_N, ent_N = logprobs_fwd(hidden_NH, weight_VH, targets_N, temperature=temperature,
                                                ignore_index=ignore_index, return_entropy=return_entropy,
                                                chunk_tokens=chunk_tokens, _backend_override=backend)
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse_N, ent_N)
        ctx.args = (temperature, ignore_index, chunk_tokens, backend, impl, filter_eps)
        ctx.set_materialize_grads(False)  # an unused output (e.g. entropy) sends None: skip its term
        return (logp_N, ent_N) if return_entropy else logp_N

    @staticmethod
    def backward(ctx, grad_logp_N, grad_ent_N=None):
        hidden_NH, weight_VH, targets_N, lse_N, ent_N = ctx.saved_tensors
        temperature, ignore_index, chunk_tokens, backend, impl, filter_eps = ctx.args
        if grad_logp_N is None:
            grad_logp_N = torch.zeros_like(lse_N)
        if impl == "onepass":
            n = lse_N.shape[0]
            grad = _onepass.Known(_check_vec("grad_logp", grad_logp_N, n, hidden_NH.device),
                                  None if grad_ent_N is None else
                                  _check_vec("grad_entropy", grad_ent_N, n, hidden_NH.device))
            _, _, _, grad_hidden, grad_weight = onepass_call(
                hidden_NH, weight_VH, targets_N, grad, temperature=temperature, need_h=ctx.needs_input_grad[0],
                need_w=ctx.needs_input_grad[1], ignore_index=ignore_index, return_entropy=grad.ge is not None,
                backend=backend, check_range=False,
                filter_threshold=filter_threshold(filter_eps, temperature, grad.g, grad.ge))
        else:
            grad_hidden, grad_weight = logprobs_bwd(
                hidden_NH, weight_VH, targets_N, lse_N, grad_logp_N, grad_entropy=grad_ent_N,
                entropy=ent_N if grad_ent_N is not None else None, temperature=temperature,
                ignore_index=ignore_index, need_weight_grad=ctx.needs_input_grad[1], chunk_tokens=chunk_tokens,
                filter_eps=filter_eps, _backend_override=backend)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_VH.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def onepass_call(hidden, weight, targets, grad, *, temperature: float, need_h: bool, need_w: bool,
                 ignore_index: int = -100, return_entropy: bool = False, backend: str | None = None, groups=None,
                 check_range: bool = True, filter_threshold: torch.Tensor | None = None):
    """kernels._onepass.onepass after the usual checks and backend choice; groups None: consecutive chunks sized
    by its buffer budget. `grad`: see `_onepass.onepass`. Used by FusedLogprobsFunction and the losses."""
    backend = _backend(hidden.device, backend)
    hidden, weight, targets = _check(hidden, weight, targets, temperature, backend, ignore_index, check_range)
    if groups is None:
        chunk = _onepass.chunk_tokens(weight.shape[0], elem_bytes=acc_dtype(hidden).itemsize)
        groups = _onepass.token_chunks(hidden.shape[0], chunk)
    with torch.no_grad():
        return _onepass.onepass(hidden, weight, targets, groups, grad, temperature=temperature,
                                ignore_index=ignore_index, return_entropy=return_entropy, need_hidden_grad=need_h,
                                need_weight_grad=need_w, backend=backend, filter_threshold=filter_threshold)


# ---------------------------------------------------------------------------------------------------------------
# "Gradient in the forward" (Liger's approach) for losses whose dLoss/dlogp is closed form: kernels/grpo_loss.py,
# dpo_loss.py, nll_loss.py compute the gradients in their forward and scale them in backward (scale_saved_grads).


def grads_in_forward(ctx, hidden, weight, targets, lse, grad_logp, temperature, ignore_index=-100):
    """Run logprobs_bwd now (only if hidden or weight needs a gradient); weight's grad is kept in weight.dtype."""
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_h or need_w):
        return None, None
    gh, gw = logprobs_bwd(hidden, weight, targets, lse, grad_logp, temperature=temperature, need_weight_grad=need_w,
                          ignore_index=ignore_index)
    # Autograd would cast to weight.dtype anyway; doing it now halves what is held until backward (bf16 weights).
    return (gh if need_h else None), (gw.to(weight.dtype) if need_w else None)


def onepass_forward(ctx, hidden, weight, targets, groups, grad, temperature, return_entropy, ignore_index=-100):
    """`kernels._onepass.onepass` for a loss's forward: (logp, entropy, (grad_hidden, grad_weight)) with only the
    gradients autograd asked for. groups None: consecutive chunks of tokens sized by the buffer budget. The
    caller has range-checked the targets."""
    logp, _, entropy, gh, gw = onepass_call(hidden, weight, targets, grad, temperature=temperature,
                                            need_h=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1],
                                            return_entropy=return_entropy, groups=groups, check_range=False,
                                            ignore_index=ignore_index)
    return logp, entropy, (gh, gw)


def fused_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                       temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                       chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """The torch reference of `fused_logprobs` on any device (also fp64, for gradcheck); same arguments."""
    return FusedLogprobsFunction.apply(hidden, weight, targets, float(temperature), ignore_index,
                                       bool(return_entropy), int(chunk_tokens), "ref", "recompute")


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, return_entropy: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                   impl: str = "recompute", filter_eps: float = 0.0):
    """Log-probs of `targets` under softmax(hidden @ weight.T / temperature), without [N, V] logits.

    Args:
        hidden: [N, H] fp32/bf16/fp16 last hidden states.
        weight: [V, H] lm_head weight, same dtype and device as hidden.
        targets: [N] int64/int32 token ids; `ignore_index` positions give logp 0, entropy 0 and no gradient.
        temperature: divides the logits before the softmax; > 0.
        return_entropy: also return the entropy of the full distribution per token.
        chunk_tokens: tokens per chunk on the torch path (CPU); the Triton path tiles by itself.
        impl: "recompute" (Triton logits tiles in the forward and again in the backward; O(N + tile) memory) or
            "onepass" (cuBLAS logits per chunk into a [C, V] fp32 buffer plus the Triton row kernel,
            kernels/_onepass.py: every matmul in cuBLAS). Which is faster on a GPU: bench/bench_kernels_gpu.py.
        filter_eps: 0 (default) gives exact gradients. In [0, 1): an approximate backward (Cut Cross-Entropy's
            idea) that leaves out, per chunk of tokens, the FILTER_TILE-wide vocabulary tiles whose every
            |dlogits| is <= filter_eps x (largest upstream |gradient|) / temperature, i.e. whose probabilities
            are all <= filter_eps for a unit upstream gradient; the dx/dW matmuls then run over the kept columns
            only. The forward is exact either way; the gradient error is printed by bench/bench_kernels_gpu.py.
    Raises:
        ValueError: bad shapes/dtypes/devices, a target outside [0, V) other than ignore_index, a bad filter_eps.
    Returns:
        logp [N] fp32, or (logp, entropy) [N] fp32 each; differentiable w.r.t. hidden and weight.
    """
    if impl not in ("recompute", "onepass"):
        raise ValueError(f"impl must be 'recompute' or 'onepass', got {impl!r}")
    return FusedLogprobsFunction.apply(hidden, weight, targets, float(temperature), ignore_index,
                                       bool(return_entropy), int(chunk_tokens), None, impl,
                                       check_filter_eps(filter_eps))

"""One-pass fused losses (6NVH): each chunk's logits are computed once, used for the log-probs and the gradients.

Why: a loss that knows dLoss/dlogp of a token as soon as it knows the token's log-prob (GRPO and NLL: each token
alone; DPO: each pair of sequences) does not need the recompute path (`logprobs_fwd`, then `logprobs_bwd`, 8NVH,
see kernels/grpo_loss.py). Here, per chunk of C tokens (rows `idx`), all in the loss's forward:

    z  = x[idx] @ W.T                                cuBLAS, fp32 output, into a [C, V] fp32 buffer   2CVH
    lse, logp, entropy; g = dLoss/dlogp;             `_row_kernel`, one program per row: pass 1 reads z for the
    d  = g * (onehot(target) - softmax(z / T)) / T   row statistics, pass 2 reads z again and writes d in the input
                                                     dtype over the same buffer (in place)
    dx[idx] = d @ W                                  cuBLAS                                            2CVH
    dW     += d.T @ x[idx]                           cuBLAS, accumulated in dW's dtype                 2CVH

How g is known decides the passes (`grad`):
- `Known(g, ge)`: given before the chunk (NLL's token weights; fused_logprobs' backward): one row kernel.
- `GRPOGrad`: the clipped surrogate's closed form evaluated inside the row kernel from the row's logp: one kernel.
- a callable `grad_fn(idx, logp)` (DPO: a token's gradient needs its pair's sequence log-probs): the row kernel
  for the statistics, grad_fn in torch, then the row kernel again reading lse (pass 2 only).
- None: statistics only (no gradient).

All three matmuls run at cuBLAS speed; the row kernel is memory-bound (reads the buffer twice, writes half of it).
Memory: C x V x 4 bytes of buffer, C set by DEFAULT_BUFFER_BYTES (`chunk_tokens`), plus the gradients. In place:
a row's d (bf16/fp16) is written over the first half of that row's fp32 logits; tile t's stores land on bytes of
tiles <= t, which every warp has read before the barrier that precedes the stores (`tl.debug_barrier`), so no
logit is overwritten before it is read. cuBLAS then reads d as a strided [C, V] matrix (row stride 2V).
Numerics: statistics from fp32 logits of an fp32-accumulated matmul; d rounded to the input dtype for the tensor
cores; dW of a bf16/fp16 weight accumulated in that dtype by cuBLAS (fp32 inside each addmm, one rounding per
chunk, as Liger-Kernel's fused linear cross-entropy does), which keeps a [V, H] fp32 accumulator (2 GiB at the 7B
shape) out of memory.

Backends, as in kernels/fused_logprobs.py: CUDA tensors -> the Triton row kernel; CPU tensors -> the torch
reference below (`row_ref`), or the Triton kernel under TRITON_INTERPRET=1. The matmuls are torch in every case.

Shapes: N tokens, H hidden size, V vocabulary size, C tokens in a chunk.
"""

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import torch

from kernels._common import acc_dtype, grad_matmuls, log_once

DEFAULT_BUFFER_BYTES = 512 << 20
# DPO needs a whole chosen/rejected pair in one chunk: its buffer grows past the default up to this for one pair
# (2 GiB: 3,531 tokens, e.g. two 1,765-token responses, at V = 152,064); a longer pair takes the recompute path.
MAX_PAIR_BUFFER_BYTES = 2 << 30
# TODO: tune on a GPU (bench/bench_kernels_gpu.py times the configurations); one row per program, 4,096-wide tiles.
CUDA_ROW_CONFIG = dict(BLOCK_V=4096, num_warps=8)
INTERP_ROW_CONFIG = dict(BLOCK_V=64, num_warps=1)  # small tiles so the tests cross several of them
KL_MODES = {"k1": 1, "k2": 2, "k3": 3, "low_var_kl": 4}  # the row kernel's KL_MODE; 0 = no KL term

Index = slice | torch.Tensor  # a chunk's rows: a slice, or an int64 index tensor on hidden's device


def chunk_tokens(vocab_size: int, buffer_bytes: int | None = None, elem_bytes: int = 4) -> int:
    """Tokens per chunk so that the logits buffer ([C, V] of elem_bytes: fp32, or fp64 for fp64 inputs; dlogits are
    written in place) fits in `buffer_bytes` (default: DEFAULT_BUFFER_BYTES, read at call time); a multiple of 64
    when at least 64."""
    c = (DEFAULT_BUFFER_BYTES if buffer_bytes is None else buffer_bytes) // (vocab_size * elem_bytes)
    return max(1, c // 64 * 64 if c >= 64 else c)


def token_chunks(n: int, c: int) -> list[slice]:
    return [slice(s, min(n, s + c)) for s in range(0, n, c)]


def _size(idx: Index, n: int) -> int:
    return len(range(*idx.indices(n))) if isinstance(idx, slice) else idx.numel()


@dataclasses.dataclass
class Known:
    """Per-token gradients known before the pass: dLoss/dlogp [N] fp32 and optionally dLoss/dentropy [N]."""
    g: torch.Tensor
    ge: torch.Tensor | None = None


@dataclasses.dataclass
class GRPOGrad:
    """dLoss/dlogp of the GRPO/DAPO surrogate (+ KL), evaluated per row in the kernel (kernels/grpo_loss.py has the
    formulas): g = w * (dpg/dlogp + kl_coef * dkl/dlogp). Tensors are [N] fp32; old None means on-policy (old =
    logp). `torch_fn(idx, logp_N) -> g [C]` is the same closed form in torch, used by the reference backend."""
    advantages: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None
    token_weights: torch.Tensor
    clip_low: float
    clip_high: float
    dual_clip: float | None
    kl_coef: float
    kl_estimator: str
    torch_fn: Callable[[Index, torch.Tensor], torch.Tensor]


GradSpec = Known | GRPOGrad | Callable[[Index, torch.Tensor], torch.Tensor] | None


# ---------------------------------------------------------------------------------------------------------------
# References of the row kernel: plain torch on a [C, V] logits chunk.


def row_stats_ref(z_CV: torch.Tensor, targets_C: torch.Tensor, inv_temp: float, return_entropy: bool):
    """(lse [C], target logit [C], entropy [C] or None) of softmax(z * inv_temp); targets already made safe."""
    s_CV = z_CV * inv_temp
    lse_C = torch.logsumexp(s_CV, dim=-1)
    zt_C = s_CV.gather(1, targets_C[:, None]).squeeze(1)
    ent_C = lse_C - (torch.softmax(s_CV, -1) * s_CV).sum(-1) if return_entropy else None
    return lse_C, zt_C, ent_C


def dlogits_ref(z_CV, targets_C, lse_C, g_C, inv_temp: float, out: torch.Tensor, ge_C=None, c_C=None) -> None:
    """out [C, V] = (g * (onehot(target) - p) - ge * p * (s - c)) * inv_temp in out's dtype, where s = z * inv_temp,
    p = softmax(s) and c = sum_v p s = lse - entropy: the gradient of g * logp + ge * entropy. g = ge = 0 on
    ignored rows; ge, c None: no entropy term. `out` may share memory with z_CV (d is computed before it is
    written)."""
    s_CV = z_CV * inv_temp
    p_CV = torch.exp(s_CV - lse_C[:, None])
    d_CV = -p_CV * g_C[:, None]
    d_CV.scatter_add_(1, targets_C[:, None], g_C[:, None])
    if ge_C is not None:
        d_CV -= ge_C[:, None] * p_CV * (s_CV - c_C[:, None])
    out.copy_(d_CV * inv_temp)


# ---------------------------------------------------------------------------------------------------------------
# The Triton row kernel (built lazily, so this module imports without triton on CPU-only installs).


def _kernel_source():
    import triton.language as tl

    def _row_kernel(Z_ptr, D_ptr, T_ptr, LSE_ptr, LOGP_ptr, ENT_ptr, G_ptr, GE_ptr, ADV_ptr, OLD_ptr, REF_ptr, W_ptr,
                    V, stride_z, stride_d, inv_temp, ignore_index, clip_low, clip_high, dual_clip, kl_coef,
                    BLOCK_V: tl.constexpr, STATS: tl.constexpr, HAS_ENT: tl.constexpr, G_MODE: tl.constexpr,
                    HAS_GE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DUAL: tl.constexpr, KL_MODE: tl.constexpr):
        # One program per row. STATS: pass 1 computes lse/logp/entropy (else lse is loaded). G_MODE: 0 no gradient,
        # 1 g (and ge) loaded, 2 GRPO's dLoss/dlogp computed here. Pass 2 writes d over the row (see module doc).
        row = tl.program_id(0)
        zrow = Z_ptr + row.to(tl.int64) * stride_z
        tgt = tl.load(T_ptr + row)
        valid = tgt != ignore_index
        safe = tl.where(valid, tgt, 0)
        if STATS:
            # Each lane keeps its own running max / sum exp / sum exp * z; lanes merge at the end (no cross-lane
            # reduction per tile). Columns past V read as a finite -1e30, so no lane computes -inf - (-inf) = NaN.
            m = tl.full([BLOCK_V], -1e30, tl.float32)
            s = tl.zeros([BLOCK_V], tl.float32)
            a = tl.zeros([BLOCK_V], tl.float32)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                mask = offs < V
                z = tl.where(mask, tl.load(zrow + offs, mask=mask, other=0.0) * inv_temp, -1e30)
                m_new = tl.maximum(m, z)
                alpha = tl.exp(m - m_new)
                e = tl.where(mask, tl.exp(z - m_new), 0.0)
                s = s * alpha + e
                if HAS_ENT:
                    a = a * alpha + e * z
                m = m_new
            m_row = tl.max(m, 0)
            scale = tl.exp(m - m_row)  # lanes that never saw a column have s = a = 0
            s_row = tl.sum(s * scale, 0)
            lse = m_row + tl.log(s_row)
            logp = tl.where(valid, tl.load(zrow + safe) * inv_temp - lse, 0.0)
            tl.store(LSE_ptr + row, lse)
            tl.store(LOGP_ptr + row, logp)
            if HAS_ENT:
                ent = lse - tl.sum(a * scale, 0) / s_row
                tl.store(ENT_ptr + row, tl.where(valid, ent, 0.0))
        else:
            lse = tl.load(LSE_ptr + row)
            logp = tl.load(LOGP_ptr + row)
        if G_MODE != 0:
            if G_MODE == 1:
                g = tl.load(G_ptr + row)
            else:  # GRPO/DAPO: kernels/grpo_loss.py `_grpo_terms_closed_form`, the same subgradient choices
                adv = tl.load(ADV_ptr + row)
                if HAS_OLD:
                    diff = logp - tl.load(OLD_ptr + row)
                else:
                    diff = logp - logp  # on-policy: old = logp, ratio exactly 1
                ratio = tl.exp(tl.minimum(tl.maximum(diff, -20.0), 20.0))  # grpo_loss._LOG_RATIO_CLAMP
                pg1 = -adv * ratio
                pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
                clipped = pg2 > pg1  # outside the trust region: constant loss, no gradient
                g = tl.where(clipped | (tl.abs(diff) > 20.0), 0.0, pg1)
                if HAS_DUAL:
                    g = tl.where((adv < 0) & (-adv * dual_clip < tl.where(clipped, pg2, pg1)), 0.0, g)
                if KL_MODE != 0:
                    dr = tl.load(REF_ptr + row) - logp
                    if KL_MODE == 1:
                        dkl = 1.0 + 0.0 * dr
                    elif KL_MODE == 2:
                        dkl = -dr
                    elif KL_MODE == 3:
                        dkl = 1.0 - tl.exp(dr)
                    else:  # low_var_kl: clamped log-ratio and estimate
                        dc = tl.minimum(tl.maximum(dr, -20.0), 20.0)
                        kld = tl.exp(dc) - dc - 1.0
                        dkl = tl.where((tl.abs(dr) <= 20.0) & (kld <= 10.0), 1.0 - tl.exp(dc), 0.0)
                    g = g + kl_coef * dkl
                g = tl.load(W_ptr + row) * g
            g = tl.where(valid, g, 0.0)
            if HAS_GE:  # entropy gradient (needs STATS and HAS_ENT): d entropy / d s = -p * (s - sum_v p s)
                ge = tl.where(valid, tl.load(GE_ptr + row), 0.0)
                c = lse - ent
            drow = D_ptr + row.to(tl.int64) * stride_d
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                mask = offs < V
                z = tl.load(zrow + offs, mask=mask, other=0.0) * inv_temp
                p = tl.exp(z - lse)
                d = tl.where(offs == safe, g, 0.0) - g * p
                if HAS_GE:
                    d -= ge * p * (z - c)
                d = d * inv_temp
                # d may overwrite this row's logits (in place): every warp has read this tile and all earlier ones
                # (their values are consumed by d) before any warp stores; stores of tile t only touch tiles <= t.
                tl.debug_barrier()
                tl.store(drow + offs, d.to(D_ptr.dtype.element_ty), mask=mask)

    return _row_kernel


@functools.cache
def _kernel(interpret: bool):
    src = _kernel_source()
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(src)
    import triton
    return triton.jit(src)


def _row_launch(z_CV, d_CV, t_C, lse_C, logp_C, ent_C, *, inv_temp: float, ignore_index: int, stats: bool,
                return_entropy: bool, g_mode: int, g_C=None, ge_C=None, grpo: GRPOGrad | None = None, idx=None,
                interpret: bool):
    """One launch of `_row_kernel` over the C rows of a chunk; unused pointers get a dummy (never read)."""
    c, v = z_CV.shape
    dummy = lse_C
    kw = dict(ADV_ptr=dummy, OLD_ptr=dummy, REF_ptr=dummy, W_ptr=dummy, clip_low=0.0, clip_high=0.0, dual_clip=0.0,
              kl_coef=0.0, HAS_OLD=False, HAS_DUAL=False, KL_MODE=0)
    if grpo is not None:
        kl_on = grpo.kl_coef > 0 and grpo.ref is not None
        kw.update(ADV_ptr=grpo.advantages[idx].contiguous(), W_ptr=grpo.token_weights[idx].contiguous(),
                  OLD_ptr=dummy if grpo.old is None else grpo.old[idx].contiguous(),
                  REF_ptr=grpo.ref[idx].contiguous() if kl_on else dummy, clip_low=grpo.clip_low,
                  clip_high=grpo.clip_high, dual_clip=grpo.dual_clip or 0.0, kl_coef=grpo.kl_coef,
                  HAS_OLD=grpo.old is not None, HAS_DUAL=grpo.dual_clip is not None,
                  KL_MODE=KL_MODES[grpo.kl_estimator] if kl_on else 0)
    cfg = INTERP_ROW_CONFIG if interpret else CUDA_ROW_CONFIG
    _kernel(interpret)[(c,)](
        z_CV, z_CV if d_CV is None else d_CV, t_C, lse_C, logp_C, dummy if ent_C is None else ent_C,
        dummy if g_C is None else g_C, dummy if ge_C is None else ge_C, V=v, stride_z=z_CV.stride(0),
        stride_d=z_CV.stride(0) if d_CV is None else d_CV.stride(0), inv_temp=inv_temp, ignore_index=ignore_index,
        STATS=stats, HAS_ENT=return_entropy, G_MODE=g_mode, HAS_GE=ge_C is not None, **kw, **cfg)


def _rows_triton(z_CV, d_CV, t_C, idx, grad: GradSpec, logp_N, lse_N, ent_N, inv_temp, ignore_index, interpret):
    """Statistics of the chunk's rows into the [N] outputs, and (grad given) d into d_CV: one launch, or two for
    a callable grad (statistics, then the torch gradient, then pass 2 reading lse)."""
    c = z_CV.shape[0]
    lse_C = torch.empty(c, dtype=torch.float32, device=z_CV.device)
    logp_C, ent_C = torch.empty_like(lse_C), (torch.empty_like(lse_C) if ent_N is not None else None)
    common = dict(inv_temp=inv_temp, ignore_index=ignore_index, return_entropy=ent_N is not None, interpret=interpret)
    if isinstance(grad, Known):
        ge_C = None if grad.ge is None else grad.ge[idx].contiguous()
        _row_launch(z_CV, d_CV, t_C, lse_C, logp_C, ent_C, stats=True, g_mode=1, g_C=grad.g[idx].contiguous(),
                    ge_C=ge_C, **common)
    elif isinstance(grad, GRPOGrad):
        _row_launch(z_CV, d_CV, t_C, lse_C, logp_C, ent_C, stats=True, g_mode=2, grpo=grad, idx=idx, **common)
    else:
        _row_launch(z_CV, None, t_C, lse_C, logp_C, ent_C, stats=True, g_mode=0, **common)
    logp_N[idx], lse_N[idx] = logp_C, lse_C
    if ent_N is not None:
        ent_N[idx] = ent_C
    if grad is not None and not isinstance(grad, Known | GRPOGrad):
        g_C = grad(idx, logp_N).to(torch.float32).contiguous()
        _row_launch(z_CV, d_CV, t_C, lse_C, logp_C, None, stats=False, g_mode=1, g_C=g_C,
                    **{**common, "return_entropy": False})


def _rows_ref(z_CV, d_CV, t_C, idx, grad: GradSpec, logp_N, lse_N, ent_N, inv_temp, ignore_index):
    """The torch twin of `_rows_triton`."""
    ok_C = t_C != ignore_index
    safe_C = torch.where(ok_C, t_C, 0)
    lse_C, zt_C, ent_C = row_stats_ref(z_CV, safe_C, inv_temp, ent_N is not None)
    logp_N[idx], lse_N[idx] = torch.where(ok_C, zt_C - lse_C, 0.0), lse_C
    if ent_N is not None:
        ent_N[idx] = torch.where(ok_C, ent_C, 0.0)
    if grad is None:
        return
    ge_C = c_C = None
    if isinstance(grad, Known):
        g_C = grad.g[idx]
        if grad.ge is not None:
            ge_C, c_C = torch.where(ok_C, grad.ge[idx].to(lse_C.dtype), 0.0), lse_C - ent_C
    elif isinstance(grad, GRPOGrad):
        g_C = grad.torch_fn(idx, logp_N)
    else:
        g_C = grad(idx, logp_N)
    g_C = torch.where(ok_C, g_C.to(lse_C.dtype), 0.0)
    dlogits_ref(z_CV, safe_C, lse_C, g_C, inv_temp, d_CV, ge_C, c_C)


# ---------------------------------------------------------------------------------------------------------------
# The driver.


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b with out's (wider) dtype: cuBLAS writes fp32 straight from bf16 operands (torch >= 2.8, CUDA);
    older CUDA builds round through a low-precision temporary (logged once); CPU (tests) multiplies upcast copies,
    which gives the fp32 products cuBLAS gives."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    elif not a.is_cuda:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)
    else:
        try:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
        except (TypeError, RuntimeError, NotImplementedError) as e:
            log_once("mm-out-dtype", "kernels: torch.mm(out_dtype=%s) is not available (%s): logits are computed "
                     "in %s and then upcast, which rounds them (torch >= 2.8 avoids this)", out.dtype, e, a.dtype)
            out.copy_(a @ b)


def onepass(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, groups: Sequence[Index],
            grad: GradSpec, *, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
            need_hidden_grad: bool = True, need_weight_grad: bool = True, backend: str = "ref",
            filter_threshold: torch.Tensor | None = None):
    """Log-probs and the gradients of sum_n g_n * logp_n (+ ge_n * entropy_n), chunk by chunk.

    Args:
        hidden [N, H], weight [V, H], targets [N]: validated and contiguous (the callers' checks).
        groups: chunks of rows (slices or int64 index tensors) that together cover every token once; the buffer
            is sized by the largest. With a callable grad, a chunk must hold every token the callable needs.
        grad: `Known`, `GRPOGrad`, a callable grad_fn(idx, logp_N) -> dLoss/dlogp [C] (logp_N has the rows of
            this and all earlier chunks filled in), or None (statistics only). Known.ge needs return_entropy.
        backend: "ref" (torch row math, fp32/fp64 gradient matmuls) or "triton" (CUDA, or the interpreter under
            TRITON_INTERPRET=1; matmuls in the input dtype, as on a GPU).
        filter_threshold: None (exact) or the |dlogits| at or below which whole vocabulary tiles of a chunk are
            left out of the gradient matmuls (kernels._common.grad_matmuls).
    Returns:
        (logp [N], lse [N], entropy [N] or None, grad_hidden [N, H] in hidden.dtype or None, grad_weight [V, H]
        in weight.dtype or None); ignored targets give logp 0, entropy 0 and no gradient.
    """
    n, v = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "triton" and not (hidden.is_cuda or interpret):
        raise RuntimeError("the Triton one-pass path needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    if isinstance(grad, Known) and grad.ge is not None and not return_entropy:
        raise ValueError("an entropy gradient (Known.ge) needs return_entropy=True")
    if not (need_hidden_grad or need_weight_grad):
        grad = None
    mm_dtype = hidden.dtype if backend == "triton" else acc
    cmax = max((_size(idx, n) for idx in groups), default=0)
    z_buf = torch.empty(cmax, v, dtype=acc, device=hidden.device)
    # dlogits in place: the input dtype's view of the same bytes (row stride 2V for bf16/fp16, V for fp32)
    d_buf = z_buf if mm_dtype == acc else z_buf.view(mm_dtype)[:, :v]
    w_mm = weight.to(mm_dtype)  # a no-op on the Triton path
    logp = torch.zeros(n, dtype=acc, device=hidden.device)
    lse = torch.zeros(n, dtype=acc, device=hidden.device)
    entropy = torch.zeros(n, dtype=acc, device=hidden.device) if return_entropy else None
    dx = torch.zeros_like(hidden) if grad is not None and need_hidden_grad else None
    dw = None
    if grad is not None and need_weight_grad:
        dw = torch.zeros(weight.shape, dtype=weight.dtype if backend == "triton" else acc, device=hidden.device)
    inv_temp = 1.0 / temperature
    for idx in groups:
        c = _size(idx, n)
        if c == 0:
            continue
        x_mm, t_C, z_CV = hidden[idx].to(mm_dtype), targets[idx].contiguous(), z_buf[:c]
        _mm_into(z_CV, x_mm, w_mm.T)
        d_CV = d_buf[:c]
        if backend == "triton":
            _rows_triton(z_CV, d_CV, t_C, idx, grad, logp, lse, entropy, inv_temp, ignore_index, interpret)
        else:
            _rows_ref(z_CV, d_CV, t_C, idx, grad, logp, lse, entropy, inv_temp, ignore_index)
        if dx is not None or dw is not None:
            dx_CH = grad_matmuls(d_CV, w_mm, x_mm, dw, filter_threshold, _addmm_inplace, need_dx=dx is not None)
            if dx is not None:
                dx[idx] = dx_CH.to(hidden.dtype)
    if dw is not None:
        dw = dw.to(weight.dtype)
    return logp, lse, entropy, dx, dw


def _addmm_inplace(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    out.addmm_(a, b)


def sm90_specs():
    """Every (fn, signature, constexprs, num_warps, num_stages, label) the CUDA path of `onepass` compiles, for the
    sm_90a static checks (kernels/_sm90.py, tests/test_sm90_compile.py): the row kernel in each mode the driver
    launches (statistics only; gradient loaded, with and without the entropy term; GRPO in the kernel with each KL
    estimator, on- and off-policy, dual clip; pass 2 only for DPO), dlogits written in bf16 (in place) or fp32,
    int64 targets, CUDA_ROW_CONFIG (num_stages: Triton's default, 3, as the launcher passes none).

    ":16" marks the pointers (torch allocations and 64-token-aligned chunk slices, 16-byte aligned), which Triton
    specialises at launch; V and the row strides are left plain since any vocabulary size can occur.
    """
    fn, cfg = _kernel_source(), CUDA_ROW_CONFIG
    flags = ("BLOCK_V", "STATS", "HAS_ENT", "G_MODE", "HAS_GE", "HAS_OLD", "HAS_DUAL", "KL_MODE")
    modes = [  # (label, STATS, HAS_ENT, G_MODE, HAS_GE, HAS_OLD, HAS_DUAL, KL_MODE)
        ("stats", 1, 0, 0, 0, 0, 0, 0), ("stats-ent", 1, 1, 0, 0, 0, 0, 0), ("known", 1, 0, 1, 0, 0, 0, 0),
        ("known-entgrad", 1, 1, 1, 1, 0, 0, 0), ("pass2", 0, 0, 1, 0, 0, 0, 0),
        ("grpo-on-policy", 1, 1, 2, 0, 0, 0, 0), ("grpo-dual", 1, 1, 2, 0, 1, 1, 0),
    ] + [(f"grpo-kl{k}", 1, 1, 2, 0, 1, 0, k) for k in (1, 2, 3, 4)]
    specs = []
    for out in ("bf16", "fp32"):
        for label, *values in modes:
            if out == "fp32" and label not in ("known-entgrad", "grpo-kl3", "pass2"):
                continue  # fp32 inputs: a few modes suffice (same code, wider stores)
            sig = {"Z_ptr": "*fp32:16", "D_ptr": f"*{out}:16", "T_ptr": "*i64:16",
                   **{p: "*fp32:16" for p in ("LSE_ptr", "LOGP_ptr", "ENT_ptr", "G_ptr", "GE_ptr", "ADV_ptr",
                                              "OLD_ptr", "REF_ptr", "W_ptr")},
                   "V": "i32", "stride_z": "i32", "stride_d": "i32", "inv_temp": "fp32", "ignore_index": "i32",
                   **{p: "fp32" for p in ("clip_low", "clip_high", "dual_clip", "kl_coef")},
                   **{f: "constexpr" for f in flags}}
            constexprs = dict(zip(flags, [cfg["BLOCK_V"], *(bool(v) if i in (0, 1, 3, 4, 5) else v
                                                            for i, v in enumerate(values))], strict=True))
            specs.append((fn, sig, constexprs, cfg["num_warps"], 3, f"onepass_row-{out}-{label}"))
    return specs

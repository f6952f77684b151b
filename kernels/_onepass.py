"""One-pass fused losses (6NVH): each chunk's logits are computed once, used for the log-probs and the gradients.

Why: a loss that knows dLoss/dlogp of a token as soon as it knows the token's log-prob (GRPO: each token alone;
DPO: each pair of sequences) does not need the recompute path (`logprobs_fwd`, then `logprobs_bwd`, 8NVH, see
kernels/grpo_loss.py). Here, per chunk of C tokens (rows `idx`), all in the loss's forward:

    z  = x[idx] @ W.T                                cuBLAS, fp32 output, a [C, V] buffer         2CVH
    lse, logp, entropy                               `_row_stats_kernel`: one program per row, one read of z
    g  = grad_fn(idx, logp)                          the loss's closed-form dLoss/dlogp ([C] torch ops)
    d  = g * (onehot(target) - softmax(z / T)) / T   `_dlogits_kernel`: read z, write d in the input dtype
         (+ the entropy term when grad_fn also returns dLoss/dentropy)
    dx[idx] = d @ W                                  cuBLAS                                         2CVH
    dW     += d.T @ x[idx]                           cuBLAS, accumulated in dW's dtype              2CVH

All three matmuls run at cuBLAS speed; the two Triton kernels are memory-bound passes over the fp32 buffer.
Memory: C x V x (4 + itemsize) bytes of buffers, with C set by DEFAULT_BUFFER_BYTES (512 MiB: C = 576 tokens at
V = 152,064 in bf16; `chunk_tokens`), plus the gradients. Numerics: the softmax statistics see fp32 logits from an
fp32-accumulated matmul (as the recompute path does); d is rounded to the input dtype for the tensor cores (as
there); dW of a bf16/fp16 weight is accumulated in that dtype by cuBLAS (fp32 inside each addmm, one rounding per
chunk, as Liger-Kernel's fused linear cross-entropy does), which keeps the [V, H] fp32 accumulator (2 GiB at the
7B shape) out of memory. The error that adds is measured in tests/_interp_onepass.py against the bf16 reference.

Backends, as in kernels/fused_logprobs.py: CUDA tensors -> Triton row kernels; CPU tensors -> the torch
references below (`row_stats_ref`, `dlogits_ref`), or the Triton kernels under TRITON_INTERPRET=1. The matmuls
are torch in every case.

Shapes: N tokens, H hidden size, V vocabulary size, C tokens in a chunk.
"""

import functools
import os
from collections.abc import Callable, Sequence

import torch

DEFAULT_BUFFER_BYTES = 512 << 20
# DPO needs a whole chosen/rejected pair in one chunk: its buffers grow past the default up to this for one pair
# (2 GiB: 2,304 tokens, e.g. two 1,152-token responses, at V = 152,064 in bf16); a longer pair takes the
# recompute path.
MAX_PAIR_BUFFER_BYTES = 2 << 30
# CUDA: stats read one row per program in 4,096-wide tiles; dlogits is a 2-D elementwise grid. Not tuned yet (no
# GPU in the session that wrote this): `bash bench/gpu_check.sh` times them inside bench_grpo / bench_dpo.
CUDA_STATS_CONFIG = dict(BLOCK_V=4096, num_warps=8)
CUDA_DLOGITS_CONFIG = dict(BLOCK_V=2048, num_warps=8)
INTERP_STATS_CONFIG = dict(BLOCK_V=64, num_warps=1)  # small tiles so the tests cross several of them
INTERP_DLOGITS_CONFIG = dict(BLOCK_V=64, num_warps=1)

Index = slice | torch.Tensor  # a chunk's rows: a slice, or an int64 index tensor on hidden's device


def chunk_tokens(vocab_size: int, itemsize: int, buffer_bytes: int | None = None) -> int:
    """Tokens per chunk so that the fp32 logits + the dlogits buffer ([C, V] each) fit in `buffer_bytes`
    (default: DEFAULT_BUFFER_BYTES, read at call time)."""
    c = (DEFAULT_BUFFER_BYTES if buffer_bytes is None else buffer_bytes) // (vocab_size * (4 + itemsize))
    return max(1, c // 64 * 64 if c >= 64 else c)


def token_chunks(n: int, c: int) -> list[slice]:
    return [slice(s, min(n, s + c)) for s in range(0, n, c)]


def _size(idx: Index, n: int) -> int:
    return len(range(*idx.indices(n))) if isinstance(idx, slice) else idx.numel()


# ---------------------------------------------------------------------------------------------------------------
# References of the two row kernels: plain torch on a [C, V] logits chunk.


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
    ignored rows; ge, c None: no entropy term."""
    s_CV = z_CV * inv_temp
    p_CV = torch.exp(s_CV - lse_C[:, None])
    d_CV = -p_CV * g_C[:, None]
    d_CV.scatter_add_(1, targets_C[:, None], g_C[:, None])
    if ge_C is not None:
        d_CV -= ge_C[:, None] * p_CV * (s_CV - c_C[:, None])
    out.copy_(d_CV * inv_temp)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (built lazily, so this module imports without triton on CPU-only installs that never call them).


def _kernel_sources():
    import triton.language as tl

    def _row_stats_kernel(Z_ptr, T_ptr, LSE_ptr, ZT_ptr, ENT_ptr, V, stride_z, inv_temp, BLOCK_V: tl.constexpr,
                          HAS_ENT: tl.constexpr):
        # Each lane keeps its own running max / sum exp / sum exp * z over the tiles it sees; the lanes are merged
        # at the end, which avoids a cross-lane reduction per tile. Columns past V read as a finite -1e30 rather
        # than -inf, so no lane ever computes -inf - (-inf) = NaN (masked out of the sums all the same).
        row = tl.program_id(0)
        base = Z_ptr + row.to(tl.int64) * stride_z
        m = tl.full([BLOCK_V], -1e30, tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        a = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.where(mask, tl.load(base + offs, mask=mask, other=0.0) * inv_temp, -1e30)
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
        tl.store(LSE_ptr + row, lse)
        tgt = tl.load(T_ptr + row)
        tl.store(ZT_ptr + row, tl.load(base + tgt) * inv_temp)
        if HAS_ENT:
            tl.store(ENT_ptr + row, lse - tl.sum(a * scale, 0) / s_row)

    def _dlogits_kernel(Z_ptr, T_ptr, LSE_ptr, G_ptr, GE_ptr, C_ptr, D_ptr, V, stride_z, stride_d, inv_temp,
                        BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr):
        row, pid_v = tl.program_id(0), tl.program_id(1)
        offs = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(Z_ptr + row.to(tl.int64) * stride_z + offs, mask=mask, other=0.0) * inv_temp
        lse = tl.load(LSE_ptr + row)
        g = tl.load(G_ptr + row)
        tgt = tl.load(T_ptr + row)
        p = tl.exp(z - lse)
        d = tl.where(offs == tgt, g, 0.0) - g * p
        if HAS_ENT:  # d entropy / d s = -p * (s - sum_v p s)
            d -= tl.load(GE_ptr + row) * p * (z - tl.load(C_ptr + row))
        d = d * inv_temp
        tl.store(D_ptr + row.to(tl.int64) * stride_d + offs, d.to(D_ptr.dtype.element_ty), mask=mask)

    return _row_stats_kernel, _dlogits_kernel


@functools.cache
def _kernels(interpret: bool):
    stats, dlogits = _kernel_sources()
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(stats), InterpretedFunction(dlogits)
    import triton
    return triton.jit(stats), triton.jit(dlogits)


def _row_stats(z_CV, targets_C, inv_temp, return_entropy, interpret: bool):
    stats_kernel, _ = _kernels(interpret)
    c, v = z_CV.shape
    lse = torch.empty(c, dtype=torch.float32, device=z_CV.device)
    zt = torch.empty_like(lse)
    ent = torch.empty_like(lse) if return_entropy else lse  # a dummy pointer when HAS_ENT is False
    cfg = INTERP_STATS_CONFIG if interpret else CUDA_STATS_CONFIG
    stats_kernel[(c,)](z_CV, targets_C, lse, zt, ent, v, z_CV.stride(0), inv_temp, HAS_ENT=return_entropy, **cfg)
    return lse, zt, (ent if return_entropy else None)


def _dlogits(z_CV, targets_C, lse_C, g_C, inv_temp, out, interpret: bool, ge_C=None, c_C=None):
    import triton

    _, dlogits_kernel = _kernels(interpret)
    c, v = z_CV.shape
    cfg = INTERP_DLOGITS_CONFIG if interpret else CUDA_DLOGITS_CONFIG
    grid = (c, triton.cdiv(v, cfg["BLOCK_V"]))
    has_ent = ge_C is not None
    dlogits_kernel[grid](z_CV, targets_C, lse_C, g_C, ge_C if has_ent else g_C, c_C if has_ent else g_C, out, v,
                         z_CV.stride(0), out.stride(0), inv_temp, HAS_ENT=has_ent, **cfg)


# ---------------------------------------------------------------------------------------------------------------
# The driver.


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b with out's (wider) dtype: cuBLAS writes fp32 straight from bf16 operands (torch >= 2.8, CUDA);
    older CUDA builds round through a low-precision temporary; CPU (tests) multiplies upcast copies, which gives
    the fp32 products cuBLAS gives."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    elif not a.is_cuda:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)
    else:
        try:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
        except (TypeError, RuntimeError, NotImplementedError):
            out.copy_(a @ b)


def onepass(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, groups: Sequence[Index],
            grad_fn: Callable[[Index, torch.Tensor], torch.Tensor], *, temperature: float = 1.0,
            ignore_index: int = -100, return_entropy: bool = False, need_hidden_grad: bool = True,
            need_weight_grad: bool = True, backend: str = "ref"):
    """Log-probs and the gradients of sum_n g_n * logp_n, chunk by chunk, where g comes from the loss itself.

    Args:
        hidden [N, H], weight [V, H], targets [N]: validated and contiguous (the callers' `_check`).
        groups: chunks of rows (slices or int64 index tensors) that together cover every token once; the buffers
            are sized by the largest. A chunk must hold every token grad_fn needs to know the chunk's gradient.
        grad_fn(idx, logp): dLoss/dlogp [C] (fp32) for rows idx, given logp [N] fp32 whose rows idx (and the
            rows of all earlier chunks) are filled in; or a pair (dLoss/dlogp, dLoss/dentropy), which needs
            return_entropy. Not called when no gradient is needed.
        backend: "ref" (torch row kernels) or "triton" (CUDA, or the interpreter under TRITON_INTERPRET=1).
    Returns:
        (logp [N], lse [N], entropy [N] or None, grad_hidden [N, H] in hidden.dtype or None, grad_weight [V, H]
        in weight.dtype or None); ignored targets give logp 0, entropy 0 and no gradient.
    """
    n = hidden.shape[0]
    v = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "triton" and not (hidden.is_cuda or interpret):
        raise RuntimeError("the Triton one-pass path needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    # The reference does its gradient matmuls in fp32 (exact); the Triton path mirrors cuBLAS's use on a GPU.
    mm_dtype = hidden.dtype if backend == "triton" else acc
    need_grad = need_hidden_grad or need_weight_grad
    cmax = max((_size(idx, n) for idx in groups), default=0)
    z_buf = torch.empty(cmax, v, dtype=acc, device=hidden.device)
    d_buf = torch.empty(cmax, v, dtype=mm_dtype, device=hidden.device) if need_grad else None
    w_mm = weight.to(mm_dtype)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    logp = torch.zeros(n, dtype=acc, device=hidden.device)
    lse = torch.zeros(n, dtype=acc, device=hidden.device)
    entropy = torch.zeros(n, dtype=acc, device=hidden.device) if return_entropy else None
    dx = torch.zeros_like(hidden) if need_hidden_grad else None
    dw = torch.zeros(weight.shape, dtype=weight.dtype if backend == "triton" else acc,
                     device=hidden.device) if need_weight_grad else None
    inv_temp = 1.0 / temperature
    for idx in groups:
        c = _size(idx, n)
        if c == 0:
            continue
        x_CH, t_C, ok_C = hidden[idx], safe[idx], valid[idx]
        z_CV = z_buf[:c]
        x_mm = x_CH.to(mm_dtype)  # a no-op on the Triton path (mm_dtype is the input dtype there)
        _mm_into(z_CV, x_mm, w_mm.T)
        if backend == "triton":
            lse_C, zt_C, ent_C = _row_stats(z_CV, t_C, inv_temp, return_entropy, interpret)
        else:
            lse_C, zt_C, ent_C = row_stats_ref(z_CV, t_C, inv_temp, return_entropy)
        logp[idx] = torch.where(ok_C, zt_C - lse_C, 0.0)
        lse[idx] = lse_C
        if return_entropy:
            entropy[idx] = torch.where(ok_C, ent_C, 0.0)
        if not need_grad:
            continue
        g_C, ge_C, c_C = grad_fn(idx, logp), None, None
        if isinstance(g_C, tuple):  # (dLoss/dlogp, dLoss/dentropy)
            if ent_C is None:
                raise ValueError("grad_fn returned an entropy gradient, which needs return_entropy=True")
            g_C, ge_C = g_C
            ge_C = torch.where(ok_C, ge_C.to(acc), 0.0).contiguous()
            c_C = (lse_C - ent_C).contiguous()  # sum_v p s
        g_C = torch.where(ok_C, g_C.to(acc), 0.0).contiguous()
        d_CV = d_buf[:c]
        if backend == "triton":
            _dlogits(z_CV, t_C, lse_C, g_C, inv_temp, d_CV, interpret, ge_C, c_C)
        else:
            dlogits_ref(z_CV, t_C, lse_C, g_C, inv_temp, d_CV, ge_C, c_C)
        if need_hidden_grad:
            dx[idx] = (d_CV @ w_mm).to(hidden.dtype)
        if need_weight_grad:
            dw.addmm_(d_CV.T, x_mm)
    if dw is not None:
        dw = dw.to(weight.dtype)
    return logp, lse, entropy, dx, dw


def sm90_specs():
    """Every (fn, signature, constexprs, num_warps, num_stages, label) the CUDA path of `onepass` can compile, for
    the sm_90a static checks (kernels/_sm90.py, tests/test_sm90_compile.py): the logits buffer is fp32 for bf16
    and fp32 inputs, the dlogits output is in the input dtype (bf16 or fp32), with and without entropy, int64
    targets, the CUDA configs (num_stages: Triton's default, 3, as the launchers do not pass one).

    ":16" marks the pointers (torch allocations and chunk slices, 16-byte aligned), which Triton specialises at
    launch; V and the row strides (= V) are left plain since any vocabulary size can occur.
    """
    stats, dlogits = _kernel_sources()
    specs = []
    for has_ent in (False, True):
        tag = "ent" if has_ent else "noent"
        cfg = CUDA_STATS_CONFIG
        sig = {"Z_ptr": "*fp32:16", "T_ptr": "*i64:16", "LSE_ptr": "*fp32:16", "ZT_ptr": "*fp32:16",
               "ENT_ptr": "*fp32:16", "V": "i32", "stride_z": "i32", "inv_temp": "fp32", "BLOCK_V": "constexpr",
               "HAS_ENT": "constexpr"}
        specs.append((stats, sig, {"BLOCK_V": cfg["BLOCK_V"], "HAS_ENT": has_ent}, cfg["num_warps"],
                      cfg.get("num_stages", 3), f"onepass_stats-fp32-{tag}"))
        for out in ("bf16", "fp32"):
            cfg = CUDA_DLOGITS_CONFIG
            sig = {"Z_ptr": "*fp32:16", "T_ptr": "*i64:16", **{p: "*fp32:16" for p in ("LSE_ptr", "G_ptr", "GE_ptr",
                   "C_ptr")}, "D_ptr": f"*{out}:16", "V": "i32", "stride_z": "i32", "stride_d": "i32",
                   "inv_temp": "fp32", "BLOCK_V": "constexpr", "HAS_ENT": "constexpr"}
            specs.append((dlogits, sig, {"BLOCK_V": cfg["BLOCK_V"], "HAS_ENT": has_ent}, cfg["num_warps"],
                          cfg.get("num_stages", 3), f"onepass_dlogits-{out}-{tag}"))
    return specs

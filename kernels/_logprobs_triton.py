"""Triton kernels and launchers for `kernels/fused_logprobs.py` (log-probs from hidden states, no [N, V] logits).

Design (shapes: N tokens, H hidden, V vocab, S vocab splits):
- Grid (cdiv(N, BLOCK_N), S): program (i, s) owns BLOCK_N tokens and a contiguous range of V tiles. Splitting V
  keeps ~2 programs per SM even at N=4096 (32 token blocks alone would leave 100 of 132 H100 SMs idle).
- Forward: each V tile's logits come from tl.dot over H chunks (fp32 accumulate); online max / sum-exp /
  sum exp(z-m)*z per row; the target logit is picked when its tile passes. Each split writes partial statistics
  [S, N]; `_combine` merges them in torch (O(S x N)).
- Backward, per chunk of C tokens: `_logprobs_dlogits_kernel` (same grid and tiles) recomputes each tile's
  logits and writes dlogits [C, V] (bf16 on GPU); then cuBLAS does grad_hidden = dlogits @ W and
  grad_weight += dlogits^T @ hidden (fp32 accumulator). Why not reduce in-kernel: every tile contributes to
  full-H rows of both gradients (H=3584 fp32 = 14 KiB a row, too big for registers), so an in-kernel version must
  read-modify-write global memory per tile. The first version did that with fp32 tl.atomic_add into [N, H] and
  [V, H] buffers: 316 ms at N=4096 on an H200 (42 TFLOP/s), atomic-bound. A chunked dlogits buffer costs
  O(C x V) memory (C chosen so it stays <= DLOGITS_BUFFER_BYTES) but runs the two big matmuls at cuBLAS speed
  and keeps the sum order fixed (deterministic). FLOPs: fwd 2NVH; bwd 2NVH (recompute) + 2NVH + 2NVH = 6NVH.
- Kernels are built lazily per mode: under TRITON_INTERPRET=1 (read at call time) they are wrapped in the
  interpreter, otherwise jitted, so the module may be imported before or after the variable is set.

Refs: Liger-Kernel fused linear cross-entropy; Wijmans et al., "Cut Your Losses in Large-Vocabulary Language
Models" (arXiv:2411.09009) for the tile-wise logits recompute.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from kernels._common import grad_matmuls, log_once

# Fixed configs (one config: >1 autotune config fails in the interpreter; tuned by hand on the GPU instead).
# CUDA: sized for H100 (228 KiB smem, wgmma needs BLOCK_N >= 64); interpreter: large tiles = fewer Python ops.
# H200 sweep at N=4096, H=3584, V=152064 bf16 (forward): 128x256x64 w8 s3 9.7 ms; 128x128x64 w8 s3 12.2 ms;
# 64x256x64 w4 s3 13.8 ms; 128x128x64 w4 s4 14.8 ms. Backward (dlogits kernel + cuBLAS): 128x256x64 w8 s3
# 24.4 ms; 128x128x64 w8 s3 27.1 ms; 128x256x64 w8 s4 24.6 ms.
CUDA_FWD_CONFIG = dict(BLOCK_N=128, BLOCK_V=256, BLOCK_H=64, num_warps=8, num_stages=3)
CUDA_BWD_CONFIG = dict(BLOCK_N=128, BLOCK_V=256, BLOCK_H=64, num_warps=8, num_stages=3)
INTERP_CONFIG = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=32, num_warps=4, num_stages=1)
DLOGITS_BUFFER_BYTES = 1 << 30  # backward: tokens per chunk such that the [C, V] dlogits buffer stays <= 1 GiB
INTERP_DLOGITS_BUFFER_BYTES = 1 << 16  # tiny, so the interpreter tests cross several chunks
INTERP_TILES_PER_SPLIT = 2  # forces several V splits on small test vocabularies, so `_combine` gets tested


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _logprobs_fwd_kernel(X_ptr, W_ptr, T_ptr, M_ptr, S_ptr, A_ptr, Z_ptr, N, V, H, stride_x, stride_w, inv_temp,
                         tiles_per_split, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                         HAS_ENT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows_x = offs_n.to(tl.int64) * stride_x  # int64: V * H exceeds 2^31 for large vocabularies
    tgt = tl.load(T_ptr + offs_n, mask=mask_n, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    a = tl.zeros([BLOCK_N], tl.float32)
    zt = tl.zeros([BLOCK_N], tl.float32)
    v_start = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_start + tiles_per_split * BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        rows_w = offs_v.to(tl.int64) * stride_w
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            x = tl.load(X_ptr + rows_x[:, None] + offs_h[None, :], mask=mask_n[:, None] & mask_h[None, :], other=0.0)
            w = tl.load(W_ptr + rows_w[:, None] + offs_h[None, :], mask=mask_v[:, None] & mask_h[None, :], other=0.0)
            if UPCAST:  # the interpreter's bf16 tl.dot is wrong; on GPU bf16/fp16 feed the tensor cores directly
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        z = acc * inv_temp
        # Online log-sum-exp: rescale the running sums by exp(m_old - m_new) whenever the row max grows.
        z_inf = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_inf, 1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z_inf - m_new[:, None])
        s = s * alpha + tl.sum(e, 1)
        if HAS_ENT:  # sum_v exp(z - m) * z, for entropy = lse - sum_v p * z
            a = a * alpha + tl.sum(e * tl.where(mask_v[None, :], z, 0.0), 1)
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), 1)
        m = m_new
    out = pid_s * N + offs_n
    tl.store(M_ptr + out, m, mask=mask_n)
    tl.store(S_ptr + out, s, mask=mask_n)
    tl.store(Z_ptr + out, zt, mask=mask_n)
    if HAS_ENT:
        tl.store(A_ptr + out, a, mask=mask_n)


def _logprobs_dlogits_kernel(X_ptr, W_ptr, T_ptr, LSE_ptr, G_ptr, GE_ptr, C_ptr, D_ptr, N, V, H, stride_x,
                             stride_w, stride_d, inv_temp, tiles_per_split, BLOCK_N: tl.constexpr,
                             BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, HAS_ENT: tl.constexpr,
                             UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dlogits [N, V] of one token chunk: recompute each tile's logits as the forward did, then the softmax grad."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows_x = offs_n.to(tl.int64) * stride_x
    rows_d = offs_n.to(tl.int64) * stride_d
    tgt = tl.load(T_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(LSE_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(G_ptr + offs_n, mask=mask_n, other=0.0)  # the launcher zeroed ignored rows
    if HAS_ENT:
        ge = tl.load(GE_ptr + offs_n, mask=mask_n, other=0.0)
        c = tl.load(C_ptr + offs_n, mask=mask_n, other=0.0)  # lse - entropy = sum_v p * z
    v_start = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_start + tiles_per_split * BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        rows_w = offs_v.to(tl.int64) * stride_w
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            x = tl.load(X_ptr + rows_x[:, None] + offs_h[None, :], mask=mask_n[:, None] & mask_h[None, :], other=0.0)
            w = tl.load(W_ptr + rows_w[:, None] + offs_h[None, :], mask=mask_v[:, None] & mask_h[None, :], other=0.0)
            if UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        z = acc * inv_temp
        p = tl.exp(z - lse[:, None])
        # d logp / dz = onehot - p;  d entropy / dz = -p * (z - sum_v p z);  chain rule through z = logits / T.
        d = tl.where(offs_v[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * p
        if HAS_ENT:
            d -= ge[:, None] * p * (z - c[:, None])
        d = tl.where(mask_n[:, None] & mask_v[None, :], d * inv_temp, 0.0)
        tl.store(D_ptr + rows_d[:, None] + offs_v[None, :], d.to(D_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_v[None, :])


@functools.cache
def _kernels(interpret: bool):
    """(fwd, bwd) kernels for this mode, built on first use (see the module docstring)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(_logprobs_fwd_kernel), InterpretedFunction(_logprobs_dlogits_kernel)
    return triton.jit(_logprobs_fwd_kernel), triton.jit(_logprobs_dlogits_kernel)


def _setup(hidden: torch.Tensor, weight: torch.Tensor, backward: bool):
    """Kernels, config, grid and per-mode constexprs for this problem."""
    interpret = interpreting()
    if not interpret and not hidden.is_cuda:
        raise RuntimeError("Triton log-probs need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    cfg = dict(INTERP_CONFIG if interpret else (CUDA_BWD_CONFIG if backward else CUDA_FWD_CONFIG))
    n, v = hidden.shape[0], weight.shape[0]
    num_n_blocks, num_tiles = triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"])
    if interpret:
        tiles_per_split = INTERP_TILES_PER_SPLIT
    else:  # about two programs per SM, then as few splits as give that
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
        want_splits = max(1, min(num_tiles, triton.cdiv(2 * sms, num_n_blocks)))
        tiles_per_split = triton.cdiv(num_tiles, want_splits)
    num_splits = triton.cdiv(num_tiles, tiles_per_split)  # every split gets >= 1 tile, so its max is finite
    # fp32 inputs: exact fp32 products like torch's default matmul (tf32 would cost ~1e-3 relative error).
    cfg.update(UPCAST=interpret, PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32")
    return _kernels(interpret), cfg, (num_n_blocks, num_splits), tiles_per_split


def _logprobs_fwd(hidden, weight, targets, temperature: float, ignore_index: int, return_entropy: bool):
    """Launcher; inputs already validated and contiguous. Returns (logp, lse, entropy or None), [N] fp32 each."""
    (fwd, _), cfg, grid, tiles_per_split = _setup(hidden, weight, backward=False)
    n, h = hidden.shape
    v = weight.shape[0]
    parts = torch.empty(4, grid[1], n, dtype=torch.float32, device=hidden.device)  # m, s, a, target logit
    fwd[grid](hidden, weight, targets, parts[0], parts[1], parts[2], parts[3], n, v, h, hidden.stride(0),
              weight.stride(0), 1.0 / temperature, tiles_per_split, HAS_ENT=return_entropy, **cfg)
    return _combine(parts, targets != ignore_index, return_entropy)


def _combine(parts: torch.Tensor, valid: torch.Tensor, return_entropy: bool):
    """Merge per-split (max, sum exp, sum exp * z, target logit) [S, N] into lse, logp, entropy."""
    m_SN, s_SN, a_SN, z_SN = parts
    m_N = m_SN.max(0).values
    scale_SN = torch.exp(m_SN - m_N)
    s_N = (s_SN * scale_SN).sum(0)
    lse_N = m_N + torch.log(s_N)
    logp_N = torch.where(valid, z_SN.sum(0) - lse_N, 0.0)  # only the split holding the target wrote non-zero
    ent_N = None
    if return_entropy:
        ent_N = torch.where(valid, lse_N - (a_SN * scale_SN).sum(0) / s_N, 0.0)
    return logp_N, lse_N, ent_N


def _logprobs_bwd(hidden, weight, targets, lse, grad_logp, grad_entropy, entropy, temperature: float,
                  ignore_index: int, need_weight_grad: bool, threshold=None):
    """Launcher; inputs validated, grads [N] fp32. Returns (grad_hidden in hidden.dtype, grad_weight fp32 or None)."""
    (_, dlogits_kernel), cfg, _, _ = _setup(hidden, weight, backward=True)
    n, h = hidden.shape
    v = weight.shape[0]
    valid = targets != ignore_index
    g = torch.where(valid, grad_logp, 0.0)
    has_ent = grad_entropy is not None
    ge = torch.where(valid, grad_entropy, 0.0) if has_ent else g  # dummies are never read when HAS_ENT is False
    c = torch.where(valid, lse - entropy, 0.0) if has_ent else g
    # dlogits feed cuBLAS in the input dtype on GPU (bf16 tensor cores, fp32 accumulate); fp32 in the interpreter.
    d_dtype = torch.float32 if cfg["UPCAST"] else hidden.dtype
    w_mm = weight.float() if cfg["UPCAST"] else weight
    budget = INTERP_DLOGITS_BUFFER_BYTES if cfg["UPCAST"] else DLOGITS_BUFFER_BYTES
    chunk = max(cfg["BLOCK_N"], budget // (v * d_dtype.itemsize) // cfg["BLOCK_N"] * cfg["BLOCK_N"])
    d_buf = torch.empty(min(n, chunk), v, dtype=d_dtype, device=hidden.device)
    dx = torch.empty_like(hidden)
    dw = torch.zeros(v, h, dtype=torch.float32, device=hidden.device) if need_weight_grad else None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        d_CV, x_CH = d_buf[: e - s], hidden[s:e]
        _, _, grid, tiles_per_split = _setup(x_CH, weight, backward=True)
        dlogits_kernel[grid](x_CH, weight, targets[s:e], lse[s:e], g[s:e], ge[s:e], c[s:e], d_CV, e - s, v, h,
                             hidden.stride(0), weight.stride(0), d_CV.stride(0), 1.0 / temperature, tiles_per_split,
                             HAS_ENT=has_ent, **cfg)
        dx[s:e] = grad_matmuls(d_CV, w_mm, x_CH.to(d_dtype), dw, threshold, _addmm_fp32)
    return dx, dw


def _addmm_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) += a @ b. bf16/fp16 operands: cuBLAS with an fp32 output (torch >= 2.8) avoids a [V, H]
    low-precision temporary and its rounding; older torch falls back to a temporary."""
    if a.dtype == torch.float32:
        out.addmm_(a, b)
        return
    try:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    except (TypeError, RuntimeError, NotImplementedError) as e:
        log_once("addmm-out-dtype", "kernels: torch.addmm(out_dtype=float32) is not available (%s): the weight "
                 "gradient goes through a %s [V, H] temporary per chunk, which rounds it (torch >= 2.8 avoids this)",
                 e, a.dtype)
        out += (a @ b).float()


def sm90_specs():
    """Every (fn, signature, constexprs, num_warps, num_stages, label) the CUDA launchers above can compile, for
    the sm_90a static checks (kernels/_sm90.py, tests/test_sm90_compile.py): bf16 and fp32 inputs, with and
    without entropy, int64 targets, the CUDA configs, UPCAST off and PRECISION as `_setup` picks it.

    ":16" marks what Triton specialises at every launch: torch allocations (and the launchers' chunk slices,
    which start at multiples of BLOCK_N rows) are 16-byte aligned, and H (so the row strides of hidden and
    weight) is a multiple of 16 in every model we train. N, V, the dlogits stride (= V) and tiles_per_split are
    left plain: any value can occur.
    """
    specs = []
    for dtype in ("bf16", "fp32"):
        ptrs = {"X_ptr": f"*{dtype}:16", "W_ptr": f"*{dtype}:16", "T_ptr": "*i64:16"}
        fwd_sig = {**ptrs, **{p: "*fp32:16" for p in ("M_ptr", "S_ptr", "A_ptr", "Z_ptr")}}
        bwd_sig = {**ptrs, **{p: "*fp32:16" for p in ("LSE_ptr", "G_ptr", "GE_ptr", "C_ptr")},
                   "D_ptr": f"*{dtype}:16"}  # dlogits in the input dtype on GPU (d_dtype)
        fwd_sig.update(N="i32", V="i32", H="i32:16", stride_x="i32:16", stride_w="i32:16")
        bwd_sig.update(N="i32", V="i32", H="i32:16", stride_x="i32:16", stride_w="i32:16", stride_d="i32")
        for kind, fn, sig, cfg in (("fwd", _logprobs_fwd_kernel, fwd_sig, CUDA_FWD_CONFIG),
                                   ("dlogits", _logprobs_dlogits_kernel, bwd_sig, CUDA_BWD_CONFIG)):
            sig = {**sig, "inv_temp": "fp32", "tiles_per_split": "i32"}
            blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
            sig.update({k: "constexpr" for k in (*blocks, "HAS_ENT", "UPCAST", "PRECISION")})
            for has_ent in (False, True):
                constexprs = {**blocks, "HAS_ENT": has_ent, "UPCAST": False,
                              "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
                specs.append((fn, sig, constexprs, cfg["num_warps"], cfg["num_stages"],
                              f"logprobs_{kind}-{dtype}-{'ent' if has_ent else 'noent'}"))
    return specs

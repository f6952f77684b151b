"""Variable-length attention for packed rows, registered with transformers as "engine_varlen".

transformers' sdpa path turns a packed row into a dense [T, T] block-diagonal mask, so packing makes it no
faster (ENVIRONMENT.md: 10.8 ms against 1.1 ms for true varlen attention on an H100). This function attends
within each sample only, from the boundaries the batch carries (`cu_seq_lens_q`) or, failing that, from the
restarts of the text position ids:
- CUDA with flash-attn installed: `flash_attn_varlen_func` (GQA native);
- CUDA with `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10): one fused call (KV heads repeated where the
  torch release has no `enable_gqa`);
- CUDA with neither: FlexAttention with a causal document block mask (the mask is built once per row and reused
  by every layer of the forward);
- otherwise (CPU): `attention_ref`, plain sdpa per sample, the reference the fast paths are tested against.
The choice is made once per process (`backend()`) and logged.
Vision-tower calls (non-causal; transformers already splits them per window/image), padded batches and rows
with no boundary information go to transformers' own sdpa (its mask, if any, is None under our name: right
padding is harmless for causal attention).

Shapes: query [B, Hq, T, D], key/value [B, Hkv, T, D]; returns [B, T, Hq, D] as transformers expects.
"""

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engine.log import log0

NAME = "engine_varlen"

try:
    from torch.nn.attention.varlen import varlen_attn
    _VARLEN_GQA = "enable_gqa" in inspect.signature(varlen_attn).parameters
except ImportError:  # torch < 2.10
    varlen_attn, _VARLEN_GQA = None, False

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # the optional extra: pip install .[flash]
    flash_attn_varlen_func = None


def backend(device_type: str = "cuda") -> str:
    """Which variable-length kernel packed rows use on `device_type`: flash_attn, varlen_attn, flex or sdpa."""
    if device_type != "cuda":
        return "sdpa"
    if flash_attn_varlen_func is not None:
        return "flash_attn"
    return "varlen_attn" if varlen_attn is not None else "flex"


def boundaries_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens int32 [B+1] of one packed row from its text positions [T] (a sample starts where they restart)."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        raise ValueError("packed position ids must start at 0 in every sample")
    end = torch.tensor([pos.numel()], device=pos.device)
    return torch.cat([starts, end]).to(torch.int32)


def attention_ref(query, key, value, cu_seqlens, scaling) -> torch.Tensor:
    """Causal attention inside each sample of one packed row, one sdpa call per sample. -> [1, T, Hq, D]."""
    outs = []
    bounds = cu_seqlens.tolist()  # sync: a handful of ints
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        outs.append(F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                                   scale=scaling, enable_gqa=query.shape[1] != key.shape[1]))
    return torch.cat(outs, dim=2).transpose(1, 2)


def _attention_cuda(query, key, value, cu_seqlens, max_len, scaling) -> torch.Tensor:
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    kw = {}
    if k.shape[1] != q.shape[1]:
        if _VARLEN_GQA:
            kw["enable_gqa"] = True
        else:  # torch 2.11: no GQA in varlen_attn; repeat the KV heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scaling, window_size=(-1, 0), **kw)
    return out[None]  # [1, T, Hq, D]


def _attention_flash(query, key, value, cu_seqlens, max_len, scaling) -> torch.Tensor:
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, softmax_scale=scaling, causal=True)
    return out[None]  # [1, T, Hq, D]


_flex_cache: dict = {}


def attention_flex(query, key, value, cu_seqlens, scaling) -> torch.Tensor:
    """FlexAttention with a causal document mask from `cu_seqlens`. -> [1, T, Hq, D]. (On CPU, torch runs it
    forward only; the tests use it there without gradients.)"""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = query.shape[2]
    key_ = (query.device, T, tuple(cu_seqlens.tolist()))  # sync: a handful of ints
    if _flex_cache.get("key") != key_:  # one mask per packed row, shared by all layers of the forward
        doc = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=query.device),
                                      torch.diff(cu_seqlens.long()), output_size=T)

        def causal_document(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        _flex_cache.update(key=key_, mask=create_block_mask(causal_document, None, None, T, T, device=query.device))
    if query.is_cuda and "compiled" not in _flex_cache:
        # Eager flex_attention materialises the full score matrix; compiled, it is one fused Triton kernel.
        _flex_cache["compiled"] = torch.compile(flex_attention, dynamic=True)
    fn = _flex_cache["compiled"] if query.is_cuda else flex_attention
    gqa = query.shape[1] != key.shape[1]
    out = fn(query, key, value, block_mask=_flex_cache["mask"], scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls for every attention layer when attn_implementation = "engine_varlen"."""
    if not getattr(module, "is_causal", True) or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        # Vision windows, padded batches, decoding with a cache: transformers' sdpa (mask built by transformers
        # is None under our name, so only the non-causal and single-sequence cases may take this branch).
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None and kwargs.get("position_ids") is None:
        # No boundaries at all: an unpacked single sequence (a padded batch of one, whose 3-D M-RoPE ids
        # transformers does not forward). Packed rows always carry cu_seq_lens_q (engine/packed_rows.py).
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if cu is None:
        cu = boundaries_from_positions(kwargs["position_ids"][0])
    cu = cu.to(device=query.device, dtype=torch.int32)
    kind = backend(query.device.type)
    if kind in ("flash_attn", "varlen_attn"):
        max_len = kwargs.get("max_length_q") or int(torch.diff(cu).max())
        fn = _attention_flash if kind == "flash_attn" else _attention_cuda
        return fn(query, key, value, cu, max_len, scaling), None
    if kind == "flex":
        return attention_flex(query, key, value, cu, scaling), None
    return attention_ref(query, key, value, cu, scaling), None


def register() -> str:
    """Register the function with transformers (idempotent); returns the name to load models with."""
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, varlen_attention)
        path = backend("cuda") + " (CUDA)" if torch.cuda.is_available() else "sdpa per sample (CPU)"
        log0(f"attention: registered {NAME} -> {path}")
    return NAME

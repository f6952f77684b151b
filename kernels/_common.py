"""Helpers shared by the kernel files: argument checks, segment (per-sequence) ops, saved-gradient scaling, and the
one-time log. A leaf module: it imports nothing from kernels/.

Shapes: N tokens, B sequences (by cu_seqlens [B+1]).
"""

import logging

import torch

logger = logging.getLogger("kernels")
_LOGGED: set[str] = set()


def log_once(key: str, msg: str, *args, level: int = logging.WARNING) -> None:
    """Log `msg % args` the first time `key` is seen in this process."""
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.log(level, msg, *args)


def check_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int, name: str = "targets") -> None:
    """Every target is in [0, V) or equal to ignore_index; one host sync (targets are read back once)."""
    bad = ((targets >= vocab_size) | (targets < 0)) & (targets != ignore_index)
    if bool(bad.any()):  # host sync
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be token ids in [0, V={vocab_size}) or ignore_index={ignore_index}; "
                         f"{int(bad.sum())} are not (first: {name}[{i}] = {int(targets[i])})")


def check_vector(name: str, t: torch.Tensor | None, n: int, device: torch.device, *, allow_bool: bool = False):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [N={n}], got {type(t).__name__}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape [N={n}], got {tuple(t.shape)}")
    if not (t.is_floating_point() or (allow_bool and t.dtype == torch.bool)):
        allowed = "bool or floating point" if allow_bool else "floating point"
        raise ValueError(f"{name} must be {allowed}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of hidden), got {t.device}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, n: int, device: torch.device) -> None:
    """cu_seqlens: int32/int64 [B+1], 0 first, N last, non-decreasing. Reads values back: one host sync."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        got = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D tensor [B+1] with B >= 1, got {got}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32/int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on {device} (the device of hidden), got {cu_seqlens.device}")
    cu = cu_seqlens.tolist()  # host sync: boundaries are small and must be checked before any indexing
    if cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"cu_seqlens must start at 0, end at N={n} and be non-decreasing, got {cu}")


def check_common(hidden, weight, targets, temperature, ignore_index: int = -100) -> None:
    """hidden [N, H] and weight [V, H] of one float dtype and device, targets [N] int ids in [0, V) or
    ignore_index (one host sync), temperature > 0."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating-point tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[1]}], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight must match hidden's dtype and device ({hidden.dtype}, {hidden.device}), got "
                         f"{weight.dtype}, {weight.device}")
    if not isinstance(targets, torch.Tensor) or targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape [N={hidden.shape[0]}], got "
                         f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if targets.dtype not in (torch.int32, torch.int64) or targets.device != hidden.device:
        raise ValueError(f"targets must be int32/int64 on {hidden.device}, got {targets.dtype} on {targets.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_targets(targets, weight.shape[0], ignore_index)


def acc_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Dtype of the [N] loss vectors: fp32 (logprobs_fwd's output), fp64 for fp64 inputs (reference, gradcheck)."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """[N] int64 index of the sequence holding each token; no host sync (empty sequences allowed)."""
    pos = torch.arange(n, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)


def sequence_sums(x_N: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[B] per-sequence sums of x (differentiable)."""
    b = cu_seqlens.numel() - 1
    return x_N.new_zeros(b).index_add(0, segment_ids(cu_seqlens, x_N.shape[0]), x_N)


def sequence_logps(logp: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[B] fp32 sequence log-probs: sum of masked token log-probs per sequence (differentiable)."""
    return sequence_sums(logp * mask.to(logp.dtype), cu_seqlens)


def scale_saved_grads(ctx, grad_output):
    """Scale the saved grads in place (no second [V, H] copy), so the graph supports one backward only."""
    if ctx.grads is None:
        raise RuntimeError("this loss supports a single backward (the saved gradients are scaled in place); "
                           "do not use retain_graph=True for a second backward through it")
    gh, gw = ctx.grads
    ctx.grads = None
    g = grad_output.detach()
    if gh is not None:
        gh = gh.mul_(g.to(gh.dtype))
    if gw is not None:
        gw = gw.mul_(g.to(gw.dtype))
    return gh, gw


FILTER_TILE = 256
"""Vocabulary columns that `filter_eps` keeps or skips together (a multiple of every kernel's BLOCK_V)."""


def filter_threshold(filter_eps: float, temperature: float, *grads: torch.Tensor | None) -> torch.Tensor | None:
    """The |dlogits| at or below which a column may be skipped: filter_eps x (largest upstream |gradient|) /
    temperature, a 0-d tensor (no host sync); None when filter_eps is 0 (exact gradients). With grad_logp = 1
    and no entropy term, |dlogits[n, v]| = p[n, v] / T off the target, so this skips probabilities <= filter_eps."""
    if filter_eps == 0:
        return None
    scale = torch.stack([g.detach().abs().max() for g in grads if g is not None and g.numel()]).max()
    return scale * (filter_eps / temperature)


def check_filter_eps(filter_eps) -> float:
    if not isinstance(filter_eps, int | float) or not 0 <= filter_eps < 1:
        raise ValueError(f"filter_eps must be a float in [0, 1) (0: exact gradients), got {filter_eps!r}")
    return float(filter_eps)


FILTER_STATS = {"kept": 0, "seen": 0}
"""Vocabulary columns kept / seen by `kept_columns` in this process (diagnostics: bench/bench_kernels_gpu.py)."""


def kept_columns(d_CV: torch.Tensor, threshold: torch.Tensor, tile: int = FILTER_TILE) -> torch.Tensor:
    """int64 indices (ascending) of the columns of d_CV whose FILTER_TILE-wide vocabulary tile holds any
    |d| > threshold. One host sync (the count of kept tiles)."""
    v = d_CV.shape[1]
    num_tiles = -(-v // tile)
    col_max = d_CV.abs().amax(0)
    tile_max = torch.nn.functional.pad(col_max, (0, num_tiles * tile - v)).view(num_tiles, tile).amax(1)
    tiles = torch.nonzero(tile_max > threshold).squeeze(1)
    cols = (tiles[:, None] * tile + torch.arange(tile, device=d_CV.device)).flatten()
    cols = cols[cols < v]
    FILTER_STATS["kept"] += cols.numel()
    FILTER_STATS["seen"] += v
    return cols


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    out += a @ b


def grad_matmuls(d_CV: torch.Tensor, w_VH: torch.Tensor, x_CH: torch.Tensor, dw_VH: torch.Tensor | None,
                 threshold: torch.Tensor | None, addmm=None, need_dx: bool = True) -> torch.Tensor | None:
    """dx = d @ w (returned, in the matmul dtype) and dw += d.T @ x (in place, when dw is given), over every
    vocabulary column when threshold is None, else over `kept_columns` only: the skipped columns' |d| are all
    <= threshold, so each skipped term of dx[n] is at most threshold x |w_v|. addmm(out, a, b): out += a @ b
    (default `out += a @ b`). need_dx False: dw only, returns None."""
    addmm = addmm or _add_product
    if threshold is None:
        if dw_VH is not None:
            addmm(dw_VH, d_CV.T, x_CH)
        return d_CV @ w_VH if need_dx else None
    cols = kept_columns(d_CV, threshold)
    d_CK, w_KH = d_CV[:, cols], w_VH[cols]
    if dw_VH is not None:
        part_KH = torch.zeros(cols.numel(), dw_VH.shape[1], dtype=dw_VH.dtype, device=dw_VH.device)
        addmm(part_KH, d_CK.T, x_CH)
        dw_VH.index_add_(0, cols, part_KH)
    return d_CK @ w_KH if need_dx else None

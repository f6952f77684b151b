"""Sequence packing for variable-length multimodal samples: bin planning, packing, packed M-RoPE positions, and
unpack/repack between packed rows and padded batches.

Every op has a plain Python/torch reference (`<op>_ref`, the spec) and a public `<op>()` that dispatches: CPU
tensors -> the C++ module `kernels._packing`, CUDA tensors -> `kernels._packing_cuda` (both built from csrc/packing
by setup.py; they take raw pointers, never torch types). A missing module falls back to the reference and logs
that once on the "kernels" logger. M-RoPE follows transformers' `Qwen2_5_VLModel.get_rope_index` (5.19) for
images; videos are not supported.

Letters: B samples in a packed row, T packed tokens, N images, P patches, D patch features.
"""

import importlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger("kernels")

TOKEN_KEYS = ("input_ids", "labels", "loss_mask", "mm_token_type_ids")
_BUILD_HINT = "build it with `pip install -e . --no-build-isolation` (needs a C++ compiler; nvcc for CUDA)"
_modules: dict[str, object] = {}


def _load(name: str):
    """The extension module `name`, or None (logged once) when it was not built or cannot load."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(name)
        except ImportError as e:
            logger.warning("%s is unavailable (%s); packing uses the Python reference: %s", name, e, _BUILD_HINT)
            _modules[name] = None
    return _modules[name]


def _native(device: torch.device):
    if device.type == "cuda":
        return _load("kernels._packing_cuda")
    return _load("kernels._packing") if device.type == "cpu" else None


def native_available(device: str | torch.device = "cpu") -> bool:
    """Whether the native twin for `device` loads (for startup checks; loading logs the fallback once)."""
    return _native(torch.device(device)) is not None


def _cuda_args(t: torch.Tensor) -> tuple[int, int]:
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


def _check_cu(cu_seqlens: torch.Tensor, num_tokens: int, *, allow_empty: bool) -> torch.Tensor:
    """Validate cu_seqlens [B+1] against T; returns it on the host as int64 (a device sync for CUDA input)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D tensor [B+1], got {getattr(cu_seqlens, 'shape', cu_seqlens)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)  # sync on CUDA: B+1 numbers
    if cu[0] != 0 or cu[-1] != num_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={num_tokens}, got {cu[0]} .. {cu[-1]}")
    if num_tokens >= 2**31:
        raise ValueError(f"T={num_tokens} tokens does not fit the int32 cu_seqlens")
    lengths = cu.diff()
    bad = (lengths < 0) if allow_empty else (lengths < 1)
    if bad.any():
        b = int(bad.nonzero()[0])
        raise ValueError(f"cu_seqlens: sample {b} has length {int(lengths[b])} "
                         f"({'must be >= 0' if allow_empty else 'empty samples are not allowed'})")
    return cu


# ---------------------------------------------------------------------------------------------------------------
# plan_bins
# ---------------------------------------------------------------------------------------------------------------
def _check_plan_args(lengths, max_tokens: int, num_ranks: int, truncate: bool) -> list[int]:
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    out = []
    for i, n in enumerate(lengths):
        if int(n) < 1:
            raise ValueError(f"lengths[{i}] = {n}: every sample needs at least 1 token")
        if n > max_tokens and not truncate:
            raise ValueError(f"lengths[{i}] = {n} exceeds max_tokens={max_tokens} (raise max_tokens or pass "
                             f"truncate=True)")
        out.append(min(int(n), max_tokens))
    return out


def plan_bins_ref(lengths, max_tokens: int, num_ranks: int = 1, truncate: bool = False) -> list[list[list[int]]]:
    """Reference of `plan_bins` (same arguments and result)."""
    lengths = _check_plan_args(lengths, max_tokens, num_ranks, truncate)
    bins: list[list[int]] = []
    load: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):  # first-fit decreasing, ties by index
        b = next((b for b in range(len(bins)) if load[b] + lengths[i] <= max_tokens), len(bins))
        if b == len(bins):
            bins.append([])
            load.append(0)
        bins[b].append(i)
        load[b] += lengths[i]
    while len(bins) % num_ranks:
        splittable = [b for b in range(len(bins)) if len(bins[b]) >= 2]
        if not splittable:  # fewer samples than the equal-count plan needs: an empty bin (a dummy step)
            bins.append([])
            load.append(0)
            continue
        best = min(splittable, key=lambda b: (-len(bins[b]), -load[b], b))
        halves: tuple[list[int], list[int]] = ([], [])
        for m in bins[best]:  # greedy two-way split, members already in decreasing-length order
            halves[0 if sum(lengths[x] for x in halves[0]) <= sum(lengths[x] for x in halves[1]) else 1].append(m)
        bins[best] = halves[0]
        bins.append(halves[1])
        load[best] = sum(lengths[x] for x in halves[0])
        load.append(sum(lengths[x] for x in halves[1]))
    per_rank = len(bins) // num_ranks
    out: list[list[list[int]]] = [[] for _ in range(num_ranks)]
    rank_load = [0] * num_ranks
    for b in sorted(range(len(bins)), key=lambda b: (-load[b], b)):  # longest first onto the lightest open rank
        r = min((r for r in range(num_ranks) if len(out[r]) < per_rank), key=lambda r: (rank_load[r], r))
        out[r].append(bins[b])
        rank_load[r] += load[b]
    return out


def plan_bins(lengths, max_tokens: int, num_ranks: int = 1, truncate: bool = False) -> list[list[list[int]]]:
    """Assign samples to packed micro-batches of at most `max_tokens` tokens, the same number on every rank.

    First-fit decreasing (ties by index) makes the bins; while their count is not a multiple of `num_ranks`, the
    bin with the most samples (then the most tokens) is split in two, so that empty bins appear only when there
    are fewer samples than the plan needs (e.g. 3 samples on 4 ranks); the trainer runs a zero-weight dummy step
    for those. Bins then go longest-first to the rank with the fewest tokens that still has room. Deterministic.

    Args:
        lengths: [n] token counts (list or 1-D tensor), each >= 1.
        max_tokens: the token budget of one micro-batch (packed, not padded).
        num_ranks: data-parallel ranks.
        truncate: a sample longer than max_tokens counts as max_tokens (the caller must cut it) instead of
            raising ValueError.
    Returns:
        plan[rank][micro_batch] = sample indices; every rank has ceil(#bins / num_ranks) micro-batches, each
        ordered by decreasing length, micro-batches ordered by decreasing tokens.
    """
    lengths = _check_plan_args(lengths, max_tokens, num_ranks, truncate)
    ext = _load("kernels._packing")
    if ext is None:
        return plan_bins_ref(lengths, max_tokens, num_ranks, truncate)
    return ext.plan_bins(lengths, max_tokens, num_ranks, truncate)


# ---------------------------------------------------------------------------------------------------------------
# pack
# ---------------------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class PackedBatch:
    """One packed row. Token tensors are [T]; keys absent from the samples are None."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    """int32 [B+1], sample b is tokens cu_seqlens[b]:cu_seqlens[b+1]."""
    max_seqlen: int
    sample_index: torch.Tensor
    """int32 [T], the sample of each token."""
    labels: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    """[sum P_i, D], samples' patches in order."""
    image_grid_thw: torch.Tensor | None = None
    """[sum n_i, 3], samples' image grids in order."""


def _check_samples(samples: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    """Validate; returns the per-token keys present and cu_seqlens (int32, CPU)."""
    if not isinstance(samples, Sequence) or len(samples) == 0:
        raise ValueError("samples must be a non-empty sequence of dicts with at least 'input_ids'")
    keys = [k for k in TOKEN_KEYS if k in samples[0]]
    has_images = any(s.get("pixel_values") is not None for s in samples)
    device = samples[0]["input_ids"].device if "input_ids" in samples[0] else None
    lengths = []
    for i, s in enumerate(samples):
        if "input_ids" not in s:
            raise ValueError(f"samples[{i}] has no 'input_ids'")
        n = s["input_ids"].shape[0] if s["input_ids"].dim() == 1 else -1
        if n < 1:
            raise ValueError(f"samples[{i}]['input_ids'] must be 1-D and non-empty, got {tuple(s['input_ids'].shape)}")
        for k in TOKEN_KEYS:
            if (k in s) != (k in keys):
                raise ValueError(f"samples[{i}]: key '{k}' must be present in all samples or none")
            if k in s:
                t = s[k]
                if t.shape != (n,) or t.device != device or t.dtype != samples[0][k].dtype:
                    raise ValueError(f"samples[{i}]['{k}'] must be [{n}] {samples[0][k].dtype} on {device}, got "
                                     f"{tuple(t.shape)} {t.dtype} on {t.device}")
        pv, grid = s.get("pixel_values"), s.get("image_grid_thw")
        if (pv is None) != (grid is None):
            raise ValueError(f"samples[{i}]: pixel_values and image_grid_thw come together")
        if pv is not None:
            if grid.dim() != 2 or grid.shape[1] != 3 or pv.dim() != 2:
                raise ValueError(f"samples[{i}]: image_grid_thw must be [n, 3] and pixel_values [P, D], got "
                                 f"{tuple(grid.shape)} and {tuple(pv.shape)}")
            if int(grid.prod(-1).sum()) != pv.shape[0]:
                raise ValueError(f"samples[{i}]: pixel_values has {pv.shape[0]} patches but image_grid_thw sums "
                                 f"to {int(grid.prod(-1).sum())}")
        lengths.append(n)
    if has_images and len({s["pixel_values"].shape[1] for s in samples if s.get("pixel_values") is not None}) > 1:
        raise ValueError("samples: pixel_values must have the same feature size D in every sample")
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    torch.cumsum(torch.tensor(lengths), 0, out=cu[1:])
    return keys, cu


def _cat_images(samples) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    pvs = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    if not pvs:
        return None, None
    return torch.cat(pvs), torch.cat([s["image_grid_thw"] for s in samples if s.get("pixel_values") is not None])


def pack_ref(samples: Sequence[Mapping[str, torch.Tensor]]) -> PackedBatch:
    """Reference of `pack`."""
    keys, cu = _check_samples(samples)
    device = samples[0]["input_ids"].device
    lengths = cu.diff().long()
    pv, grid = _cat_images(samples)
    return PackedBatch(cu_seqlens=cu.to(device), max_seqlen=int(lengths.max()),
                       sample_index=torch.repeat_interleave(torch.arange(len(samples), dtype=torch.int32),
                                                            lengths).to(device),
                       pixel_values=pv, image_grid_thw=grid, **{k: torch.cat([s[k] for s in samples]) for k in keys})


def pack(samples: Sequence[Mapping[str, torch.Tensor]]) -> PackedBatch:
    """Concatenate samples into one packed row.

    Args:
        samples: dicts with input_ids [L_i] (L_i >= 1) and optionally labels / loss_mask / mm_token_type_ids [L_i]
            (present in all samples or none, one dtype each), pixel_values [P_i, D] with image_grid_thw [n_i, 3].
            All token tensors on one device.
    Returns:
        PackedBatch: token tensors [T] on that device, cu_seqlens int32 [B+1], max_seqlen, sample_index int32 [T],
        pixel_values / image_grid_thw concatenated in sample order (torch.cat; None without images).
    """
    keys, cu = _check_samples(samples)
    device = samples[0]["input_ids"].device
    ext = _native(device)
    if ext is None:
        return pack_ref(samples)
    num_tokens, num_segments = int(cu[-1]), len(samples)
    cu_dev = cu.to(device)
    out = {}
    sample_index = torch.empty(num_tokens, dtype=torch.int32, device=device)
    for j, k in enumerate(keys):
        srcs = [s[k].contiguous() for s in samples]  # temporaries freed after enqueueing are safe: same stream
        out[k] = torch.empty(num_tokens, dtype=srcs[0].dtype, device=device)
        ptrs = [t.data_ptr() for t in srcs]
        if device.type == "cuda":
            ptrs_dev = torch.tensor(ptrs, dtype=torch.int64).to(device)
            ext.gather_segments(ptrs_dev.data_ptr(), cu_dev.data_ptr(), num_segments, num_tokens, out[k].data_ptr(),
                                out[k].element_size(), sample_index.data_ptr() if j == 0 else 0, *_cuda_args(cu_dev))
        else:
            ext.gather_segments(ptrs, cu.data_ptr(), out[k].data_ptr(), out[k].element_size())
    if device.type != "cuda":
        ext.sample_index(cu.data_ptr(), num_segments, sample_index.data_ptr())
    pv, grid = _cat_images(samples)
    return PackedBatch(cu_seqlens=cu_dev, max_seqlen=int(cu.diff().max()), sample_index=sample_index,
                       pixel_values=pv, image_grid_thw=grid, **out)


# ---------------------------------------------------------------------------------------------------------------
# mrope_positions
# ---------------------------------------------------------------------------------------------------------------
def _check_mrope_args(mm_token_type_ids, cu_seqlens, image_grid_thw, spatial_merge_size):
    if not isinstance(mm_token_type_ids, torch.Tensor) or mm_token_type_ids.dim() != 1:
        raise ValueError(f"mm_token_type_ids must be a 1-D tensor [T], got "
                         f"{getattr(mm_token_type_ids, 'shape', mm_token_type_ids)}")
    if mm_token_type_ids.dtype.is_floating_point or mm_token_type_ids.dtype == torch.bool:
        raise ValueError(f"mm_token_type_ids must be an integer tensor, got {mm_token_type_ids.dtype}")
    if spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size must be >= 1, got {spatial_merge_size}")
    if image_grid_thw is None:
        image_grid_thw = torch.zeros(0, 3, dtype=torch.int64)
    if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3 or image_grid_thw.dtype.is_floating_point:
        raise ValueError(f"image_grid_thw must be an integer tensor [N, 3], got {tuple(image_grid_thw.shape)} "
                         f"{image_grid_thw.dtype}")
    if cu_seqlens.device != mm_token_type_ids.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but mm_token_type_ids on {mm_token_type_ids.device}")
    cu = _check_cu(cu_seqlens, mm_token_type_ids.numel(), allow_empty=False)
    return cu, image_grid_thw


def mrope_positions_ref(mm_token_type_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                        image_grid_thw: torch.Tensor | None, spatial_merge_size: int = 2
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `mrope_positions`: transformers' get_rope_index walk, one sample at a time."""
    cu, grid = _check_mrope_args(mm_token_type_ids, cu_seqlens, image_grid_thw, spatial_merge_size)
    types, grid = mm_token_type_ids.detach().cpu().tolist(), grid.detach().cpu().long()
    m = spatial_merge_size
    num_tokens = len(types)
    pos = torch.zeros(4, num_tokens, dtype=torch.int64)
    deltas = torch.zeros(len(cu) - 1, dtype=torch.int64)
    img = 0
    for b in range(len(cu) - 1):
        start, end = int(cu[b]), int(cu[b + 1])
        cur, parts = 0, []
        for ty, group in itertools.groupby(range(start, end), key=lambda i: types[i]):
            run = list(group)
            if ty == 0:
                parts.append(torch.arange(cur, cur + len(run)).expand(3, -1))
                cur += len(run)
                continue
            if ty != 1:
                raise ValueError(f"sample {b}: mm_token_type_ids must be 0 (text) or 1 (image); videos are not "
                                 f"supported (token {run[0] - start} has type {ty})")
            if img >= len(grid):
                raise ValueError(f"sample {b}: more image-token runs than the {len(grid)} image_grid_thw rows")
            gt, gh, gw = int(grid[img, 0]), int(grid[img, 1]) // m, int(grid[img, 2]) // m
            if len(run) != gt * gh * gw:
                raise ValueError(f"sample {b}: an image-token run's length differs from t*h*w/merge^2 of its "
                                 f"image_grid_thw row (run of {len(run)} tokens at offset {run[0] - start}, row "
                                 f"{img} = {grid[img].tolist()}, merge {m})")
            # Images keep a temporal step of 1: transformers 5.19 scales only videos by tokens_per_second.
            t, h, w = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
            parts.append(torch.stack([t, h, w]).reshape(3, -1) + cur)
            cur += max(gh, gw)
            img += 1
        sample_pos = torch.cat(parts, dim=1)
        pos[1:, start:end] = sample_pos
        pos[0, start:end] = torch.arange(end - start)
        deltas[b] = sample_pos.max() + 1 - (end - start)
    if img != len(grid):
        raise ValueError(f"image_grid_thw has more rows than the image-token runs of the {len(cu) - 1} samples "
                         f"({len(grid)} rows, {img} runs)")
    return pos.to(mm_token_type_ids.device), deltas.to(mm_token_type_ids.device)


def mrope_positions(mm_token_type_ids: torch.Tensor, cu_seqlens: torch.Tensor, image_grid_thw: torch.Tensor | None,
                    spatial_merge_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids of one packed row, each sample positioned as if it were alone.

    Each maximal run of image tokens in a sample is one image and takes the next image_grid_thw row (rows are
    consumed in order across samples), like transformers' get_rope_index; two images need a text token (the
    vision_end/vision_start pair) between them.

    Args:
        mm_token_type_ids: [T] integer, 0 text, 1 image.
        cu_seqlens: [B+1] int32/int64 sample boundaries on the same device; no empty samples.
        image_grid_thw: [N, 3] (t, h, w) in patches, or None for text only.
        spatial_merge_size: patches merged per side into one token (2 for Qwen2.5-VL).
    Returns:
        position_ids int64 [4, T] (row 0: 0..L_b-1 per sample, the text positions the varlen attention uses;
        rows 1-3: the sample's temporal/height/width M-RoPE positions; the model takes it as [4, 1, T]), and
        rope_deltas int64 [B] (max position + 1 - L_b, what generation continues from).
    Raises:
        ValueError naming the sample for an empty sample, a type other than 0/1, an image run whose length is not
        t*h*w/merge^2, or a mismatch between the number of image runs and image_grid_thw rows.
    """
    cu, grid = _check_mrope_args(mm_token_type_ids, cu_seqlens, image_grid_thw, spatial_merge_size)
    device = mm_token_type_ids.device
    ext = _native(device)
    if ext is None:
        return mrope_positions_ref(mm_token_type_ids, cu_seqlens, image_grid_thw, spatial_merge_size)
    num_tokens, num_segments = mm_token_type_ids.numel(), len(cu) - 1
    types = mm_token_type_ids.to(torch.int32).contiguous()
    cu32 = cu_seqlens.to(torch.int32).contiguous()
    grid = grid.to(device=device, dtype=torch.int64).contiguous()
    pos = torch.empty(4, num_tokens, dtype=torch.int64, device=device)
    deltas = torch.empty(num_segments, dtype=torch.int64, device=device)
    if device.type == "cuda":
        scratch = torch.empty(num_segments + 1, dtype=torch.int32, device=device)
        err = torch.full((1,), 2**31 - 1, dtype=torch.int32, device=device)
        ext.mrope_positions(types.data_ptr(), cu32.data_ptr(), num_segments, num_tokens, grid.data_ptr(), len(grid),
                            spatial_merge_size, pos.data_ptr(), deltas.data_ptr(), scratch.data_ptr(),
                            err.data_ptr(), *_cuda_args(types))
        code = int(err.item())  # sync: the kernels report bad input through this flag
        if code != 2**31 - 1:
            raise ValueError(ext.error_message(code, num_segments))
    else:
        ext.mrope_positions(types.data_ptr(), cu32.data_ptr(), num_segments, grid.data_ptr(), len(grid),
                            spatial_merge_size, pos.data_ptr(), deltas.data_ptr())
    return pos, deltas


# ---------------------------------------------------------------------------------------------------------------
# unpack / repack
# ---------------------------------------------------------------------------------------------------------------
def _segments(values: torch.Tensor, cu_seqlens: torch.Tensor, num_tokens: int, max_len: int | None, name: str):
    if cu_seqlens.device != values.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {name} on {values.device}")
    cu = _check_cu(cu_seqlens, num_tokens, allow_empty=True)
    longest = int(cu.diff().max()) if len(cu) > 1 else 0
    if max_len is None:
        return cu, longest
    if max_len < longest:
        raise ValueError(f"max_len={max_len} is shorter than the longest sample ({longest} tokens)")
    return cu, max_len


def unpack_ref(values: torch.Tensor, cu_seqlens: torch.Tensor, pad_value=0, max_len: int | None = None
               ) -> torch.Tensor:
    """Reference of `unpack` (differentiable through torch ops)."""
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D [T], got {tuple(values.shape)}")
    cu, max_len = _segments(values, cu_seqlens, values.shape[0], max_len, "values")
    out = values.new_full((len(cu) - 1, max_len), pad_value)
    for b in range(len(cu) - 1):
        out[b, : cu[b + 1] - cu[b]] = values[cu[b]: cu[b + 1]]
    return out


def repack_ref(padded: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Reference of `repack` (differentiable through torch ops)."""
    if padded.dim() != 2 or padded.shape[0] != cu_seqlens.numel() - 1:
        raise ValueError(f"padded must be [B, max_len] with B={cu_seqlens.numel() - 1}, got {tuple(padded.shape)}")
    cu = _check_cu(cu_seqlens, int(cu_seqlens[-1]), allow_empty=True)
    if len(cu) > 1 and int(cu.diff().max()) > padded.shape[1]:
        raise ValueError(f"padded has {padded.shape[1]} columns, fewer than the longest sample")
    return torch.cat([padded[b, : cu[b + 1] - cu[b]] for b in range(len(cu) - 1)] + [padded.new_empty(0)])


def _pad_bits(pad_value, dtype: torch.dtype) -> int:
    raw = torch.tensor([pad_value], dtype=dtype).view(torch.uint8).tolist()
    return int.from_bytes(bytes(raw), "little")


def _unpack_native(ext, values, cu_seqlens, pad_value, max_len):
    cu, max_len = _segments(values, cu_seqlens, values.shape[0], max_len, "values")
    values, cu32 = values.contiguous(), cu_seqlens.to(torch.int32).contiguous()
    out = torch.empty(len(cu) - 1, max_len, dtype=values.dtype, device=values.device)
    args = (values.data_ptr(), cu32.data_ptr(), len(cu) - 1, max_len, out.data_ptr(),
            _pad_bits(pad_value, values.dtype), values.element_size())
    ext.unpack(*args, *(_cuda_args(values) if values.is_cuda else ()))
    return out


def _repack_native(ext, padded, cu_seqlens):
    cu = _check_cu(cu_seqlens, int(cu_seqlens[-1]), allow_empty=True)
    if len(cu) > 1 and int(cu.diff().max()) > padded.shape[1]:
        raise ValueError(f"padded has {padded.shape[1]} columns, fewer than the longest sample")
    padded, cu32 = padded.contiguous(), cu_seqlens.to(torch.int32).contiguous()
    out = torch.empty(int(cu[-1]), dtype=padded.dtype, device=padded.device)
    args = (padded.data_ptr(), cu32.data_ptr(), len(cu) - 1, padded.shape[1], out.data_ptr(), padded.element_size())
    ext.repack(*args, *(_cuda_args(padded) if padded.is_cuda else ()))
    return out


class UnpackFunction(torch.autograd.Function):
    """Native unpack; the gradient of a padded tensor back to packed tokens is repack (pads get none)."""

    @staticmethod
    def forward(ctx, values, cu_seqlens, pad_value, max_len, ext):
        ctx.save_for_backward(cu_seqlens)
        ctx.ext = ext
        return _unpack_native(ext, values, cu_seqlens, pad_value, max_len)

    @staticmethod
    def backward(ctx, grad):
        (cu_seqlens,) = ctx.saved_tensors
        return _repack_native(ctx.ext, grad, cu_seqlens), None, None, None, None


class RepackFunction(torch.autograd.Function):
    """Native repack; its gradient is unpack with zero padding."""

    @staticmethod
    def forward(ctx, padded, cu_seqlens, ext):
        ctx.save_for_backward(cu_seqlens)
        ctx.ext, ctx.max_len = ext, padded.shape[1]
        return _repack_native(ext, padded, cu_seqlens)

    @staticmethod
    def backward(ctx, grad):
        (cu_seqlens,) = ctx.saved_tensors
        return _unpack_native(ctx.ext, grad, cu_seqlens, 0, ctx.max_len), None, None


def unpack(values: torch.Tensor, cu_seqlens: torch.Tensor, pad_value=0, max_len: int | None = None) -> torch.Tensor:
    """Packed per-token values -> padded batch (differentiable: the backward is `repack`).

    Args:
        values: [T] any dtype (native for 1/2/4/8-byte elements: bool, bf16, fp32, int64, ...).
        cu_seqlens: [B+1] int32/int64 on the same device (read on the host: a sync on CUDA). Empty samples allowed.
        pad_value: fill for positions past each sample's end.
        max_len: columns of the result; default the longest sample.
    Returns:
        [B, max_len] of values.dtype.
    """
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D [T], got {tuple(values.shape)}")
    ext = _native(values.device)
    if ext is None or values.element_size() not in (1, 2, 4, 8):
        return unpack_ref(values, cu_seqlens, pad_value, max_len)
    return UnpackFunction.apply(values, cu_seqlens, pad_value, max_len, ext)


def repack(padded: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The inverse of `unpack`: padded [B, max_len] -> packed [T] (differentiable: the backward is `unpack`).

    Args:
        padded: [B, >= longest sample] any dtype (native for 1/2/4/8-byte elements).
        cu_seqlens: [B+1] int32/int64 on the same device.
    Returns:
        [T] of padded.dtype, T = cu_seqlens[-1].
    """
    if padded.dim() != 2 or padded.shape[0] != cu_seqlens.numel() - 1:
        raise ValueError(f"padded must be [B, max_len] with B={cu_seqlens.numel() - 1}, got {tuple(padded.shape)}")
    if cu_seqlens.device != padded.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but padded on {padded.device}")
    ext = _native(padded.device)
    if ext is None or padded.element_size() not in (1, 2, 4, 8):
        return repack_ref(padded, cu_seqlens)
    return RepackFunction.apply(padded, cu_seqlens, ext)

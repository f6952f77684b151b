"""Packed micro-batches: several samples in one row (batch 1) with per-sample position ids and boundaries.

A packed row carries everything the model needs to keep samples apart:
- `position_ids`: for Qwen2.5-VL `[4, 1, T]` (row 0 text positions restarting at 0 per sample, rows 1-3 the
  sample's own M-RoPE t/h/w positions); for text models `[1, T]`, restarting per sample. transformers derives
  a block-diagonal mask from the restarts under sdpa/eager; our varlen attention uses the boundaries directly.
- `cu_seq_lens_q/k`, `max_length_q/k`: the sample boundaries, passed through to the attention function.
- no `attention_mask`: under sdpa transformers then builds the block-diagonal mask from the position restarts
  (a 2-D mask would be taken as padding); `use_cache=False` is the policy's job (with a cache transformers
  would let samples attend to each other).
The first label of every sample is forced to -100 so no sample is trained to predict the next one's first token.
`target_cu` gives each sample's slice of the policy's flat per-target output (its response tokens), the
boundaries the fused losses take.
"""

import torch

from engine.data import IGNORE_INDEX, Sample
from kernels import mrope_positions, pack


def num_targets(sample: Sample) -> int:
    """Tokens the sample is trained on (labels after the first position that are not -100)."""
    return sum(1 for t in sample.labels[1:] if t != IGNORE_INDEX)


def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a batch; leave plain values (max lengths, flags) alone."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pack_samples(samples: list[Sample], *, merge_size: int | None) -> dict[str, torch.Tensor]:
    """One packed row from `samples`. `merge_size` is the VLM's spatial merge size, or None for text models."""
    items = []
    for s in samples:
        item = {"input_ids": torch.tensor(s.input_ids, dtype=torch.long)}
        labels = torch.tensor(s.labels if s.labels is not None else [IGNORE_INDEX] * len(s.input_ids))
        labels[0] = IGNORE_INDEX  # position t predicts t+1: the previous sample's last token must not predict it
        item["labels"] = labels
        if merge_size is not None:
            item["mm_token_type_ids"] = torch.tensor(s.mm_token_type_ids, dtype=torch.int32)
        if s.image_grid_thw is not None:
            item["pixel_values"], item["image_grid_thw"] = s.pixels(), s.image_grid_thw
        items.append(item)
    packed = pack(items)
    cu = packed.cu_seqlens
    if merge_size is not None:
        pos, _ = mrope_positions(packed.mm_token_type_ids, cu, packed.image_grid_thw, spatial_merge_size=merge_size)
        position_ids = pos[:, None]  # [4, 1, T]
    else:
        starts = cu[:-1].long().repeat_interleave(torch.diff(cu).long())
        position_ids = (torch.arange(len(packed.input_ids)) - starts)[None]  # [1, T]
    counts = torch.tensor([num_targets(s) for s in samples])
    target_cu = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int()
    batch = {"input_ids": packed.input_ids[None], "labels": packed.labels[None], "position_ids": position_ids,
             "target_cu": target_cu,
             "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": packed.max_seqlen,
             "max_length_k": packed.max_seqlen}
    if packed.pixel_values is not None:
        batch["pixel_values"], batch["image_grid_thw"] = packed.pixel_values, packed.image_grid_thw
    return batch

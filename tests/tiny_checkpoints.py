"""Tiny random Qwen2 and Qwen2.5-VL checkpoints written with save_pretrained (bf16 or fp32, tied or untied, one
file or several), for the loading and export tests. Odd sizes (vocab 131, 3 layers) make FSDP2's dim-0 shards
uneven on 2 ranks."""

from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

VOCAB = 131


def text_kwargs() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def save_qwen2(out: Path, *, dtype: torch.dtype, tied: bool, max_shard_size: str | None = None, seed: int = 0) -> Path:
    config = Qwen2Config(**text_kwargs(), tie_word_embeddings=tied)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return _save(model.to(dtype), out, max_shard_size)


def save_qwen2_5_vl(out: Path, *, dtype: torch.dtype, tied: bool, max_shard_size: str | None = None,
                    seed: int = 0) -> Path:
    text = {**text_kwargs(), "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                 "mrope_section": [2, 3, 3]}}
    vision = dict(depth=3, hidden_size=40, intermediate_size=72, num_heads=2, out_hidden_size=48, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[2], window_size=112)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied,
                              image_token_id=VOCAB - 4, video_token_id=VOCAB - 3, vision_start_token_id=VOCAB - 2,
                              vision_end_token_id=VOCAB - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return _save(model.to(dtype), out, max_shard_size)


def _save(model, out: Path, max_shard_size: str | None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out

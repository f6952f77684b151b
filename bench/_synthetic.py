"""Synthetic Qwen2.5-VL models with random weights for the device benchmarks (no download, no tokenizer).

The vision special tokens sit at the top of the vocabulary, as in Qwen's tokenizer: image pad = vocab - 1,
vision start = vocab - 2, vision end = vocab - 3; text ids are drawn below them.
"""

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration


def special_ids(vocab: int) -> tuple[int, int, int]:
    """(image pad, vision start, vision end) ids for a vocabulary of `vocab` tokens."""
    return vocab - 1, vocab - 2, vocab - 3


def qwen_vl_config(*, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                   vision_depth: int, vision_hidden: int, vision_heads: int) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config; M-RoPE sections split head_dim / 2 as Qwen does ([16, 24, 24] at head_dim 128)."""
    half = hidden // heads // 2
    mrope = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    image, v_start, v_end = special_ids(vocab)
    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, num_heads=vision_heads,
                           intermediate_size=4 * vision_hidden, out_hidden_size=hidden,
                           fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=image, vision_start_token_id=v_start, vision_end_token_id=v_end, tie_word_embeddings=False)


def random_model(config: Qwen2_5_VLConfig, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config)

"""Write config.json of Qwen2.5-VL-7B and -3B (their published shapes; no weights) for `python -m engine.plan
--model-config` and bench/rehearse_7b.py on a machine without the checkpoints.

    python bench/model_configs/write_configs.py
"""

from pathlib import Path

from transformers import Qwen2_5_VLConfig

VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], in_chans=3,
              hidden_act="silu")
TEXT = dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=151643,
            eos_token_id=151645)
SHAPES = {
    "qwen2.5-vl-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, tie=False),
    "qwen2.5-vl-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, tie=True),
}


def config(name: str, **override) -> Qwen2_5_VLConfig:
    shape = {**SHAPES[name], **override}
    tie = shape.pop("tie")
    return Qwen2_5_VLConfig(text_config={**TEXT, **shape},
                            vision_config={**VISION, "out_hidden_size": shape["hidden_size"]},
                            tie_word_embeddings=tie, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653, dtype="bfloat16")


if __name__ == "__main__":
    for name in SHAPES:
        out = Path(__file__).parent / name
        config(name).save_pretrained(out)
        print(out / "config.json")

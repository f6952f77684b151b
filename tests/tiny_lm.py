"""A tiny random Qwen2 causal LM and a character-level tokenizer, saved like a hub checkpoint (no download): what the
trainer-integration tests (TRL, verl) load by path."""

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHARS = "abcdefghijklmnopqrstuvwxyz .,"
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of CHARS; ids 0/1/2 are pad/eos/unk."""
    vocab = {t: i for i, t in enumerate([*SPECIAL, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_tiny_qwen2(path: Path, *, seed: int = 0, hidden_size: int = 32) -> Path:
    """Save a 2-layer random Qwen2ForCausalLM (fp32, untied lm_head) and its tokenizer to `path`."""
    tokenizer = char_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None, attn_implementation="eager")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # sharper logits than the 0.02-std init, so sampled completions and ratios vary
        model.lm_head.weight.mul_(20.0)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

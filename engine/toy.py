"""The embedded toy world: a synthetic visual-reasoning dataset, a locally trained tokenizer and a tiny random
Qwen2.5-VL, all built offline in a few seconds and byte-identical for a given seed.

    from engine.toy import build_toy_world
    paths = build_toy_world("runs/toy", seed=0)   # {"train", "test", "test_ood", "sft", "pairs", "hf"} -> Path

Layout written under `out_dir`:
    data/train.parquet, data/test.parquet  id, task, problem, answer, choices, images (List(Image()), PNG bytes)
    data/test_ood.parquet                   the same columns, task families held out of training (spec.ood_tasks)
    data/sft.parquet                        train rows + response (a `format_share` of them <think>/<answer> tagged)
    data/pairs.parquet                      the tagged sft rows + chosen (that response), rejected (it corrupted
                                            by engine/corrupt.py), corruption: synthetic format-only pairs
    hf/                                     tokenizer (byte-level BPE, Qwen2-VL chat template), image processor
                                            (Qwen2VLImageProcessor, PIL backend) and Qwen2_5_VLForConditionalGeneration

It stands in for the real Qwen2.5-VL checkpoint and dataset in CPU tests and `recipes/tiny.toml`: same file
formats, same special tokens and chat template, same vision pipeline, only tiny. The pictures and questions are
drawn by `engine/toy_draw.py`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from engine.corrupt import corrupt
from engine.rewards import format_ok
from engine.toy_draw import OOD_TASKS, TASKS, ToySample, make_response, make_sample, png_bytes
from engine.toy_spec import SPECIAL_TOKENS, TAG_TOKENS, ToySpec

logger = logging.getLogger("engine.toy")

__all__ = ["FORMAT_PROMPT", "OOD_TASKS", "SPECIAL_TOKENS", "TAG_TOKENS", "TASKS", "ToySpec", "build_toy_model",
           "build_toy_world", "generate_split"]

FORMAT_PROMPT = (
    "Think step by step inside <think> </think> tags, then give the final answer inside <answer> </answer> tags."
)
"""Instruction a recipe may append to each problem; part of the tokenizer's training text."""
SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2's pre-tokenizer split: single digits, words with one leading non-letter, punctuation runs, newlines.
_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                      r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen2-VL's chat template, verbatim: default system prompt, images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

_MAX_POSITIONS = 4096
"""Context length of the toy model; toy samples are about 100 tokens."""



def _features(extra: list[str]):
    """The parquet schema; `datasets` is imported here only, so the tokenizer and model builders work without it
    (the GPU benchmark machine has no `datasets`)."""
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"),
        "task": datasets.Value("string"),
        "problem": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "images": datasets.List(datasets.Image()),
        **{k: datasets.Value("string") for k in extra},
    })


@contextmanager
def _quiet_progress_bars():
    """Hide datasets' and transformers' per-file progress bars for a 1-2 s build, then restore their state."""
    import datasets

    datasets_off = datasets.are_progress_bars_disabled()
    transformers_on = transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if not datasets_off:
            datasets.enable_progress_bars()
        if transformers_on:
            transformers.utils.logging.enable_progress_bar()


def generate_split(spec: ToySpec, split: str) -> list[ToySample]:
    """The samples of one split, with the metadata of what was drawn (objects, reasoning).

    Args:
        spec: the world spec; only seed, num_train/num_test, the task lists and the image sizes matter here.
        split: "train", "test" or "test_ood" (the held-out `spec.ood_tasks` families, num_test rows).

    Returns:
        num_train or num_test samples; task families cycle in `spec.tasks` (or `spec.ood_tasks`) order.
    """
    num = {"train": spec.num_train, "test": spec.num_test, "test_ood": spec.num_test}[split]
    tasks = spec.ood_tasks if split == "test_ood" else spec.tasks
    size = spec.ood_image_size or spec.image_size if split == "test_ood" else spec.image_size
    # A str seed goes through sha512 in random.seed, so streams are stable across processes and PYTHONHASHSEED.
    rng = random.Random(f"toy/{spec.seed}/{split}")
    return [make_sample(rng, tasks[i % len(tasks)], size) for i in range(num)]


def _sft_responses(spec: ToySpec, samples: list[ToySample]) -> list[str]:
    rng = random.Random(f"toy/{spec.seed}/sft")
    formatted = set(rng.sample(range(len(samples)), round(spec.format_share * len(samples))))
    return [make_response(s, rng, i in formatted) for i, s in enumerate(samples)]


def _write_parquet(path: Path, split: str, samples: list[ToySample], extra: dict[str, list[str]] | None = None,
                   ids: list[int] | None = None) -> None:
    """Rows of `samples` (their ids `<split>-<index>`, or `ids` when the samples are a subset) plus string columns."""
    ids = list(range(len(samples))) if ids is None else ids
    columns = {
        "id": [f"{split}-{i:05d}" for i in ids],
        "task": [s.task for s in samples],
        "problem": [s.problem for s in samples],
        "answer": [s.answer for s in samples],
        "choices": [s.choices for s in samples],
        # Encode the PNG ourselves so the stored bytes do not depend on how `datasets` would pick a format.
        "images": [[{"bytes": png_bytes(s.image), "path": None}] for s in samples],
    }
    extra = extra or {}
    columns.update(extra)
    import datasets

    datasets.Dataset.from_dict(columns, features=_features(list(extra))).to_parquet(str(path))


def _pairs(spec: ToySpec, responses: list[str]) -> tuple[list[int], dict[str, list[str]]]:
    """Format-only preference pairs from the well-formatted SFT responses: chosen = the response, rejected = it
    with one of the five corruptions (engine/corrupt.py). A synthetic stand-in for self-distilled pairs, so the
    DPO stage can run on the toy before the distill stage exists."""
    rng = random.Random(spec.seed)
    keep = [i for i, r in enumerate(responses) if format_ok(r)]
    rejected, kinds = zip(*(corrupt(responses[i], rng=rng) for i in keep), strict=True) if keep else ((), ())
    return keep, {"chosen": [responses[i] for i in keep], "rejected": list(rejected), "corruption": list(kinds)}


def _train_tokenizer(spec: ToySpec, corpus: list[str]) -> Qwen2Tokenizer:
    """Byte-level BPE on the toy corpus with Qwen2's pre-tokenizer, then Qwen2.5-VL's added tokens."""
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size - len(SPECIAL_TOKENS) - len(TAG_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Tags are added tokens and never reach BPE at encode time, so they are stripped from the training text.
    for tag in TAG_TOKENS:
        corpus = [text.replace(tag, " ") for text in corpus]
    # The trainer's merge order depends neither on threads nor on hash seeds (checked with and without
    # TOKENIZERS_PARALLELISM, across processes; tests/test_toy.py builds in a subprocess to keep it so).
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    # Qwen2Tokenizer keeps our backend (tokenizer_object wins) but records tokenizer_class=Qwen2Tokenizer,
    # so AutoTokenizer rebuilds it with the same Qwen2 pipeline, as for the real checkpoint.
    model = json.loads(tok.to_str())["model"]
    qwen = Qwen2Tokenizer(tokenizer_object=tok, vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                          unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          extra_special_tokens=list(SPECIAL_TOKENS[1:]), model_max_length=_MAX_POSITIONS)
    qwen.chat_template = CHAT_TEMPLATE
    return qwen


def _mrope_section(head_dim: int) -> list[int]:
    """Split of the head_dim/2 rotary frequencies over (t, h, w); Qwen2.5-VL's [16, 24, 24] at head_dim 128."""
    half = head_dim // 2
    hw = 3 * half // 8
    return [half - 2 * hw, hw, hw]


def _build_model(spec: ToySpec, tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # pad up to a multiple of 64, as real checkpoints do
        hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=_MAX_POSITIONS, max_window_layers=spec.num_layers,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": _mrope_section(spec.hidden_size // spec.num_heads)},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=spec.vision_depth, hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
        num_heads=2, out_hidden_size=spec.hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        # Window attention in all blocks but the last, as Qwen2.5-VL does every 8th block; a 112 px window
        # covers a whole 112 px toy image, so windowing is exercised but changes nothing there.
        fullatt_block_indexes=[spec.vision_depth - 1], window_size=112,
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    # fork_rng: seed the init without moving the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],  # Qwen2.5-VL stops on either
    )
    return model


def build_toy_model(hf_dir: str | Path, spec: ToySpec) -> tuple[Qwen2Tokenizer, Qwen2_5_VLForConditionalGeneration]:
    """Only the `hf/` part of the world (tokenizer, image processor, model), written to `hf_dir`; needs no
    `datasets` (the GPU test machine has none). `build_toy_world` calls it, so the files are the same."""
    train = generate_split(spec, "train")
    corpus = ([s.problem for s in train] + _sft_responses(spec, train)
              + [FORMAT_PROMPT, SYSTEM_PROMPT, "system\nuser\nassistant\n"])
    tokenizer = _train_tokenizer(spec, corpus)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2,
        # max_pixels = image_size^2 keeps a toy image at its size: 112 px -> 8x8 patches -> 16 merged tokens.
        min_pixels=56 * 56, max_pixels=spec.image_size**2,
    )
    model = _build_model(spec, tokenizer)
    Path(hf_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(hf_dir)
    image_processor.save_pretrained(hf_dir)
    model.save_pretrained(hf_dir)
    return tokenizer, model


def build_toy_world(out_dir: str | Path, spec: ToySpec | None = None) -> dict[str, Path]:
    """Writes the toy dataset, tokenizer, image processor and model under `out_dir` (see the module docstring).

    Args:
        out_dir: created if missing; existing files of the same names are overwritten.
        spec: the world's settings (engine/toy_spec.py); None: the defaults.

    Returns:
        {"train", "test", "test_ood", "sft", "pairs"}: the parquet files; {"hf"}: the directory for
        `from_pretrained`.

    Raises:
        ValueError: some settings are invalid (all of them listed).
    """
    spec = ToySpec() if spec is None else spec
    if errors := spec.check():
        raise ValueError(f"build_toy_world: {len(errors)} invalid setting(s)\n  " + "\n  ".join(errors))
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    data_dir, hf_dir = out_dir / "data", out_dir / "hf"
    data_dir.mkdir(parents=True, exist_ok=True)
    hf_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": data_dir / "train.parquet", "test": data_dir / "test.parquet", "sft": data_dir / "sft.parquet",
             "pairs": data_dir / "pairs.parquet",
             "test_ood": data_dir / "test_ood.parquet", "hf": hf_dir}

    train, test = generate_split(spec, "train"), generate_split(spec, "test")
    responses = _sft_responses(spec, train)
    with _quiet_progress_bars():
        _write_parquet(paths["train"], "train", train)
        _write_parquet(paths["test"], "test", test)
        _write_parquet(paths["test_ood"], "test_ood", generate_split(spec, "test_ood"))
        _write_parquet(paths["sft"], "train", train, {"response": responses})
        keep, pair_columns = _pairs(spec, responses)
        _write_parquet(paths["pairs"], "train", [train[i] for i in keep], pair_columns, ids=keep)
        tokenizer, model = build_toy_model(hf_dir, spec)

    num_params = sum(p.numel() for p in model.parameters())
    num_vision = sum(p.numel() for p in model.model.visual.parameters())
    logger.info("toy world seed %d: %d train / %d test rows, %d formatted sft rows; tokenizer %d tokens; model "
                "%s params (%s vision), vocab %d; %.1f s -> %s", spec.seed, len(train), len(test),
                round(spec.format_share * len(train)), len(tokenizer), f"{num_params:,}", f"{num_vision:,}",
                model.config.text_config.vocab_size, time.perf_counter() - t0, out_dir)
    return paths

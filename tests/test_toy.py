"""Tests for engine/toy.py and engine/toy_draw.py: determinism, dataset schema, answers checked against the
pixels, SFT formatting, tokenizer, image processor and a tiny Qwen2.5-VL forward.

Uses the session-wide `toy_world` fixture (conftest.py: seed 0, 64 train / 16 test rows).
"""

import re
from collections import deque
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from engine.toy import (
    OOD_TASKS,
    SPECIAL_TOKENS,
    TAG_TOKENS,
    TASKS,
    ToySpec,
    build_toy_world,
    generate_split,
)
from engine.toy_draw import BACKGROUND, CELL_PX, COLORS, DIGIT_INK

from ._launch import child_env, launch, python

WORLD = dict(seed=0, num_train=64, num_test=16)  # what conftest's toy_world fixture builds
COLUMNS = ["id", "task", "problem", "answer", "choices", "images"]
FORMATTED = re.compile(r"^<think>.+</think><answer>(.+)</answer>$", re.DOTALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path, tmp_path: Path) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected regions of True pixels (no scipy here)."""
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        count += 1
        seen[y, x] = True
        todo = deque([(y, x)])
        while todo:
            cy, cx = todo.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    todo.append((ny, nx))
    return count


def _count_color(pixels: np.ndarray, name: str) -> int:
    return _components((pixels == np.array(COLORS[name], dtype=np.uint8)).all(-1))


@pytest.mark.subprocess
def test_same_seed_is_byte_identical(toy_world, tmp_path):
    reference = _files(toy_world)
    assert len(reference) >= 10, sorted(reference)
    build_toy_world(tmp_path / "again", ToySpec(**WORLD))
    assert _files(tmp_path / "again") == reference
    # A fresh process has other hash seeds and a fresh tokenizers thread pool: still identical.
    code = (f"from engine.toy import ToySpec, build_toy_world; "
            f"build_toy_world({str(tmp_path / 'sub')!r}, ToySpec(**{WORLD!r}))")
    launch(python("-c", code), env=child_env(PYTHONHASHSEED="12345"), timeout_s=120)
    other = _files(tmp_path / "sub")
    assert other.keys() == reference.keys()
    assert [k for k in reference if other[k] != reference[k]] == []


def test_other_seed_differs_and_global_rng_untouched(toy_world, tmp_path):
    state = torch.get_rng_state()
    paths = build_toy_world(tmp_path, ToySpec(**{**WORLD, "seed": 1}))
    assert torch.equal(torch.get_rng_state(), state)
    assert paths["train"].read_bytes() != (toy_world / "data/train.parquet").read_bytes()
    assert paths["test"].read_bytes() != (toy_world / "data/test.parquet").read_bytes()


def test_invalid_settings_are_all_reported(tmp_path):
    with pytest.raises(ValueError, match="3 invalid") as err:
        build_toy_world(tmp_path, ToySpec(format_share=1.5, image_size=100, num_kv_heads=3))
    assert "format_share" in str(err.value) and "image_size" in str(err.value) and "num_kv_heads" in str(err.value)


@pytest.mark.parametrize("split,num", [("train", WORLD["num_train"]), ("test", WORLD["num_test"])])
def test_parquet_schema(toy_world, tmp_path, split, num):
    ds = _load(toy_world / f"data/{split}.parquet", tmp_path)
    assert ds.column_names == COLUMNS and len(ds) == num
    assert ds.features["images"] == datasets.List(datasets.Image())
    assert ds.features["choices"] == datasets.List(datasets.Value("string"))
    assert ds["id"][:2] == [f"{split}-00000", f"{split}-00001"]
    assert set(ds["task"]) == set(TASKS)
    for row in ds:
        assert row["problem"].startswith("<image>") and row["problem"].count("<image>") == 1
        assert len(row["images"]) == 1
        image = row["images"][0]
        assert isinstance(image, Image.Image) and image.size == (112, 112) and image.mode == "RGB"
        if row["task"] == "major_color":
            assert row["answer"] in "ABCD" and len(row["answer"]) == 1 and len(row["choices"]) == 4
            assert all(f"\n{letter}. {c}" in row["problem"] for letter, c in zip("ABCD", row["choices"], strict=True))
        else:
            assert row["answer"].isdigit() and row["choices"] == []


def test_images_stored_as_png_bytes(toy_world):
    import pyarrow.parquet as pq

    cell = pq.read_table(toy_world / "data/train.parquet").column("images")[0].as_py()[0]
    assert cell["path"] is None and cell["bytes"].startswith(b"\x89PNG")


def test_rows_match_generator(toy_world, tmp_path):
    ds = _load(toy_world / "data/train.parquet", tmp_path)
    samples = generate_split(ToySpec(**WORLD), "train")
    for row, sample in zip(ds, samples, strict=True):
        assert (row["task"], row["problem"], row["answer"], row["choices"]) == (
            sample.task, sample.problem, sample.answer, sample.choices)
        assert np.array_equal(np.asarray(row["images"][0]), np.asarray(sample.image))  # PNG is lossless


def test_answers_follow_from_pixels(toy_world, tmp_path):
    """Re-derive every answer from the decoded image alone (shapes never touch; no anti-aliasing)."""
    ds = _load(toy_world / "data/train.parquet", tmp_path)
    samples = generate_split(ToySpec(**WORLD), "train")
    for row, sample in zip(ds, samples, strict=True):
        pixels = np.asarray(row["images"][0])
        known = np.zeros(pixels.shape[:2], dtype=bool)
        for rgb in [BACKGROUND, DIGIT_INK, *COLORS.values()]:
            known |= (pixels == np.array(rgb, dtype=np.uint8)).all(-1)
        if row["task"] == "count_color":
            target = re.search(r"(How many|Count the) (\w+) shapes", row["problem"]).group(2)
            assert _count_color(pixels, target) == int(row["answer"])
            assert known.all()  # only exact palette colours: nothing blended
        elif row["task"] == "major_color":
            counts = [_count_color(pixels, c) for c in row["choices"]]
            assert sorted(counts)[-1] > sorted(counts)[-2], counts  # a unique winner
            assert "ABCD"[int(np.argmax(counts))] == row["answer"]
            assert known.all()
        else:
            # Digits are not read back from pixels: check that ink sits in exactly the cells the generator
            # recorded, and that the answer is the sum of the recorded digits.
            ink = (pixels < 128).all(-1)
            side = pixels.shape[0] // CELL_PX
            inked = {(y // CELL_PX) * side + x // CELL_PX for y, x in zip(*np.nonzero(ink), strict=True)}
            recorded = {(o.cy // CELL_PX) * side + o.cx // CELL_PX for o in sample.objects}
            assert inked == recorded and len(recorded) == len(sample.objects)
            assert int(row["answer"]) == sum(o.digit for o in sample.objects)
            assert ", ".join(str(o.digit) for o in sample.objects[:-1]) in sample.reasoning


def test_ood_split_holds_out_its_task_family(toy_world, tmp_path):
    ds = _load(toy_world / "data/test_ood.parquet", tmp_path)
    assert ds.column_names == COLUMNS and len(ds) == WORLD["num_test"] and ds["id"][0] == "test_ood-00000"
    assert set(ds["task"]) == set(OOD_TASKS) and not set(OOD_TASKS) & set(TASKS)
    train_words = " ".join(_load(toy_world / "data/train.parquet", tmp_path)["problem"])
    samples = generate_split(ToySpec(**WORLD), "test_ood")
    for row, sample in zip(ds, samples, strict=True):
        target = re.search(r"(How many|Tally the) (\w+)s ", row["problem"]).group(2)
        assert target + "s" not in train_words  # the question wording is new too
        assert sum(o.kind == target for o in sample.objects) == int(row["answer"])
        pixels = np.asarray(row["images"][0])
        drawn = sum(_count_color(pixels, c) for c in COLORS)
        assert drawn == len(sample.objects)  # every recorded object is on the picture, nothing else


def test_demo_families_follow_from_pixels():
    """main_color and count_shapes (recipes/tiny.toml's families): answers re-derived from the pixels alone."""
    spec = ToySpec(seed=2, num_train=60, tasks=["main_color", "count_shapes"], ood_tasks=["count_shape"])
    for sample in generate_split(spec, "train"):
        pixels = np.asarray(sample.image)
        counts = {c: _count_color(pixels, c) for c in COLORS}
        if sample.task == "main_color":
            assert sample.answer in COLORS and sample.choices == []  # free text: an open-ended gold
            others = sum(counts.values()) - counts[sample.answer]
            assert counts[sample.answer] >= 3 and 2 * others < counts[sample.answer], counts  # a clear majority
            assert sample.reasoning.endswith(f"are {sample.answer}.")
        else:
            assert sum(counts.values()) == int(sample.answer) and 1 <= int(sample.answer) <= 8
            assert f"{sample.answer} shape" in sample.reasoning


def test_ood_pictures_can_differ_from_training():
    """ood_image_size draws the trained families on larger pictures: same questions, a visual shift."""
    spec = ToySpec(num_train=6, num_test=6, tasks=["main_color", "count_shapes"],
                   ood_tasks=["main_color", "count_shapes"], ood_image_size=168)
    assert spec.check() == []
    train, ood = generate_split(spec, "train"), generate_split(spec, "test_ood")
    assert {s.image.size for s in train} == {(112, 112)} and {s.image.size for s in ood} == {(168, 168)}
    assert {s.task for s in ood} == {"main_color", "count_shapes"}
    for sample in ood:  # up to 14 shapes anywhere on the 6x6 grid, still exact
        counts = [_count_color(np.asarray(sample.image), c) for c in COLORS]
        assert sum(counts) == len(sample.objects)


@pytest.mark.parametrize("changes,message", [
    (dict(tasks=["count_color", "spelling"]), "unknown task family ['spelling']"),
    (dict(ood_tasks=[]), "ood_tasks must name at least one"),
    (dict(ood_tasks=["count_color"]), "ood_tasks must be held out of tasks"),
    (dict(ood_tasks=["count_color"], ood_image_size=150), "ood_image_size must be a multiple of 28"),
])
def test_task_settings_are_checked(changes, message):
    errors = ToySpec(**changes).check()
    assert len(errors) == 1 and message in errors[0], errors


def test_sft_responses(toy_world, tmp_path):
    sft = _load(toy_world / "data/sft.parquet", tmp_path)
    train = _load(toy_world / "data/train.parquet", tmp_path)
    assert sft.column_names == [*COLUMNS, "response"] and len(sft) == len(train)
    assert sft["id"] == train["id"] and sft["answer"] == train["answer"]
    matches = [FORMATTED.match(r) for r in sft["response"]]
    assert sum(m is not None for m in matches) == round(0.4 * WORLD["num_train"])
    for match, response, answer in zip(matches, sft["response"], sft["answer"], strict=True):
        if match:
            assert match.group(1) == answer
            assert all(response.count(tag) == 1 for tag in TAG_TOKENS)
        else:
            assert not any(tag in response for tag in TAG_TOKENS) and answer in response
    assert len(set(sft["response"])) > len(sft) // 2  # the wording varies


def test_sft_reasoning_is_correct():
    """The formatted reasoning states the counts the picture really has."""
    for sample in generate_split(ToySpec(seed=3, num_train=30), "train"):
        if sample.task == "count_color":
            numbers = [int(n) for n in re.findall(r"(\d+) \w+ (?:circle|square|triangle)", sample.reasoning)]
            assert sum(numbers) == int(sample.answer)
        elif sample.task == "digit_sum":
            assert sample.reasoning.endswith(f"= {sample.answer}.")
        else:
            assert sample.reasoning.endswith(f"option {sample.answer}.")


def test_tokenizer(toy_world, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_world / "hf")
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert len(tok) <= 1024 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS + TAG_TOKENS))
    assert ids == list(range(len(tok) - len(ids), len(tok)))  # appended after the BPE vocabulary, in order
    for token, token_id in zip(SPECIAL_TOKENS + TAG_TOKENS, ids, strict=True):
        assert tok.encode(token, add_special_tokens=False) == [token_id]
    text = "<think>I see 2 red circles.</think><answer>2</answer><|im_end|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text.removesuffix("<|im_end|>")
    raw = Tokenizer.from_file(str(toy_world / "hf/tokenizer.json"))  # what non-transformers loaders (vLLM) see
    for row in _load(toy_world / "data/test.parquet", tmp_path):  # unseen in training: still lossless
        ids = tok.encode(row["problem"], add_special_tokens=False)
        assert tok.decode(ids) == row["problem"] and raw.encode(row["problem"]).ids == ids

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        "<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n<|im_start|>assistant\n")
    plain = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                     {"role": "assistant", "content": "A"}], tokenize=False)
    assert plain == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
                     "<|im_start|>assistant\nA<|im_end|>\n")


def _prompt_inputs(hf_dir: Path, image: Image.Image, problem: str):
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    tok = AutoTokenizer.from_pretrained(hf_dir)
    vision = Qwen2VLImageProcessor.from_pretrained(hf_dir)(images=[image], return_tensors="pt")
    num_image_tokens = int(vision["image_grid_thw"].prod()) // 4  # merge_size 2 x 2
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": problem.removeprefix("<image>")}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * num_image_tokens)
    input_ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    mm_token_type_ids = (input_ids == tok.convert_tokens_to_ids("<|image_pad|>")).long()
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=mm_token_type_ids,
                pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])


def test_image_processor(toy_world):
    from transformers import Qwen2VLImageProcessor

    out = Qwen2VLImageProcessor.from_pretrained(toy_world / "hf")(images=[Image.new("RGB", (112, 112))],
                                                                  return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert tuple(out["pixel_values"].shape) == (64, 3 * 2 * 14 * 14)


def test_model_forward(toy_world, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    hf_dir = toy_world / "hf"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    assert vocab % 64 == 0 and len(tok) <= vocab < len(tok) + 64
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.text_config.eos_token_id == tok.eos_token_id and not cfg.tie_word_embeddings
    assert GenerationConfig.from_pretrained(hf_dir).eos_token_id[0] == tok.eos_token_id
    num_params = sum(p.numel() for p in model.parameters())
    assert 1e5 < num_params < 5e6, num_params

    row = _load(toy_world / "data/test.parquet", tmp_path)[0]
    inputs = _prompt_inputs(hf_dir, row["images"][0], row["problem"])
    assert int(inputs["mm_token_type_ids"].sum()) == 16
    with torch.no_grad():
        logits = model(**inputs).logits
        blank = model(**{**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], vocab) and torch.isfinite(logits).all()
    assert not torch.allclose(logits[0, -1], blank[0, -1])  # the picture reaches the text


def test_model_only_build_matches_the_world(toy_world, toy_hf):
    """build_toy_model (no datasets) writes the same hf/ files as build_toy_world."""
    assert _files(toy_hf) == {k.removeprefix("hf/"): v for k, v in _files(toy_world).items() if k.startswith("hf/")}

"""Tests for engine/data.py: loading, chat rendering, bad rows, batching, and a tiny Qwen2.5-VL forward.

The tokenizer is a byte-level BPE trained here on a few sentences plus the Qwen special tokens, saved next to
a Qwen2VLImageProcessor: a self-contained stand-in for a real model directory (no download).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from engine.data import (  # noqa: E402
    IGNORE_INDEX,
    BadRow,
    Processor,
    collate,
    encode_rows,
    epoch_order,
    load_rows,
    num_tokens,
    plan_micro_batches,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
SENTENCES = [
    "You are a helpful assistant.",
    "What is shown in the picture? Count the red squares.",
    "Think step by step inside <think> </think> tags, then give the final answer inside <answer> </answer> tags.",
    "The answer is 42 because two plus forty equals forty two.",
    "system user assistant",
    "abcdefghijklmnopqrstuvwxyz",
]
TEMPLATE = "{problem}\nThink step by step inside <think> </think> tags."
# Text-only Qwen2 template: prints a content list verbatim, so Processor must pick the VL one instead.
TEXT_ONLY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_model_dir(path, chat_template):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=chat_template
    )
    fast.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_vl"), VL_TEMPLATE)


@pytest.fixture(scope="module")
def proc(model_dir):
    return Processor.from_pretrained(model_dir)


def img(h=56, w=56, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def image_items(messages):
    return [c["type"] for c in messages[-1]["content"]]


# ---------------------------------------------------------------------------------------------------- loading


def test_load_parquet_jsonl_arrow(tmp_path):
    img(seed=1).save(tmp_path / "a.png")
    rows = [
        {"problem": "<image>What?", "answer": "1", "images": ["a.png"]},
        {"problem": "Hi", "answer": "2", "images": []},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = datasets.Dataset.from_dict({"problem": ["p"], "answer": ["a"], "images": [[img()]]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    cache = str(tmp_path / "cache")
    assert len(load_rows(tmp_path / "d.jsonl", cache_dir=cache)) == 2
    assert load_rows(tmp_path / "d.parquet", cache_dir=cache)[0]["problem"] == "p"
    assert len(load_rows(tmp_path / "saved")) == 1
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(tmp_path / "nope.parquet")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="x.csv"):
        load_rows(tmp_path / "x.csv")
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['response'\]"):
        load_rows(tmp_path / "d.jsonl", response_column="response", cache_dir=cache)


def test_hf_dataset_with_an_image_column_and_other_names(proc, tmp_path):
    # The shape of many Hugging Face datasets: one `image` (datasets Image feature) and `question` / `solution`.
    ds = datasets.Dataset.from_dict({"question": ["<image>How many?", "Count <image>"], "solution": ["3", "4"],
                                     "image": [img(seed=1), img(seed=2)]})
    ds = ds.cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    with pytest.raises(ValueError) as e:
        load_rows(tmp_path / "hf.parquet")
    assert "missing required column(s) ['problem', 'answer']" in str(e.value)
    assert 'data.columns = {problem = "question", answer = "solution"}' in str(e.value)

    rows = load_rows(tmp_path / "hf.parquet", columns={"problem": "question", "answer": "solution"})
    assert {"problem", "answer", "images"} <= set(rows.column_names)  # `image` read as `images`, one a row
    samples, report = encode_rows(rows, proc, source=str(tmp_path / "hf.parquet"))
    assert report.num_skipped == 0 and [s.image_grid_thw.shape[0] for s in samples] == [1, 1]
    assert [s.answer for s in samples] == ["3", "4"]


def test_column_mapping_errors_name_the_fix(tmp_path):
    datasets.Dataset.from_dict({"problem": ["p"], "answer": ["a"], "picture": [[]]}).to_parquet(
        str(tmp_path / "d.parquet"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['image'\] \(found: problem, answer, picture\)"):
        load_rows(tmp_path / "d.parquet", columns={"images": "image"})
    with pytest.raises(ValueError, match=r"\['pictures'\] are not our columns"):
        load_rows(tmp_path / "d.parquet", columns={"pictures": "picture"})
    rows = load_rows(tmp_path / "d.parquet", columns={"images": "picture", "problem": "problem"})
    assert rows.column_names == ["problem", "answer", "images"]


def test_placeholder_without_images_column_says_where_the_images_are(proc, tmp_path):
    rows = datasets.Dataset.from_dict({"problem": ["<image>What?"], "answer": ["1"], "img_bytes": [b"x"]})
    with pytest.raises(ValueError, match="no usable rows"):
        encode_rows(rows, proc)
    with pytest.raises(BadRow) as e:
        encode_rows(rows, proc, on_bad_row="error")
    assert "1 <image> for 0 images" in str(e.value)
    assert 'the data has no images column (found: problem, answer, img_bytes)' in str(e.value)
    assert 'data.columns = {images = "..."}' in str(e.value)


# ------------------------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("<image>What is this?", ["image", "text"]),
        ("Compare <image> and <image> please", ["text", "image", "text", "image", "text"]),
        ("What is this?", ["image", "image", "text"]),
        ("Left <image>", ["text", "image", "text"]),  # the template's suffix follows the last image
    ],
)
def test_placeholder_rules(proc, problem, expected):
    n = expected.count("image")
    messages = proc.build_messages(problem, n, TEMPLATE, system="sys")
    assert messages[0] == {"role": "system", "content": "sys"}
    assert image_items(messages) == expected
    text = "".join(c.get("text", "") for c in messages[-1]["content"])
    assert text == TEMPLATE.replace("{problem}", problem.replace("<image>", ""))


def test_placeholder_mismatch_and_empty(proc):
    with pytest.raises(BadRow, match="placeholder mismatch"):
        proc.build_messages("<image> and <image>", 1, TEMPLATE)
    with pytest.raises(BadRow, match="empty problem"):
        proc.build_messages(" <image> ", 1, TEMPLATE)


def test_picks_image_template_over_text_only(tmp_path):
    p = Processor.from_pretrained(make_model_dir(tmp_path, TEXT_ONLY_TEMPLATE))
    s = p.encode("What?", [img()])
    assert s.mm_token_type_ids.count(1) == 4  # fell back to the built-in VL template


def test_pixel_bounds_override(model_dir):
    big = img(224, 224)
    assert Processor.from_pretrained(model_dir).encode("x", [big]).image_grid_thw.tolist() == [[1, 8, 8]]
    small = Processor.from_pretrained(model_dir, max_pixels=56 * 56).encode("x", [big])
    assert small.image_grid_thw.tolist() == [[1, 4, 4]] and small.mm_token_type_ids.count(1) == 4
    with pytest.raises(ValueError, match="min_pixels"):
        Processor.from_pretrained(model_dir, min_pixels=10_000, max_pixels=5_000)


@pytest.mark.parametrize("size", [(56, 56), (112, 84), (40, 150)])
def test_encode_expansion_labels_types(proc, size):
    images = [img(*size), img(56, 56, seed=3).convert("L")]  # grayscale is converted to RGB
    s = proc.encode("A <image> B <image>", images, template=TEMPLATE, response="The answer is 42")
    grid = s.image_grid_thw
    assert grid.shape == (2, 3) and s.pixel_values.shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    assert s.input_ids.count(proc.image_token_id) == int(grid.prod(-1).sum()) // 4
    assert s.mm_token_type_ids == [int(t == proc.image_token_id) for t in s.input_ids]
    resp = proc.tokenizer("The answer is 42", add_special_tokens=False)["input_ids"] + [proc.end_of_turn_id]
    assert s.labels[: s.num_prompt_tokens] == [IGNORE_INDEX] * s.num_prompt_tokens
    assert s.labels[s.num_prompt_tokens :] == resp == s.input_ids[s.num_prompt_tokens :]
    assert s.input_ids[-1] == proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = proc.tokenizer.decode(s.input_ids[: s.num_prompt_tokens])
    assert prompt.endswith("<|im_start|>assistant\n") and "Think step by step" in prompt
    # prompt-only: no labels, same prompt ids
    p = proc.encode("A <image> B <image>", images, template=TEMPLATE)
    assert p.labels is None and p.input_ids == s.input_ids[: s.num_prompt_tokens]


# ---------------------------------------------------------------------------------------------------- bad rows


def bad_rows_dataset(tmp_path):
    """One good row, then one row per bad-row kind; returns (dataset, {row id: reason})."""
    good = png_bytes(img())
    img(seed=5).save(tmp_path / "ok.png")
    truncated = good[: len(good) // 2]
    rows = [  # (id, problem, images, response, reason)
        ("good", "<image>Count.", [{"bytes": good, "path": None}], "3", None),
        ("rel", "Count.", [{"bytes": None, "path": "ok.png"}], "3", None),
        ("corrupt", "<image>Count.", [{"bytes": b"not an image", "path": None}], "3", "corrupt image"),
        ("trunc", "Count.", [{"bytes": truncated, "path": None}], "3", "corrupt image"),
        ("gone", "Count.", [{"bytes": None, "path": "missing.png"}], "3", "image not found"),
        ("none", "Count.", [{"bytes": None, "path": None}], "3", "missing image"),
        ("mismatch", "<image> vs <image>", [{"bytes": good, "path": None}], "3", "placeholder mismatch"),
        ("empty", "  ", [], "3", "empty problem"),
        ("noresp", "Count.", [], "  ", "empty response"),
        ("long", "Count. " * 100, [], "3", "too long"),
    ]
    feats = datasets.Features(
        {
            "id": datasets.Value("string"),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "images": datasets.List(datasets.Image()),
            "response": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "id": [r[0] for r in rows],
            "problem": [r[1] for r in rows],
            "answer": ["3"] * len(rows),
            "images": [r[2] for r in rows],
            "response": [r[3] for r in rows],
        },
        features=feats,
    )
    return ds, {r[0]: r[4] for r in rows if r[4]}


def test_bad_rows_skipped_and_counted(proc, tmp_path, caplog):
    ds, bad = bad_rows_dataset(tmp_path)
    src = str(tmp_path / "train.parquet")
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        samples, rep = encode_rows(ds, proc, template=TEMPLATE, response_column="response", max_tokens=200, source=src)
    assert [s.row_id for s in samples] == ["good", "rel"] and samples[0].answer == "3"
    assert rep.num_rows == len(ds) and rep.num_skipped == len(bad) and rep.row_ids == list(bad)
    assert rep.by_reason == {
        "corrupt image": 2,
        "image not found": 1,
        "missing image": 1,
        "placeholder mismatch": 1,
        "empty problem": 1,
        "empty response": 1,
        "too long": 1,
    }
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert summary == [
        f"skipped 8 of 10 rows in {src}: 2 corrupt image, 1 image not found, 1 missing image, "
        "1 placeholder mismatch, 1 empty problem, 1 empty response, 1 too long"
    ]
    assert any("'corrupt'" in r.getMessage() for r in caplog.records)  # first row of each reason is named


@pytest.mark.parametrize("row_id", ["corrupt", "trunc", "gone", "none", "mismatch", "empty", "noresp", "long"])
def test_bad_row_error_names_row(proc, tmp_path, row_id):
    ds, bad = bad_rows_dataset(tmp_path)
    ds = ds.select([0, list(ds["id"]).index(row_id)])  # not .filter: it would decode (and choke on) the images
    with pytest.raises(BadRow) as e:
        encode_rows(
            ds,
            proc,
            template=TEMPLATE,
            response_column="response",
            on_bad_row="error",
            max_tokens=200,
            source="data/train.parquet",
        )
    assert e.value.row_id == row_id and e.value.reason == bad[row_id]
    msg = str(e.value)
    assert "data/train.parquet" in msg and repr(row_id) in msg and "data.on_bad_row = 'skip'" in msg


def test_encode_rows_from_path_default_ids(proc, tmp_path):
    img(seed=2).save(tmp_path / "a.png")
    rows = [
        {"problem": "<image>What?", "answer": "1", "images": ["a.png"], "choices": ["1", "2"]},
        {"problem": "Hi", "answer": "2", "images": ["b.png"], "choices": ["1", "2"]},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, rep = encode_rows(tmp_path / "d.jsonl", proc, template=TEMPLATE)
    assert [s.row_id for s in samples] == ["row-0"] and rep.row_ids == ["row-1"]
    assert samples[0].choices == ["1", "2"] and samples[0].labels is None


def test_pixels_past_the_budget_are_reencoded_on_demand(proc, tmp_path):
    """With a pixel budget, samples keep no pixel_values in memory; `pixels()` re-encodes the same patches from the
    files (relative to the data file), and collate/pack give the same batch as with everything kept."""
    from engine.packed_rows import pack_samples

    sub = tmp_path / "imgs"
    sub.mkdir()
    rows = []
    for i in range(5):
        img(h=56 + 28 * i, w=84, seed=10 + i).save(sub / f"{i}.png")
        rows.append({"id": f"r{i}", "problem": "<image>Count?", "answer": str(i), "images": [f"imgs/{i}.png"],
                     "response": f"There are {i}."})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    eager, _ = encode_rows(tmp_path / "d.jsonl", proc, template=TEMPLATE, response_column="response")
    lazy, _ = encode_rows(tmp_path / "d.jsonl", proc, template=TEMPLATE, response_column="response", max_pixel_bytes=0)
    assert all(s.pixel_values is not None for s in eager) and all(s.pixel_values is None for s in lazy)
    for a, b in zip(eager, lazy, strict=True):
        assert torch.equal(a.pixels(), b.pixels()) and torch.equal(a.image_grid_thw, b.image_grid_thw)
    for build in (lambda x: collate(x, proc.pad_id), lambda x: pack_samples(x, merge_size=proc.merge_size)):
        want, got = build(eager), build(lazy)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want if isinstance(want[k], torch.Tensor))
    some, _ = encode_rows(tmp_path / "d.jsonl", proc, template=TEMPLATE,
                          max_pixel_bytes=eager[0].pixel_values.numel() * 4 + 1)  # room for one image, not two
    assert [s.pixel_values is None for s in some] == [True] * 5  # past the budget, earlier samples drop theirs too


# --------------------------------------------------------------------------------------------------- batching


def test_plan_micro_batches_properties():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(1, 1000)
        groups = plan_micro_batches(lengths, budget)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert g and (len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget)
        assert groups == plan_micro_batches(lengths, budget)
    assert plan_micro_batches([5, 9, 3, 9], 18) == [[1, 3], [0, 2]]


def test_epoch_order():
    a = epoch_order(50, seed=1, epoch=0)
    assert sorted(a) == list(range(50)) and a == epoch_order(50, seed=1, epoch=0) != epoch_order(50, 1, 1)


def test_collate_padding(proc):
    s0 = proc.encode("<image>Count.", [img()], response="3")
    s1 = proc.encode("A much longer question about the red squares here?", [img(112, 112)], response="3 red")
    s2 = proc.encode("Text only.", [])
    batch = collate([s0, s1, s2], proc.pad_id)
    t = max(map(num_tokens, (s0, s1, s2)))
    assert batch["input_ids"].shape == (3, t)
    for i, s in enumerate((s0, s1, s2)):
        n = num_tokens(s)
        assert batch["input_ids"][i, :n].tolist() == s.input_ids
        assert (batch["input_ids"][i, n:] == proc.pad_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (t - n)
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and (batch["mm_token_type_ids"][i, n:] == 0).all()
    assert (batch["labels"][2] == IGNORE_INDEX).all()
    assert torch.equal(batch["pixel_values"], torch.cat([s0.pixel_values, s1.pixel_values]))
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 8]]
    assert "pixel_values" not in collate([s2], proc.pad_id)


def test_model_forward_padding_invariant(proc):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = proc.tokenizer
    ids = {k: tok.convert_tokens_to_ids(f"<|{k}|>") for k in ("image_pad", "vision_start", "vision_end")}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0]
        ),
        image_token_id=ids["image_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    s0 = proc.encode("<image>Count.", [img()], response="3")
    s1 = proc.encode("Compare <image> and <image> here please", [img(112, 112, 1), img(56, 112, 2)], response="5")
    with torch.no_grad():
        both = model(**collate([s0, s1], proc.pad_id), use_cache=False).logits
        alone = model(**collate([s0], proc.pad_id), use_cache=False).logits
    n = num_tokens(s0)
    assert torch.isfinite(both[:, :n]).all() and torch.isfinite(both[1]).all()
    assert (both[0, :n] - alone[0, :n]).abs().max().item() < 1e-5


def _sharded_worker(rank: int, port: int, path: str, model_dir: str, out_dir: str) -> None:
    """One of two gloo ranks: encode_rows sharded (the default under a process group), results to a file."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        proc = Processor.from_pretrained(model_dir)
        kw = dict(template=TEMPLATE, response_column="response", max_tokens=400)
        samples, rep = encode_rows(path, proc, **kw)
        result = {"samples": [_sample_fields(s) for s in samples],
                  "in_memory": [s.pixel_values is not None for s in samples],
                  "report": (rep.num_rows, rep.num_skipped, rep.row_ids, rep.by_reason)}
        try:
            encode_rows(path, proc, on_bad_row="error", **kw)
        except BadRow as e:
            result["error"] = (e.row_id, e.reason, str(e))
        if rank == 1:  # an unexpected error on one rank: both ranks raise instead of one waiting forever
            proc.encode = lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone"))
        try:
            encode_rows(path, proc, **kw)
        except (OSError, RuntimeError) as e:
            result["failure"] = f"{type(e).__name__}: {e}"
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _sample_fields(s):
    return (s.row_id, s.input_ids, s.labels, s.mm_token_type_ids, s.num_prompt_tokens, s.image_grid_thw, s.pixels(),
            s.answer, s.choices)


@pytest.mark.subprocess  # two spawned ranks: left out of make test-fast
def test_sharded_encoding_on_two_ranks_equals_one_process(proc, model_dir, tmp_path):
    """Under a 2-rank gloo group each rank encodes every other row and they exchange token ids: every rank ends with
    the one-process samples (pixels re-encoded on demand for the other rank's rows), the same bad-row report, and
    under on_bad_row="error" the same first bad row raised on both ranks (it is rank 1's row here); an unexpected
    error on one rank is raised on both."""
    import socket

    import torch.multiprocessing as mp

    (tmp_path / "imgs").mkdir()
    rows = []
    for i, row_id in enumerate(["r0", "gone", "r1", "r2", "empty", "r3", "noresp", "r4", "r5"]):
        image = f"imgs/{i}.png"
        if row_id != "gone":
            img(h=56 + 28 * (i % 3), w=84, seed=20 + i).save(tmp_path / image)
        rows.append({"id": row_id, "problem": "" if row_id == "empty" else f"<image>Count {i}?", "answer": str(i),
                     "images": [image], "response": "" if row_id == "noresp" else f"There are {i}.",
                     "choices": [str(i), "x"]})
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    want, rep = encode_rows(path, proc, template=TEMPLATE, response_column="response", max_tokens=400)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_sharded_worker, args=(port, str(path), str(model_dir), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["report"] == (rep.num_rows, rep.num_skipped, rep.row_ids, rep.by_reason)
        assert rep.row_ids == ["gone", "empty", "noresp"]
        assert len(got["samples"]) == len(want) == 6
        for a, b in zip(got["samples"], (_sample_fields(s) for s in want), strict=True):
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        # rows 0, 2, 4, ... were encoded here on rank 0, the others on rank 1 (they keep no pixels in memory)
        assert got["in_memory"] == [rows.index(r) % 2 == rank for r in rows if r["id"] not in rep.row_ids]
        assert got["error"][:2] == ("gone", "image not found") and "d.jsonl" in got["error"][2]
        assert got["failure"] == ("OSError: disk gone" if rank == 1 else
                                  f"RuntimeError: {path}: encoding failed on rank 1: OSError: disk gone")

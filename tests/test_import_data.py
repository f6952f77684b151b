"""engine/import_data.py on small fixtures written by hand in the real release layouts (no download).

The Orsta-Data-47k fixture follows the dataset card's `dataset_info.features`
(huggingface.co/datasets/One-RL-to-See-Them-All/Orsta-Data-47k, README.md: data_source, images (sequence of image),
prompt (list of {content, role}), ability, reward_model {answer, ground_truth, accuracy_ratio, format_ratio,
verifier, verifier_parm {det_verifier_normalized, det_reward_ratio {...}}}), its file layout (data/train-*.parquet),
the verl loader of MiniMax-AI/One-RL-to-See-Them-All (verl/utils/dataset/rl_dataset.py: `<image>` placeholders in
the last user message, images as {bytes}) and its verifiers (reward_server/verify.py: "mathverify", "detection",
a detection gold `<answer> [{'bbox_2d': [...], 'label': ...}] </answer>`). Row contents are invented.
"""

import io

import datasets
import pytest
from PIL import Image

from engine.data import Processor, encode_rows, load_rows
from engine.import_data import convert_hf, main, read_local
from engine.reward_judge import row_infos
from engine.rewards import answer_type

RATIO = datasets.Features({k: datasets.Value("float32") for k in ("iou_max_label_first", "iou_max_iou_first",
                                                                    "iou_completeness", "map", "map50", "map75")})
ORSTA_FEATURES = datasets.Features({
    "data_source": datasets.Value("string"),
    "images": datasets.Sequence(datasets.Image()),
    "prompt": [{"content": datasets.Value("string"), "role": datasets.Value("string")}],
    "ability": datasets.Value("string"),
    "reward_model": {"answer": datasets.Value("string"), "ground_truth": datasets.Value("string"),
                     "accuracy_ratio": datasets.Value("float32"), "format_ratio": datasets.Value("float32"),
                     "verifier": datasets.Value("string"),
                     "verifier_parm": {"det_verifier_normalized": datasets.Value("bool"), "det_reward_ratio": RATIO}},
})


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buf, format="PNG")
    return buf.getvalue()


def _row(source, ability, question, gold, verifier, n_images=1):
    zero = {k: 0.0 for k in RATIO}
    return {"data_source": source, "ability": ability,
            "images": [{"bytes": _png((40 * i, 80, 120)), "path": None} for i in range(n_images)],
            "prompt": [{"content": "<image>" * n_images + question, "role": "user"}],
            "reward_model": {"answer": gold, "ground_truth": gold, "accuracy_ratio": 1.0, "format_ratio": 1.0,
                             "verifier": verifier, "verifier_parm": {"det_verifier_normalized": True,
                                                                     "det_reward_ratio": zero}}}


@pytest.fixture
def orsta_dir(tmp_path):
    rows = [_row("chartqapro", "chart", "What is the highest value in the chart?", "42", "mathverify"),
            _row("mmk12", "math", "Which option is right? A. 1 B. 2 C. 3 D. 4", "B", "mathverify"),
            _row("ocr_textvqa", "ocr", "What word is on the sign?", "bakery", "mathverify"),
            _row("v3det", "detection", "Detect every dog.",
                 "<answer> [{'bbox_2d': [10, 12, 40, 44], 'label': 'dog'}] </answer>", "detection", 2)]
    (tmp_path / "orsta" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=ORSTA_FEATURES).to_parquet(
        str(tmp_path / "orsta" / "data" / "train-00000-of-00001.parquet"))
    return tmp_path / "orsta"


def test_orsta_release_converts_and_trains(orsta_dir, tmp_path, toy_world):
    out = tmp_path / "orsta.parquet"
    assert main(["orsta", str(orsta_dir), str(out)]) == 0
    rows = load_rows(str(out))
    assert rows["id"] == ["chartqapro-0", "mmk12-1", "ocr_textvqa-2", "v3det-3"]
    assert rows["data_source"] == ["chartqapro", "mmk12", "ocr_textvqa", "v3det"]
    assert rows["answer"][:3] == ["42", "B", "bakery"]
    assert rows["answer"][3] == "[{'bbox_2d': [10, 12, 40, 44], 'label': 'dog'}]"  # the <answer> wrapper is gone
    assert rows["answer_type"] == ["", "", "", "boxes"] and rows["ability"][3] == "detection"
    assert rows["problem"][1].startswith("<image>Which option")
    kinds = [answer_type(a, c, t) for a, c, t in zip(rows["answer"], rows["choices"], rows["answer_type"],
                                                      strict=True)]
    assert kinds == ["number", "choice", "open", "boxes"]  # the OCR word goes to the judge, boxes to IoU
    assert row_infos(rows)["v3det-3"].data_source == "v3det"
    # the training pipeline reads the converted rows: images decoded, placeholders matched
    processor = Processor.from_pretrained(toy_world / "hf")
    samples, report = encode_rows(rows, processor, on_bad_row="error", source=str(out))
    assert len(samples) == 4 and report.num_skipped == 0
    assert samples[3].image_grid_thw.shape[0] == 2 and samples[1].answer == "B"


def test_orsta_bad_input_is_named(tmp_path, orsta_dir):
    rows = read_local(str(orsta_dir)).remove_columns(["reward_model"])
    rows.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['reward_model'\]"):
        main(["orsta", str(tmp_path / "bad.parquet"), str(tmp_path / "out.parquet")])
    assert not (tmp_path / "out.parquet").exists()
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        main(["orsta", str(tmp_path / "nope"), str(tmp_path / "out.parquet")])


def test_generic_hf_dataset_with_column_mapping(tmp_path, toy_world):
    src = datasets.Dataset.from_dict({
        "uid": ["a", "b"], "question": ["<image>How many?", "<image>Name the animal."], "solution": ["3", "a cat"],
        "image": [{"bytes": _png((200, 0, 0)), "path": None}, {"bytes": _png((0, 200, 0)), "path": None}],
        "task": ["count", "vqa"], "noise": [1, 2]}).cast_column("image", datasets.Image())
    src.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "hf.parquet"
    assert main(["hf", str(tmp_path / "ds"), str(out), "--problem", "question", "--answer", "solution",
                 "--images", "image", "--id", "uid", "--data-source", "task"]) == 0
    rows = load_rows(str(out))
    assert set(rows.column_names) == {"id", "problem", "answer", "images", "choices", "answer_type", "data_source"}
    assert rows["id"] == ["a", "b"] and rows["data_source"] == ["count", "vqa"] and rows["answer"] == ["3", "a cat"]
    samples, _ = encode_rows(rows, Processor.from_pretrained(toy_world / "hf"), on_bad_row="error")
    assert len(samples) == 2 and samples[0].image_grid_thw.shape[0] == 1
    with pytest.raises(ValueError, match=r"missing column\(s\) \['answer_col'\]"):
        convert_hf(src, {"problem": "question", "answer": "answer_col"})
    with pytest.raises(ValueError, match="--answer is required"):
        convert_hf(src, {"problem": "question"})

"""MMMU: loading the HF parquet layout (embedded images), the official prompt, the official parsers, and the
official per-subject accuracies of the shipped LLaVA-1.5-13B outputs (tests/fixtures/benchmarks/mmmu/SOURCE.md)."""

import io
import json
import os
import random
from pathlib import Path

import pytest
from PIL import Image

from engine.benchmarks import BenchRow, mmmu

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "benchmarks" / "mmmu"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "mmmu"

# Correct answers out of 30 per subject, from the official main_parse_and_eval.py on the shipped outputs.
OFFICIAL_CORRECT = {
    "Accounting": 8, "Agriculture": 15, "Architecture_and_Engineering": 10, "Art": 18, "Art_Theory": 16,
    "Basic_Medical_Science": 15, "Biology": 7, "Chemistry": 6, "Clinical_Medicine": 12, "Computer_Science": 6,
    "Design": 18, "Diagnostics_and_Laboratory_Medicine": 11, "Economics": 7, "Electronics": 6, "Energy_and_Power": 11,
    "Finance": 4, "Geography": 12, "History": 17, "Literature": 22, "Manage": 10, "Marketing": 5, "Materials": 12,
    "Math": 10, "Mechanical_Engineering": 5, "Music": 11, "Pharmacy": 8, "Physics": 9, "Psychology": 11,
    "Public_Health": 12, "Sociology": 16,
}  # fmt: skip


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(root: Path, records: list[dict]) -> Path:
    """The HF layout: <root>/<Subject>/validation-00000-of-00001.parquet, images as {bytes, path} structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    by_subject: dict[str, list[dict]] = {}
    for i, rec in enumerate(records):
        rec = dict(rec)
        for k in range(1, 8):
            name = rec[f"image_{k}"]
            rec[f"image_{k}"] = {"bytes": _png((i * 20 % 256, k * 30, 90)), "path": name} if name else None
        by_subject.setdefault("_".join(rec["id"].split("_")[1:-1]), []).append(rec)
    for subject, recs in by_subject.items():
        columns = list(recs[0])
        schema = pa.schema([(c, image_type if c.startswith("image_") else pa.string()) for c in columns])
        (root / subject).mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(recs, schema=schema)
        pq.write_table(table, root / subject / "validation-00000-of-00001.parquet")
    return root


def _hf_records() -> list[dict]:
    return json.loads((FIXTURES / "hf_validation_rows.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return _write_parquet(tmp_path_factory.mktemp("mmmu"), _hf_records())


@pytest.fixture(scope="module")
def rows(release) -> dict[str, BenchRow]:
    return {r.id: r for r in mmmu.load(release)}


# ---------------------------------------------------------------- loading
def test_load_rows_and_categories(rows):
    recs = _hf_records()
    assert sorted(rows) == sorted(r["id"] for r in recs) and len(rows) == 13
    for rec in recs:
        row = rows[rec["id"]]
        subject = "_".join(rec["id"].split("_")[1:-1])
        assert row.category == subject and row.meta["discipline"] == mmmu.SUBJECT_DISCIPLINE[subject]
        assert row.meta["subfield"] == rec["subfield"] and row.meta["question_type"] == rec["question_type"]
        assert row.problem.count("<image>") == len(row.images) or "<image>" not in row.problem
        assert all(p.is_file() and p.parent.name == "_images" for p in row.images)
    assert {r.meta["discipline"] for r in rows.values()} == set(mmmu.DISCIPLINES)


def test_multiple_choice_prompt(rows):
    # Official prompt: question, newline, "(A) text" lines; the answer-style instruction is left out by default.
    row = rows["validation_Design_4"]
    assert row.problem == (
        "Who designed the tea service shown in <image>?\n"
        "(A) Josef Albers\n(B) George Eastman\n(C) Gosnell Hall\n(D) Tea Server 1925"
    )
    assert row.choices == ["Josef Albers", "George Eastman", "Gosnell Hall", "Tea Server 1925"]
    assert row.answer == "A" and row.meta["golds"] == ["A"]
    assert rows["validation_Chemistry_16"].problem.endswith("(I) T-shape")


def test_prompt_with_official_instruction(release):
    rows = {r.id: r for r in mmmu.load(release, with_instruction=True)}
    assert rows["validation_Music_2"].problem.endswith(
        "\n(A) True\n(B) False\n\nAnswer with the option's letter from the given choices directly."
    )
    assert rows["validation_Finance_20"].problem.endswith(
        "in dollars?\nAnswer the question using a single word or phrase."
    )


def test_images_interleave_in_marker_order(release, rows):
    images = release / "_images"
    # Question marker <image 6> first, then the options' <image 1>..<image 5>.
    psy = rows["validation_Psychology_1"]
    assert psy.problem.startswith("<image> Which") and "(A) <image>\n(B) <image>" in psy.problem
    assert [p.name for p in psy.images] == [f"validation_Psychology_1_{k}.png" for k in (6, 1, 2, 3, 4, 5)]
    # A marker used twice repeats its image.
    music = rows["validation_Music_2"]
    assert music.problem.startswith("Look at <image>. The interval marked in <image> is")
    assert music.images == [images / "validation_Music_2_1.png"] * 2
    # No marker at all: every image goes before the text.
    chem = rows["validation_Chemistry_16"]
    assert "<image>" not in chem.problem and chem.images == [images / "validation_Chemistry_16_1.png"]
    assert [p.name for p in rows["validation_Electronics_29"].images] == [
        "validation_Electronics_29_1.png", "validation_Electronics_29_2.png",
    ]  # fmt: skip
    # The bytes are the embedded ones, written once and reused.
    assert Image.open(chem.images[0]).size == (4, 4)
    mtime = chem.images[0].stat().st_mtime_ns
    mmmu.load(release)
    assert chem.images[0].stat().st_mtime_ns == mtime


def test_open_golds(rows):
    # The HF answer holds a Python list for three open questions: every element is a gold.
    assert rows["validation_Chemistry_30"].meta["golds"] == ["$MgS$", "MgS"]
    assert rows["validation_Finance_20"].meta["golds"] == ["7243000"] and rows["validation_Finance_20"].choices is None


def test_read_only_release_extracts_to_the_cache(release, rows, tmp_path, monkeypatch):
    """A release on a read-only mount: the images go to $XDG_CACHE_HOME/specs-engine/mmmu/<key>, same rows."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: not str(p).startswith(str(release)) and real_access(p, mode))
    got = mmmu.load(release)
    cache = mmmu.image_cache_dir(release)
    assert cache.is_relative_to(tmp_path / "cache")
    assert [r.id for r in got] == list(rows) and sum(len(r.images) for r in got) > 0
    for row in got:
        assert all(Path(p).parent == cache for p in row.images)
        assert [Path(p).read_bytes() for p in row.images] == [Path(p).read_bytes() for p in rows[row.id].images]
        assert row.problem == rows[row.id].problem


def test_missing_files_and_images(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no validation-\*\.parquet.*MMMU/MMMU"):
        mmmu.load(tmp_path)
    recs = _hf_records()
    for rec in recs:
        if rec["id"] in ("validation_Psychology_1", "validation_Electronics_29"):
            rec["image_2"] = None
    with pytest.raises(ValueError, match=r"2 image markers name an empty image column.*<image 2>"):
        mmmu.load(_write_parquet(tmp_path / "broken", recs))


def test_duplicate_ids_are_rejected(tmp_path):
    recs = _hf_records()[:2]
    _write_parquet(tmp_path / "a", recs)
    _write_parquet(tmp_path / "a" / "copy", recs)
    with pytest.raises(ValueError, match="appears twice"):
        mmmu.load(tmp_path / "a")


# ---------------------------------------------------------------- scoring
MC_CASES = [
    # (row id, response, correct); gold of Design_4 is A, of Psychology_4 is B.
    ("validation_Design_4", "A", True),
    ("validation_Design_4", "<think>Albers taught at the Bauhaus.</think><answer>A</answer>", True),
    ("validation_Design_4", "<answer>(B)</answer>", False),
    ("validation_Design_4", "The answer is (A).", True),  # "(X)" first
    ("validation_Design_4", "(B) is wrong, (A) is right", True),  # several: the latest mention wins
    ("validation_Design_4", "B or A?", True),  # bare letters: the latest " X " wins
    ("validation_Design_4", "A.", True),  # trailing punctuation is stripped
    ("validation_Design_4", "I am sure it was designed by Josef Albers himself", True),  # > 5 words: option text
    ("validation_Design_4", "Josef Albers", True),  # <= 5 words, nothing parses: random guess = A (seed 42)
    ("validation_Psychology_4", "C) Schachter-Singer Theory", False),  # official guess: A, gold B
    ("validation_Psychology_4", "<answer>Cannon-Bard Theory</answer>", False),  # short: random A, not text
    ("validation_Psychology_4", "This is clearly the Cannon-Bard Theory of emotion", True),
    ("validation_Music_2", "<answer>A</answer>", True),
    ("validation_Music_2", "a", True),  # letters are case-sensitive: nothing parses, the guess for 2 options is A
]


@pytest.mark.parametrize(("row_id", "response", "correct"), MC_CASES)
def test_multiple_choice_cases(rows, row_id, response, correct):
    assert mmmu.is_correct(rows[row_id], response) is correct


def test_random_guess_is_the_official_first_draw(rows):
    # Official: random.seed(42) once at import, random.choice(all_choices) per unparsed response. A fresh
    # Random(42) per response gives the first draw every time: 4 options -> A, 3 -> C, 6 -> F.
    for n, letter in ((2, "A"), (3, "C"), (4, "A"), (5, "A"), (6, "F")):
        letters = [chr(ord("A") + i) for i in range(n)]
        assert mmmu.parse_multi_choice_response("??", letters, dict.fromkeys(letters, "x")) == letter
    # A shared generator replays the official stream: the 1st and 2nd draws for 4 options are A, A; the 3rd is C.
    rng = random.Random(42)
    assert [mmmu.parse_multi_choice_response("", list("ABCD"), {}, rng) for _ in range(3)] == ["A", "A", "C"]


OPEN_CASES = [
    ("validation_Finance_20", "7243000", True),
    ("validation_Finance_20", "<answer>$7,243,000</answer>", True),  # comma-grouped numbers
    ("validation_Finance_20", "The NPV is 7243000.004 dollars", True),  # numbers rounded to 2 decimals
    ("validation_Finance_20", "20,000,000", False),
    ("validation_Finance_20", "7243000 is my first guess\nfinal answer 1", False),  # only text after key phrases
    ("validation_Chemistry_30", "The product is MgS.", True),  # substring of a list gold
    ("validation_Chemistry_30", "Mx", False),
    ("validation_Geography_4", "It is Tampa, Florida", True),
    ("validation_Geography_4", "Beach", False),
    ("validation_Math_15", "The speed is 3.429 ft/s", True),
    ("validation_Math_15", "The speed is 24/7 ft/s", True),  # "24/7" is a string gold contained in the tail
    ("validation_Math_15", "3.43", True),  # the gold 3.429 is rounded to 2 decimals too
    ("validation_Electronics_29", "30", True),
    ("validation_Electronics_29", "36 watts", False),
    ("validation_Electronics_29", "P = 30 W", True),  # "=" counts in the last sentence
]


@pytest.mark.parametrize(("row_id", "response", "correct"), OPEN_CASES)
def test_open_cases(rows, row_id, response, correct):
    assert mmmu.is_correct(rows[row_id], response) is correct


def test_open_parser_quirks():
    # The ". " sentence split needs a capital letter after it, but the text is lower-cased first: never splits.
    assert "5. then 6" in mmmu.parse_open_response("So it is 5. Then 6")
    # The shortest tail after any key phrase; its numbers are candidates too.
    assert set(mmmu.parse_open_response("Thus the area is 12.345 m")) == {"12.345 m", 12.35}
    # A single character is padded so it only matches as a word.
    assert sorted(mmmu.parse_open_response("x")) == [" x", "x "]
    assert not mmmu.eval_open(["a"], mmmu.parse_open_response("banana"))


# ---------------------------------------------------------------- the shipped LLaVA-1.5-13B outputs
def _output_rows(root: Path) -> list[tuple[BenchRow, str]]:
    """(row, response) for every entry of <root>/<Subject>/output.json, rows built from the fields it carries."""
    out = []
    for file in sorted(root.glob("*/output.json")):
        for entry in json.loads(file.read_text(encoding="utf-8")):
            mc = entry["question_type"] == "multiple-choice"
            rec = {
                "id": entry["id"], "question": "", "question_type": entry["question_type"], "answer": entry["answer"],
                "options": str(list(entry["index2ans"].values())) if mc else "[]",
            }  # fmt: skip
            out.append((mmmu.build_row(rec, {})[0], entry["response"]))
    return out


def _check_official_accuracies(root: Path, subjects: list[str]):
    pairs = _output_rows(root)
    correct = {row.id: mmmu.is_correct(row, response) for row, response in pairs}
    report = mmmu.accuracy_report([row for row, _ in pairs], correct)
    for subject in subjects:
        assert report[subject] == pytest.approx(OFFICIAL_CORRECT[subject] / 30), subject
    assert report["Overall"] == pytest.approx(sum(OFFICIAL_CORRECT[s] for s in subjects) / (30 * len(subjects)))
    # main_eval_only.py's input holds the official parsed letter of every multiple-choice response.
    predictions = json.loads((root / "total_val_output.json").read_text(encoding="utf-8"))
    for row, response in pairs:
        if row.choices is not None:
            letters = [chr(ord("A") + i) for i in range(len(row.choices))]
            index2ans = dict(zip(letters, row.choices, strict=True))
            assert mmmu.parse_multi_choice_response(response, letters, index2ans) == predictions[row.id], row.id
    return report


def test_llava_outputs_reproduce_official_accuracies():
    subjects = ["Chemistry", "Design", "Electronics", "Finance", "Geography", "Math", "Psychology"]
    report = _check_official_accuracies(FIXTURES / "llava1.5_13b", subjects)
    assert report["Overall-Science"] == pytest.approx((6 + 12 + 10) / 90)


@pytest.mark.skipif(not SHARED.exists(), reason="needs the shared benchmark files")
def test_full_llava_outputs_reproduce_official_accuracies():
    report = _check_official_accuracies(SHARED / "example_outputs" / "llava1.5_13b", list(OFFICIAL_CORRECT))
    assert round(report["Overall"], 3) == 0.367  # the official printed overall: 330 / 900
    # The official answer key agrees with the golds the outputs carry.
    key = json.loads((SHARED / "answer_dict_val.json").read_text(encoding="utf-8"))
    assert len(key) == 900
    for row, _ in _output_rows(SHARED / "example_outputs" / "llava1.5_13b"):
        gold = key[row.id]["ground_truth"]
        assert row.meta["golds"] == (gold if isinstance(gold, list) else [gold])

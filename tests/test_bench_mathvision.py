"""MATH-V: loading the release layout, the official answer extraction and comparison, and the official verdicts
of the repository's committed model outputs (tests/fixtures/benchmarks/mathvision/SOURCE.md)."""

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from engine.benchmarks import BenchRow, answer_text, mathvision

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "benchmarks" / "mathvision"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "mathvision"


def _records(file: Path) -> list[dict]:
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def _release(root: Path, src: Path = FIXTURES, splits=("testmini", "test")) -> Path:
    """Copy the annotation files into `root` and write a placeholder figure at every row's `image` path."""
    root.mkdir(parents=True, exist_ok=True)
    jpg = root / "_placeholder.jpg"
    Image.new("RGB", (4, 4), (200, 30, 30)).save(jpg)
    for split in splits:
        shutil.copy(src / f"{split}.jsonl", root / f"{split}.jsonl")
        for rec in _records(src / f"{split}.jsonl"):
            (root / rec["image"]).parent.mkdir(parents=True, exist_ok=True)
            if not (root / rec["image"]).exists():
                os.link(jpg, root / rec["image"])  # one placeholder file, many names: fast for 3040 rows
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return _release(tmp_path_factory.mktemp("mathvision"))


@pytest.fixture(scope="module")
def rows(release) -> dict[str, BenchRow]:
    return {r.id: r for r in mathvision.load(release, split="test")}


# ---------------------------------------------------------------- loading
def test_load_testmini_is_the_default(release):
    rows = mathvision.load(release)
    recs = _records(FIXTURES / "testmini.jsonl")
    assert [r.id for r in rows] == [rec["id"] for rec in recs] and len(rows) == 33
    assert {r.category for r in rows} == {rec["subject"] for rec in recs} and len({r.category for r in rows}) == 16
    for row, rec in zip(rows, recs, strict=True):
        assert row.images == [release / f"images/{rec['id']}.jpg"] and row.images[0].is_file()
        assert row.answer == rec["answer"] and row.meta == {"level": rec["level"]}
        assert row.problem.startswith(rec["question"]) and "<image>" not in row.problem
        assert row.choices == (rec["options"] or None)


def test_load_test_split(release):
    assert [r.id for r in mathvision.load(release, split="test")] == [
        rec["id"] for rec in _records(FIXTURES / "test.jsonl")
    ]


def test_problem_lists_text_options_but_not_bare_letters(rows):
    # Official prompt (process_example_mergedimg): "(A) text" lines, skipped when the options are just A-E.
    assert rows["39"].problem.endswith(
        "\n(A) red\n(B) blue\n(C) green\n(D) Yellow\n(E) This cannot be worked out for certain."
    )
    assert rows["26"].choices == list("ABCDE") and "(A)" not in rows["26"].problem
    assert rows["5"].problem == "Which number do you have to write in the last daisy?\n<image1>"
    # Literal <imageN> labels name parts of the single merged figure: no <image> placeholder (image goes first).
    assert "(A) <image1>\n(B) <image2>" in rows["2673"].problem and len(rows["2673"].images) == 1


def test_missing_file_and_bad_split(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"testmini\.jsonl.*mathllm/MATH-V"):
        mathvision.load(tmp_path)
    with pytest.raises(ValueError, match="split='val'"):
        mathvision.load(tmp_path, split="val")


def test_missing_images_are_counted(tmp_path):
    root = _release(tmp_path / "r", splits=("testmini",))
    for name in ("4", "5", "23"):
        (root / f"images/{name}.jpg").unlink()
    with pytest.raises(ValueError, match=r"3 of 33 image files are missing.*images/4\.jpg"):
        mathvision.load(root)


# ---------------------------------------------------------------- scoring
# (row id, response, extracted answer, correct). Expected values checked against the official evaluate.py run
# with the original latex2sympy2 1.9.1.
CASES = [
    # "... is <number>." -> the number.
    ("5", "The answer is 61.", "61", True),
    ("5", "<think>count</think><answer>61</answer>", "61", True),
    ("5", "<answer>60</answer> ... <answer>61</answer>", "61", True),  # the last <answer> block
    ("5", "<answer>\\boxed{61}</answer>", "61", True),
    ("5", "61\n", "61", True),
    ("5", "So x = 61", "61", True),  # find_math_answer keeps what follows the last "="
    ("5", "First \\boxed{60}, no: \\boxed{61}", "61", True),  # several boxes: the last one
    # Quirk: the text after "The answer is" keeps its words (spaces removed) and no longer parses.
    ("5", "The answer is 61 daisies.", "61daisies", False),
    ("5", "I think it is 61 or 62", "ithinkitis61or62", False),
    ("5", "", "", False),
    # Numbers and LaTeX compare by value rounded to 2 decimals.
    ("250", "\\boxed{4.80}", "4.80", True),
    ("250", "\\boxed{\\frac{24}{5}}", "\\frac{24}{5}", True),
    ("250", "\\boxed{24/5}", "\\frac{24}{5}", True),  # integer a/b becomes \frac{a}{b}
    ("250", "\\boxed{4.799}", "4.799", True),  # quirk: 4.799 rounds to 4.8
    ("250", "\\boxed{4.81}", "4.81", False),
    ("250", "\\boxed{4.8 \\text{ units}}", "4.8", True),  # \text and "units" are deleted
    # Quirk: one \boxed greedily extends to the last "}"; the official parser reads the valid prefix.
    ("250", "$\\boxed{\\frac{24}{5}}$.The answer is: \\frac{24}{5}", "\\frac{24}{5}}.theansweris:\\frac{24}{5", True),
    # Tuples: element-wise values; the original parser reads 3.0 as the rational 3.
    ("2955", "\\boxed{(3, -4)}", "(3,-4)", True),
    ("2955", "\\boxed{(3.0,-4)}", "(3.0,-4)", True),
    ("2955", "<answer>(3,-4)</answer>", "(3,-4)", True),
    # Free-form row whose answer is a letter; "The correct answer is" phrase, cut at ". ".
    ("59", "C", "c", True),
    ("59", "The correct answer is C. It matches.", "c", True),
    # Multiple choice: the letter or the option text.
    ("39", "Red", "red", True),
    ("39", "Counting cubes, so the answer is A.", "a", True),  # ends with " A."
    ("39", "(A)\nBecause the cube on top is red.", "a", True),  # starts with "(A)\n"
    ("39", "<answer>A</answer>", "a", True),
    ("39", "<answer>B</answer>", "b", False),
    ("39", "The answer is (A) red.", "ared", False),  # quirk: "(a)" -> "a" glues letter and text
    ("173", "\\boxed{E}", "e", True),
    ("173", "\\boxed{(E)}", "e", True),
    ("173", "\\boxed{6\\sqrt{2}-6}", "6\\sqrt{2}-6", True),  # equals the option $6(\sqrt{2}-1)$ by value
    ("206", "\\boxed{0.5}", "\\frac{1}{2}", True),  # "0.5" is rewritten as \frac{1}{2}
    ("206", "\\boxed{1/2}", "\\frac{1}{2}", True),
    ("164", "154", "154", True),
    ("164", "\\boxed{154.0}", "154.0", True),
    ("26", "The answer is B", "b", True),
    # Quirks: options with degrees, percent or units never match by value (the official parser rejects them).
    ("183", "\\boxed{120}", "120", False),
    ("183", "\\boxed{120^\\circ}", "120", False),
    ("183", "<answer>D</answer>", "d", True),
    ("336", "\\boxed{13\\%}", "13", False),
    ("180", "\\boxed{600}", "600", False),
]


@pytest.mark.parametrize(("row_id", "response", "extracted", "correct"), CASES)
def test_is_correct_cases(rows, row_id, response, extracted, correct):
    assert mathvision.extract_answer(answer_text(response)) == extracted
    assert mathvision.is_correct(rows[row_id], response) is correct


def test_is_equal_value_rules():
    assert mathvision.is_equal("$1: 2$", "\\frac{1}{2}")  # ratios are divisions
    assert mathvision.is_equal("$12\\frac{1}{2}$", "6")  # the original multiplies: 12 * 1/2, not a mixed number
    assert not mathvision.is_equal("$12\\frac{1}{2}$", "12.5")
    assert mathvision.is_equal("{18}", "18")  # braces group
    assert mathvision.is_equal("10,404", "10404")  # thousands commas
    assert mathvision.is_equal("$\\frac{3^{1008}-1}{3^{1009}}$", "\\frac{1}{3}")  # equal after rounding
    assert not mathvision.is_equal("e", "2.72")  # sympy's E is not a name the official eval knows
    assert not mathvision.is_equal("$\\boxed{3}$", "3")


def test_official_outputs_reproduce_the_official_verdicts(rows):
    # Each row's `correct` is the verdict the official evaluate.py wrote into the repository's outputs.
    outputs = _records(FIXTURES / "official_outputs.jsonl")
    assert len(outputs) == 41
    for out in outputs:
        assert mathvision.extract_answer(out["response"]) == out["model_answer"], out["id"]
        assert mathvision.is_correct(rows[out["id"]], out["response"]) is out["correct"], (out["file"], out["id"])


@pytest.mark.skipif(not SHARED.exists(), reason="needs the shared benchmark files")
def test_full_files_load(tmp_path):
    root = _release(tmp_path / "full", src=SHARED)
    test = {r.id: r for r in mathvision.load(root, split="test")}
    mini = mathvision.load(root)
    assert len(test) == 3040 and len(mini) == 304 and len({r.category for r in test.values()}) == 16
    for row in mini:  # testmini rows are the test rows with the same id
        assert row == test[row.id]
    mc = [r for r in test.values() if r.choices]
    assert len(mc) == 1532 and all(r.answer in "ABCDE" for r in mc)

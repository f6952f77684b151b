"""engine/benchmarks/mathvista.py: loading the release layout, calculate_score.py's normalisation checked against the
repository's stored verdicts, and the rules that stand in for the GPT-4 extractor."""

import json
import shutil
from pathlib import Path

import pytest

from engine import benchmarks
from engine.benchmarks import mathvista as mv

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests/fixtures/benchmarks/mathvista"
SHARED = REPO.parent / "shared/benchmarks/mathvista"  # the full testmini, where this checkout has it
OFFICIAL = json.loads((FIXTURE / "official_extractions.json").read_text(encoding="utf-8"))
# The repository's published testmini scores of the two stored result files.
PUBLISHED = {"bard": 348, "gpt4": 261}
# Options written "(a)".."(e)": the official letter rule reads the gold "(b)" itself as option B.
LETTER_QUIRK = {"168", "849"}


@pytest.fixture(scope="module")
def rows() -> dict[str, benchmarks.BenchRow]:
    return {r.id: r for r in mv.load(FIXTURE)}


def w(answer: str) -> str:
    return f"<think>Let me read the figure.</think>\n<answer>{answer}</answer>"


def test_interface():
    assert benchmarks.get("mathvista") is mv
    assert mv.NAME == "mathvista" and "GPT-4" in mv.JUDGE_NOTE
    assert not hasattr(mv, "score")  # engine/stages/eval.py would read it as the partial-credit scorer


# ---------------------------------------------------------------- loading
def test_load_fixture(rows):
    raw = json.loads((FIXTURE / "testmini.json").read_text(encoding="utf-8"))
    queries = json.loads((FIXTURE / "query_testmini.json").read_text(encoding="utf-8"))
    assert list(rows) == list(raw)  # file order, official pids
    for pid, r in rows.items():
        assert r.problem == queries[pid]
        assert r.answer == raw[pid]["answer"]
        assert r.category == raw[pid]["metadata"]["task"]
        assert r.choices == raw[pid]["choices"]
        assert r.images == [FIXTURE / f"images/{pid}.jpg"]
        for key in ("question_type", "answer_type", "precision", "unit", "skills", "grade", "context", "source"):
            assert key in r.meta
        json.dumps(r.meta)  # JSON-serialisable
    assert rows["1"].meta["precision"] == 1 and rows["108"].meta["precision"] == 2
    assert rows["5"].problem.endswith("Choices:\n(A) 97\n(B) 102\n(C) 107\n(D) 122")
    assert rows["3"].meta["language"] == "chinese"
    assert {r.category for r in rows.values()} == {
        "figure question answering",
        "geometry problem solving",
        "math word problem",
        "textbook question answering",
        "visual question answering",
    }


def test_load_file_path_and_query_json(tmp_path):
    shutil.copy(FIXTURE / "testmini.json", tmp_path / "testmini.json")
    shutil.copy(FIXTURE / "query_testmini.json", tmp_path / "query.json")  # the repository's name
    assert [r.id for r in mv.load(tmp_path / "testmini.json")] == [r.id for r in mv.load(FIXTURE)]


def test_load_hf_style_rows(tmp_path):
    """Rows with their own `query` and a float precision (the HF release) need no query file."""
    raw = json.loads((FIXTURE / "testmini.json").read_text(encoding="utf-8"))
    queries = json.loads((FIXTURE / "query_testmini.json").read_text(encoding="utf-8"))
    for pid, item in raw.items():
        item["query"] = queries[pid]
        if item["precision"] is not None:
            item["precision"] = float(item["precision"])
    (tmp_path / "testmini.json").write_text(json.dumps(raw), encoding="utf-8")
    loaded = {r.id: r for r in mv.load(tmp_path)}
    assert loaded["108"].meta["precision"] == 2
    assert mv.is_correct(loaded["108"], w("51.04"))


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="testmini.json not found"):
        mv.load(tmp_path)
    raw = json.loads((FIXTURE / "testmini.json").read_text(encoding="utf-8"))
    raw["5"]["question_type"] = "multiple"
    raw["1"]["precision"] = None
    (tmp_path / "testmini.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ValueError, match="no query"):  # no query file, no query field
        mv.load(tmp_path)
    shutil.copy(FIXTURE / "query_testmini.json", tmp_path)
    with pytest.raises(ValueError, match=r"2 problems(.|\n)*pid 1: float row without precision(.|\n)*pid 5"):
        mv.load(tmp_path)


# ---------------------------------------------------------------- calculate_score.py's normalisation
def _verdict(row, extraction) -> bool:
    m = row.meta
    pred = mv.normalize_extracted_answer(extraction, row.choices, m["question_type"], m["answer_type"], m["precision"])
    return pred is not None and pred == row.answer


@pytest.mark.parametrize("model", ["bard", "gpt4"])
def test_official_verdicts_fixture_rows(rows, model):
    """GPT-4's stored extractions, normalised and compared by our code, give the stored verdicts."""
    for pid, row in rows.items():
        extraction, true_false = OFFICIAL[model][pid]
        assert _verdict(row, extraction) == true_false, (model, pid, extraction)


@pytest.mark.skipif(not (SHARED / "testmini.json").is_file(), reason="full MathVista testmini not in this checkout")
@pytest.mark.parametrize("model", ["bard", "gpt4"])
def test_official_verdicts_all_testmini(model):
    """All 1000 stored verdicts, hence the published scores (Bard 348, GPT-4 261), are reproduced."""
    rows = mv.load(SHARED)
    assert len(rows) == 1000
    verdicts = {r.id: _verdict(r, OFFICIAL[model][r.id][0]) for r in rows}
    assert verdicts == {pid: tf for pid, (_, tf) in OFFICIAL[model].items()}
    assert sum(verdicts.values()) == PUBLISHED[model]


MC4 = ["\\frac{4}{3}", "0.75", "0.6", "0.8"]


@pytest.mark.parametrize(
    "extraction, choices, qt, at, precision, want",
    [
        # multiple choice: letters, "(x)" anywhere, otherwise the nearest option by edit distance
        ("B", ["Yes", "No"], "multi_choice", "text", None, "No"),
        (" (b) because ", ["Yes", "No"], "multi_choice", "text", None, "No"),
        ("", ["Yes", "No"], "multi_choice", "text", None, "No"),  # empty still maps to an option
        ("c", ["3", "4", "5"], "multi_choice", "text", None, "3"),  # lowercase bare letter is not a letter
        ("C.", ["3", "4", "5"], "multi_choice", "text", None, "3"),
        ("E", ["3", "4", "5"], "multi_choice", "text", None, "3"),  # a letter past the options
        ("3/4", MC4, "multi_choice", "text", None, "0.6"),  # no numeric comparison
        ("(b)", ["(c)", "(a)", "(e)", "(d)", "(b)"], "multi_choice", "text", None, "(a)"),  # pid 168 quirk
        (5, ["5", "6"], "multi_choice", "text", None, "5"),
        # integer: str(int(float(x))), truncation toward zero
        ("4.9", None, "free_form", "integer", None, "4"),
        ("-4.9", None, "free_form", "integer", None, "-4"),
        (" 1e3 ", None, "free_form", "integer", None, "1000"),
        ("1,000", None, "free_form", "integer", None, None),
        ("\u22123", None, "free_form", "integer", None, None),
        ("inf", None, "free_form", "integer", None, None),
        ("5 years", None, "free_form", "integer", None, None),
        # float: Python rounding of the binary value, then str()
        ("1.25", None, "free_form", "float", 1, "1.2"),
        ("1.15", None, "free_form", "float", 1, "1.1"),
        ("51.035", None, "free_form", "float", 2, "51.03"),
        ("-0.04", None, "free_form", "float", 1, "-0.0"),
        ("3", None, "free_form", "float", 2, "3.0"),
        ("50%", None, "free_form", "float", 1, None),
        # list: the string as is
        ("[2014, 2016]", None, "free_form", "list", None, "[2014, 2016]"),
    ],
)
def test_normalize(extraction, choices, qt, at, precision, want):
    assert mv.normalize_extracted_answer(extraction, choices, qt, at, precision) == want


@pytest.mark.parametrize(
    "a, b, d",
    [
        ("", "", 0),
        ("", "abc", 3),
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("145\u00b0", "145", 1),
        ("ab", "ba", 2),
    ],
)
def test_edit_distance(a, b, d):
    assert mv.edit_distance(a, b) == d == mv.edit_distance(b, a)


# ---------------------------------------------------------------- extraction and end-to-end verdicts
@pytest.mark.parametrize(
    "pid, response, extraction",
    [
        ("8", "Yes", "Yes"),  # a response equal to an option is kept
        ("13", " 0 ", "0"),  # int() accepts it
        ("1", "1.20", "1.2"),  # float() accepts it
        ("1", 'The answer is "1.2".', "1.2"),  # --quick_extract
        ("1", "", ""),
        ("1", w("d = 1.2 cm"), "1.2"),
        ("2", w("1,000 g"), "1000"),
        ("45", w("\u22123"), "-3"),
        ("27", "The difference is 15 - 4 = 11 years, so the answer is 11.", "11"),
        ("4", "So the answer is 4 with a remainder of 7.", "4"),  # the value leads the sentence
        ("4", "Therefore x = 2 + 2 = 4.", "4"),  # no marker: the last number
        ("4", w("\\frac{8}{2}"), "8/2"),  # fractions stay fractions (float() rejects them)
        ("5", w("B"), "B"),
        ("5", w("(A) 97"), "A"),
        ("5", "The answer is 97.", "97"),
        ("5", w("\\boxed{C}"), "C"),
        ("8", w("yes."), "Yes"),
        ("8", "Looking closely, I would say yes, it is.", "Yes"),  # the last option mentioned
        ("340", "The text reads like a lab report, so it belongs to Science.", "Science"),
        ("340", w("Science"), "Science"),
        ("506", w("2014, 2016"), "[2014, 2016]"),
        ("506", w("[2014,2016]"), "[2014, 2016]"),
        ("225", "The answer is [0, 2, 0, 2, 1, 7, 1, 2, 0, 3, 0, 6].", "[0, 2, 0, 2, 1, 7, 1, 2, 0, 3, 0, 6]"),
    ],
)
def test_extract_answer(rows, pid, response, extraction):
    assert mv.extract_answer(rows[pid], response) == extraction


@pytest.mark.parametrize(
    "pid, response, correct",
    [
        ("1", w("1.2"), True),
        ("1", w("1.23"), True),  # rounded to precision 1
        ("1", w("1.15"), False),  # round(1.15, 1) == 1.1
        ("108", w("51.04"), True),
        ("108", w("51.0"), False),
        ("2", w("1000 g"), True),
        ("2", "It weighs 1,000 grams, so the answer is 1000.", True),
        ("13", w("0"), True),
        ("27", w("11.9"), True),  # integer answers truncate
        ("27", w("eleven"), False),
        ("45", w("-3"), True),
        ("45", w("3"), False),
        ("5", w("A"), True),
        ("5", w("97"), True),
        ("5", w("(A)"), True),
        ("5", w("m\\angle H = 97^\\circ"), True),  # nearest option by edit distance
        ("5", w("B"), False),
        ("5", "<think>A looks right but</think>The answer is (C).", False),
        ("8", w("Yes"), True),
        ("8", w("no"), False),
        ("10", w("E"), True),  # options are the letters themselves
        ("342", w("D"), True),  # letter D -> option "d"
        ("342", w("d"), True),
        ("168", w("E"), True),
        ("168", w("(b)"), False),  # the official letter rule reads "(b)" as option B = "(a)"
        ("340", w("Science"), True),
        ("340", w("E"), True),
        ("340", w("Math"), False),
        ("434", w("60-k"), True),
        ("3", w("145\u00b0"), True),
        ("3", w("C"), True),
        ("3", w("\u2220BOC = 145"), True),  # nearest option by edit distance
        ("3", w("150\u00b0"), False),
        ("549", w("16"), True),
        ("549", w("C"), True),
        ("506", w("[2014, 2016]"), True),
        ("506", "It rose between 2014 and 2016. The answer is 2014 and 2016.", True),
        ("506", w("[2014, 2017]"), False),
        ("204", w("12"), True),
    ],
)
def test_is_correct(rows, pid, response, correct):
    assert mv.is_correct(rows[pid], response) is correct


def test_every_gold_scores_correct(rows):
    for r in rows.values():
        assert mv.is_correct(r, w(r.answer)) is (r.id not in LETTER_QUIRK), r.id
        assert mv.is_correct(r, r.answer) is (r.id not in LETTER_QUIRK), r.id


@pytest.mark.skipif(not (SHARED / "testmini.json").is_file(), reason="full MathVista testmini not in this checkout")
def test_full_testmini_gold_and_categories():
    rows = mv.load(SHARED)
    counts = {}
    for r in rows:
        counts[r.category] = counts.get(r.category, 0) + 1
        assert mv.is_correct(r, w(r.answer)) is (r.id not in LETTER_QUIRK), r.id
    assert counts == {
        "figure question answering": 269,
        "geometry problem solving": 208,
        "math word problem": 186,
        "visual question answering": 179,
        "textbook question answering": 158,
    }

"""engine/benchmarks/mathverse.py: the five-version layout, option parsing, gold letters, and the rule-only verdicts
that stand in for the GPT-4 extractor and judge."""

import json
import shutil
from pathlib import Path

import pytest

from engine import benchmarks
from engine.benchmarks import BenchRow
from engine.benchmarks import mathverse as mvs

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests/fixtures/benchmarks/mathverse"
SHARED = REPO.parent / "shared/benchmarks/mathverse"  # the full Text Only file, where this checkout has it


@pytest.fixture(scope="module")
def five() -> list[BenchRow]:
    return mvs.load(FIXTURE)


@pytest.fixture(scope="module")
def text_only() -> dict[str, BenchRow]:
    return {r.id: r for r in mvs.load(FIXTURE / "testmini_text_only.json")}


def w(answer: str) -> str:
    return f"<think>Let me look at the diagram.</think>\n<answer>{answer}</answer>"


def ff(answer: str) -> BenchRow:
    return BenchRow(id="x", problem="", images=[], answer=answer, meta={"question_type": "free-form"})


def mc(answer: str, choices: list[str] | None) -> BenchRow:
    return BenchRow(
        id="x", problem="", images=[], answer=answer, choices=choices, meta={"question_type": "multi-choice"}
    )


def test_interface():
    assert benchmarks.get("mathverse") is mvs
    assert mvs.NAME == "mathverse" and "GPT-4" in mvs.JUDGE_NOTE
    assert not hasattr(mvs, "score")  # engine/stages/eval.py would read it as the partial-credit scorer


# ---------------------------------------------------------------- loading
def test_load_five_versions(five):
    raw = json.loads((FIXTURE / "testmini.json").read_text(encoding="utf-8"))
    assert [r.id for r in five] == ["1", "2", "3", "4", "5", "3421", "3422", "3423", "3424", "3425"]
    assert [r.category for r in five] == list(mvs.VERSIONS) * 2
    for r, item in zip(five, raw, strict=True):
        assert r.problem == item["query_cot"] and r.meta["query_wo"] == item["query_wo"]
        assert r.answer == item["answer"]
        assert r.images == [FIXTURE / item["image"]]
        assert {"subject", "subfield", "source", "problem_index", "question_type"} <= set(r.meta)
        json.dumps(r.meta)
    assert five[0].choices == ["40\u00b0", "60\u00b0", "120\u00b0", "140\u00b0"]
    assert all(r.choices == five[0].choices for r in five[:4])
    assert five[4].choices is None  # Vision Only: the options are in the image
    assert five[4].problem.startswith("According to the question shown in the image")
    assert all(r.choices is None for r in five[5:])  # free-form


def test_load_text_only_file(text_only):
    assert len(text_only) == 15
    assert {r.category for r in text_only.values()} == {"Text Only"}
    assert all(r.images == [] for r in text_only.values())
    assert text_only["339"].choices == ["090^\\circ T", "180^\\circ T", "049^\\circ T", "041^\\circ T"]


def test_load_errors(tmp_path):
    shutil.copy(FIXTURE / "testmini_text_only.json", tmp_path)
    with pytest.raises(ValueError, match="testmini.json not found.*testmini_text_only.json"):
        mvs.load(tmp_path)  # the overall score needs the five versions; Text Only must be asked for by path
    rows = json.loads((FIXTURE / "testmini.json").read_text(encoding="utf-8"))
    rows[1]["problem_version"] = "Text Heavy"
    rows[2]["sample_index"] = "1"
    del rows[3]["query_cot"]
    (tmp_path / "testmini.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(ValueError, match=r"3 problems(.|\n)*Text Heavy(.|\n)*duplicate(.|\n)*'query_cot'"):
        mvs.load(tmp_path)


def test_image_path_resolution(tmp_path):
    shutil.copy(FIXTURE / "testmini.json", tmp_path)
    assert mvs.load(tmp_path)[0].images == [tmp_path / "images_version_1-4/image_1.png"]
    nested = tmp_path / "images/images_version_1-4/image_1.png"  # images.zip unpacked with its top folder
    nested.parent.mkdir(parents=True)
    nested.write_bytes(b"")
    assert mvs.load(tmp_path)[0].images == [nested]


@pytest.mark.parametrize(
    "question, options",
    [
        ("Find x.\nChoices:\nA:40\u00b0\nB:60\u00b0", ["40\u00b0", "60\u00b0"]),
        ("Find x.\nChoice:\nA. 090^\\circ T\nB. 180^\\circ T", ["090^\\circ T", "180^\\circ T"]),
        ("Find x.\nChoices:\nA.$y$ rises\nB.$y$ falls\nC.All real $x$", ["$y$ rises", "$y$ falls", "All real $x$"]),
        (
            "Find x.\nChoices:\nA:26\u00b0\nB:74\u00b0\nC:64\u00b0\nD:54\u00b0\n102",
            ["26\u00b0", "74\u00b0", "64\u00b0", "54\u00b0"],
        ),
        ("Choose 2 answers:\nChoices:\nA:$a$\nB:$b$\nC:$c$", ["$a$", "$b$", "$c$"]),
        ("Find x.\nChoices:\nB:1\nC:2", None),  # not from A
        ("Find x.", None),
        ("", None),
    ],
)
def test_parse_choices(question, options):
    assert mvs.parse_choices(question) == options


# ---------------------------------------------------------------- scoring
def test_official_template_answers(five):
    """The repository's example answers to problem 685: 14 four times (right), 13 for Vision Only (wrong)."""
    template = json.loads((FIXTURE / "output_testmini.json").read_text(encoding="utf-8"))
    by_id = {r.id: r for r in five}
    verdicts = [mvs.is_correct(by_id[t["sample_index"]], t["model_answer"]) for t in template]
    assert verdicts == [True, True, True, True, False]


@pytest.mark.parametrize(
    "answer, choices, letters",
    [
        ("B", None, "B"),
        ("(C)", None, "C"),
        ("C\nD", None, "CD"),
        ("A, C", None, "AC"),
        ("False", ["True", "False"], "B"),
        ("False", None, None),
        ("090^\\circ T", ["090^\\circ T", "180^\\circ T"], "A"),
        ("cat", ["dog", "bird"], None),
    ],
)
def test_gold_letters(answer, choices, letters):
    got = mvs.gold_letters(answer, choices)
    assert got == (None if letters is None else frozenset(letters))


@pytest.mark.parametrize(
    "sample_index, response, correct",
    [
        ("1", w("D"), True),
        ("1", w("D:140\u00b0"), True),
        ("1", w("140\u00b0"), True),  # the option's content (the judge's fifth demonstration)
        ("1", "Angle CED = 180 - 40 = 140 degrees. The answer is \\boxed{D}.", True),
        ("1", w("C"), False),
        ("1", w("120\u00b0"), False),
        ("1", w("C or D"), False),
        ("517", w("C"), True),  # gold "(C)"
        ("517", w("(C)"), True),
        ("517", w("B"), False),
        ("429", w("B"), True),  # gold "False" is option B's text
        ("429", w("False"), True),
        ("429", w("A"), False),
        ("440", w("C and D"), True),  # gold "C\nD"
        ("440", w("C, D"), True),
        ("440", "The two expressions are (C) and (D). The answer is C, D", True),
        ("440", w("C"), False),
        ("440", w("A, C, D"), False),
        ("339", w("A"), True),  # gold "090^\circ T" is option A
        ("339", w("090\u00b0 T"), True),
        ("339", w("B"), False),
        ("525", w("F"), True),
        ("525", w("E"), False),
    ],
)
def test_multiple_choice(text_only, sample_index, response, correct):
    assert mvs.is_correct(text_only[sample_index], response) is correct


def test_vision_only_multiple_choice(five):
    """Vision Only has no options in the text: the letter is all there is."""
    assert mvs.is_correct(five[4], w("D"))
    assert not mvs.is_correct(five[4], w("A"))
    assert not mvs.is_correct(five[4], w("140\u00b0"))
    assert not mvs.is_correct(mc("False", None), w("B"))
    assert mvs.is_correct(mc("False", None), w("false"))


@pytest.mark.parametrize(
    "gold, response, correct",
    [
        ("14", "So L = 14 cm, rounded down.", True),
        ("14", w("14.32"), False),
        ("y=-2 x+5", "The answer is y = 5 - 2x", True),
        ("y=-2 x+5", w("y=-2x+6"), False),
        ("\\frac{9\\sqrt{3}}{2}", w("$\\frac{9\\sqrt{3}}{2}$"), True),
        ("\\frac{9\\sqrt{3}}{2}", w("9\\sqrt{3}/2"), True),
        ("\\frac{9\\sqrt{3}}{2}", w("7.79"), False),  # a decimal approximation is a different answer
        ("Volume $=874.93 \\mathrm{~cm}^{3}$", w("874.93 cm\u00b3"), True),
        ("Volume $=874.93 \\mathrm{~cm}^{3}$", w("V = 874.93 cm^3"), True),
        ("Volume $=874.93 \\mathrm{~cm}^{3}$", w("874.9"), False),  # tolerance 1e-6, not the reward's 1e-4
        ("Volume $=452.389$ cubic units", w("452.389"), True),
        ("315^\\circT", w("315\u00b0T"), True),
        ("118\u63b3T", w("118\u00b0 T"), True),  # the release's mis-encoded degree sign
        ("053 ^\\circ T", w("053\u00b0 T"), True),
        ("$r=5$", w("5"), True),
        ("$r=5$", w("r = 5"), True),
        ("2191.7 metres", "The distance is about \\boxed{2191.7\\text{ m}}.", True),
        ("2191.7 metres", w("2192"), False),
        ("(-3,-3)", w("(-3, -3)"), True),
        ("(-3,-3)", w("(-3, 3)"), False),
        ("(-2,1]", w("(-2,1)"), False),  # the judge's first demonstration
        ("2500", w("2,500"), True),
        ("Area $=2500 \\pi \\mathrm{cm}^{2}$", w("2500\\pi"), True),
        ("Area $=2500 \\pi \\mathrm{cm}^{2}$", w("2500\u03c0 cm\u00b2"), True),
        ("$g(x)=\\ln x+4$", w("g(x) = \\ln(x) + 4"), True),
        ("domain: [-4, 0) and range: (-3, 1]", w("domain: [-4, 0) and range: (-3, 1]"), True),
        ("domain: [-4, 0) and range: (-3, 1]", w("domain: [-4, 0] and range: (-3, 1]"), False),
        ("14", w(""), False),
        ("14", "", False),
    ],
)
def test_free_form(gold, response, correct):
    assert mvs.is_correct(ff(gold), response) is correct


@pytest.mark.parametrize(
    "text, cleaned",
    [
        ("Volume $=874.93 \\mathrm{~cm}^{3}$", "874.93"),
        ("$h=58$", "58"),
        ("S.A. $=1209.84$", "1209.84"),
        ("56.55 units $^{3}$", "56.55"),
        ("216.\\mathrm{cm}^2", "216"),
        ("=\\frac{7}{4}", "\\frac{7}{4}"),
        ("118\u63b3T", "118\u00b0T"),
        ("y = 2x + m", "2x + m"),  # a trailing variable is not a unit
        ("$$r=7.00$$", "7.00"),
    ],
)
def test_clean_free_form(text, cleaned):
    assert mvs.clean_free_form(text) == cleaned


def _self_consistent(rows) -> list[str]:
    """Ids whose own gold, or its cleaned form in \\boxed{}, does not score correct."""
    bad = []
    for r in rows:
        responses = [r.answer, w(r.answer)]
        if r.meta["question_type"] == "free-form":
            responses.append(f"The answer is \\boxed{{{mvs.clean_free_form(r.answer)}}}.")
        bad += [r.id for resp in responses if not mvs.is_correct(r, resp)]
    return bad


def test_gold_scores_correct(five, text_only):
    assert _self_consistent(five) == []
    assert _self_consistent(text_only.values()) == []


@pytest.mark.skipif(not (SHARED / "testmini_text_only.json").is_file(), reason="MathVerse release not in this checkout")
def test_full_text_only_release():
    rows = mvs.load(SHARED / "testmini_text_only.json")
    assert len(rows) == 788
    mcq = [r for r in rows if r.meta["question_type"] == "multi-choice"]
    assert len(mcq) == 436 and all(r.choices for r in mcq) and all(mvs.gold_letters(r.answer, r.choices) for r in mcq)
    assert _self_consistent(rows) == []

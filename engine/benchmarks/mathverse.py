"""MathVerse testmini (Zhang et al., ECCV 2024, arXiv:2403.14624): loader and a rule-only stand-in for its judge.

Release layout (github.com/ZrrSkywalker/MathVerse, `data/`; HF `AI4Math/MathVerse`), which `load` reads:
    testmini.json              3,940 rows: 788 problems x 5 versions (Text Dominant, Text Lite, Vision Intensive,
                               Vision Dominant, Vision Only); the official overall score is the accuracy over them
    testmini_text_only.json    788 Text Only rows (an ablation; load it by passing its path)
    images_version_1-4/, images_version_5/, images_version_6/   the rows' `image` paths (images.zip unpacked here)
Each row: sample_index (unique id), problem_index, problem_version, question (options inside the text after a
"Choices:" line; "" for Vision Only), image, answer, question_type (multi-choice / free-form), metadata (split,
source, subject, subfield), query_wo, query_cot.

Prompt: `query_cot` ("Please first conduct reasoning, and then answer ... at the end."). It is the response
prompt of the paper (Tables 5 and 6) behind both of its reported metrics, the CoT-E score and the plain accuracy
("w/o"), and it matches our reasoning models and the SPECS <think>/<answer> template; `query_wo` asks for a
direct answer with no reasoning (the repository's cheaper leaderboard recipe) and stays in meta.

Scoring. Official: gpt-3.5/GPT-4 extracts the final answer (extract_answer_s1.py), then GPT-4 judges it against
the standard answer, 0 or 1 (score_answer_s2.py); `--quick_match` is exact string equality. Here, rules only:
1. The answer text: the last <answer> block (else the response minus <think> blocks); an exact match with the
   standard answer counts (the official quick match).
2. Multiple choice: the gold is mapped to option letters ("B", "(C)", an option's text such as "False" or
   "090^\\circ T", or several letters such as "C\\nD"); the response's letter comes from `engine.rewards` (bare
   letter, option text, "answer is X", "(X)", ...); a response naming no letter is compared with the correct
   option's text as in 3 (the judge's fifth demonstration). Several gold letters need exactly that set.
3. Free-form: the last \\boxed{} / "answer is" sentence, with "Volume $=", "$h=" labels, $...$, \\mathrm{} and
   trailing units dropped on both sides; then equal numbers (relative tolerance 1e-6; units are ignored, not
   converted), math-verify equivalence for LaTeX/expressions, or equal normalised strings (`engine.rewards`).
Scores per `problem_version` (the category), plus subject/subfield in meta (the official breakdowns).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from engine.benchmarks import BenchRow, answer_text
from engine.log import warn_once
from engine.rewards import RewardConfig, choice_letter, narrow_answer, strip_markup
from engine.rewards import extract_answer as _strip_think
from engine.rewards import score as _reward

NAME = "mathverse"
JUDGE_NOTE = (
    "MathVerse's official scoring has GPT-4 extract the final answer and GPT-4 judge it against the standard "
    "answer; our rule-only score compares the extracted answer instead (the option letter for multiple choice, "
    "numeric or math-verify equality for free-form, units ignored)."
)

VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only")
"""The five versions of testmini.json, in sample_index order within a problem."""
TEXT_ONLY = "Text Only"
QUESTION_TYPES = ("multi-choice", "free-form")
PROMPT_FIELD = "query_cot"
_REQUIRED = ("sample_index", "problem_index", "problem_version", "question", "answer", "question_type", PROMPT_FIELD)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CFG = RewardConfig(rel_tol=1e-6)  # "the same value": tighter than the training reward's 1e-4


# ---------------------------------------------------------------- loading
def load(path: str | Path) -> list[BenchRow]:
    """MathVerse rows, in file order.

    Args:
        path: the release's `data/` folder (reads testmini.json, the five versions), or the path of one file in
            that schema (testmini_text_only.json for the Text Only ablation).

    Returns:
        One BenchRow per sample_index: problem = `query_cot`, answer = the release's answer, category =
        `problem_version`, choices = the options parsed from the question (None when the question carries none,
        as in Vision Only), meta = question_type, problem_index, problem_version, question, query_wo and the
        `metadata` fields (split, source, subject, subfield).
    """
    path = Path(path)
    data_file = path if path.is_file() else path / "testmini.json"
    if not data_file.is_file():
        raise ValueError(
            f"mathverse: {data_file} not found; pass the release's data/ folder with testmini.json (3,940 rows, five "
            "versions: github.com/ZrrSkywalker/MathVerse data/testmini.json or HF AI4Math/MathVerse, config "
            "testmini), or the path of testmini_text_only.json for the Text Only ablation"
        )
    root = data_file.parent
    items = json.loads(data_file.read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise ValueError(f"mathverse: {data_file} must be a JSON list of rows, got {type(items).__name__}")
    rows, problems, seen = [], [], set()
    for k, item in enumerate(items):
        bad = _check_item(k, item, seen)
        if bad:
            problems.extend(bad)
            continue
        seen.add(str(item["sample_index"]))
        rows.append(_row(item, root))
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(f"mathverse: {data_file}: {len(problems)} problems\n  {shown}")
    missing = sum(not p.is_file() for r in rows for p in r.images)
    if missing:
        warn_once(f"mathverse: {missing} of {len(rows)} images missing under {root} (the release's images.zip)")
    return rows


def _check_item(k: int, item: Any, seen: set[str]) -> list[str]:
    if not isinstance(item, dict):
        return [f"row {k}: not an object"]
    where = f"row {k} (sample_index {item.get('sample_index')!r})"
    out = [f"{where}: missing {key!r}" for key in _REQUIRED if key not in item]
    if item.get("problem_version") not in (*VERSIONS, TEXT_ONLY):
        out.append(f"{where}: problem_version {item.get('problem_version')!r} not in {(*VERSIONS, TEXT_ONLY)}")
    if item.get("question_type") not in QUESTION_TYPES:
        out.append(f"{where}: question_type {item.get('question_type')!r} not in {QUESTION_TYPES}")
    if str(item.get("sample_index")) in seen:
        out.append(f"{where}: duplicate sample_index")
    return out


def _row(item: dict[str, Any], root: Path) -> BenchRow:
    image = item.get("image") or ""
    meta = {
        "question_type": item["question_type"],
        "problem_index": str(item["problem_index"]),
        "problem_version": item["problem_version"],
        "question": item["question"],
        "query_wo": item.get("query_wo", ""),
        **item.get("metadata", {}),
    }
    mc = item["question_type"] == "multi-choice"
    return BenchRow(
        id=str(item["sample_index"]),
        problem=item[PROMPT_FIELD],
        images=[_image_path(root, image)] if image else [],
        answer=str(item["answer"]),
        category=item["problem_version"],
        choices=parse_choices(item["question"]) if mc else None,
        meta=meta,
    )


def _image_path(root: Path, image: str) -> Path:
    """`root/image` (images.zip unpacked into data/); `root/images/image` when only that one exists."""
    direct, nested = root / image, root / "images" / image
    return nested if not direct.exists() and nested.exists() else direct


_CHOICES_HEADER = re.compile(r"^[ \t]*Choices?[ \t]*[:\uff1a]?[ \t]*$", re.MULTILINE | re.IGNORECASE)
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])\)?\s*[:.)\uff1a]\s*(.*?)\s*$")


def parse_choices(question: str) -> list[str] | None:
    """Option texts from the lines after the last "Choices:" (or "Choice:") line: "A:40°", "A. 090^\\circ T",
    "(A) ...", consecutive from A. Stops at the first other line; None with fewer than two options."""
    headers = list(_CHOICES_HEADER.finditer(question))
    if not headers:
        return None
    options = []
    for line in question[headers[-1].end() :].splitlines():
        if not line.strip():
            continue
        m = _OPTION_LINE.match(line)
        if m is None or m.group(1) != _LETTERS[len(options)]:
            break
        options.append(m.group(2))
    return options if len(options) >= 2 else None


# ---------------------------------------------------------------- scoring
def is_correct(row: BenchRow, response: str) -> bool:
    """The rule-only verdict on one response (see the module docstring)."""
    text = _strip_think(answer_text(response))
    gold = row.answer.strip()
    if text == gold:  # the official --quick_match
        return True
    if row.meta["question_type"] == "multi-choice":
        letters = gold_letters(gold, row.choices)
        if letters is not None:
            return _choice_correct(text, letters, row.choices)
    return _free_form_correct(text, gold)


def gold_letters(answer: str, choices: list[str] | None) -> frozenset[str] | None:
    """The option letters a multiple-choice gold names: "B", "(C)", "C\\nD", or an option's text (when the options
    are known). None when it names none ("False" with the options only in the image)."""
    a = answer.strip()
    m = re.fullmatch(r"\(?([A-Z])\)?", a)
    if m:
        return frozenset(m.group(1))
    if re.fullmatch(r"[A-Z](?:\s*[,;&\s]\s*[A-Z])+", a):
        return frozenset(re.findall(r"[A-Z]", a))
    hits = [_LETTERS[k] for k, c in enumerate(choices or []) if _squash(c) == _squash(a)]
    return frozenset(hits) if len(hits) == 1 else None


def _choice_correct(text: str, gold: frozenset[str], choices: list[str] | None) -> bool:
    last = _LETTERS.index(max(gold))
    valid = _LETTERS[: max(len(choices), last + 1)] if choices else _LETTERS[: max(5, last + 1)]
    if len(gold) > 1:
        return _letters_named(text, valid) == gold
    named = choice_letter(text, valid, choices)  # the letter reading of the training reward (engine.rewards)
    if named is not None or not choices or last >= len(choices):
        return named in gold
    # No letter named: the official judge also accepts the correct option's content (its fifth demonstration).
    return _free_form_correct(text, choices[last])


def _letters_named(text: str, valid: str) -> frozenset[str] | None:
    """The set of letters an answer lists ("C and D", "C, D", "(C)(D)", "CD"), None for anything else."""
    s = strip_markup(narrow_answer(text))
    s = re.sub(r"\b(?:and|or|options?|choices?|answers?)\b", " ", s, flags=re.IGNORECASE)
    if not re.fullmatch(r"[\s,;&/.():]*(?:[A-Z][\s,;&/.():]*)+", s):
        return None
    found = frozenset(re.findall(r"[A-Z]", s))
    return found if found <= set(valid) else None


def _free_form_correct(text: str, gold: str) -> bool:
    pred, g = clean_free_form(narrow_answer(text)), clean_free_form(gold)
    if not g or not pred:
        return False
    if _squash(pred) == _squash(g):
        return True
    return _reward(pred, g, cfg=_CFG).accuracy > 0


_UNIT = (
    r"(?:square\s+|sq\.?\s*|cubic\s+)?(?:units?|cm|mm|km|m|ft|feet|foot|in|inch(?:es)?|yd|yards?|mi|miles?"
    r"|metres?|meters?|centimet(?:re|er)s?|kilomet(?:re|er)s?|millimet(?:re|er)s?|degrees?)"
)
# A unit only right after a number, "}", ")" or \pi ("2 m", "216.cm^2", "2500 \pi cm^2"), so "y = 2x + m" keeps m.
_TRAILING_UNIT = re.compile(
    rf"(?:(?<=[\d}}).)])|(?<=[\d}}).)] )|(?<=\\pi)|(?<=\\pi ))\s*{_UNIT}(?:\s*\^\s*\d)?\s*\.?$", re.IGNORECASE
)
_LABEL = re.compile(r"^[A-Za-z][A-Za-z.]*(?:\s+[A-Za-z.]+){0,2}\s*=\s*(?=\S)")


def clean_free_form(text: str) -> str:
    """A free-form answer without its dressing: "Volume $=874.93 \\mathrm{~cm}^{3}$" -> "874.93", "$h=58$" -> "58",
    "118掳T" -> "118°T". The same cleaning is applied to the gold and to the response's answer."""
    s = text.replace("\u63b3", "\u00b0")  # the release's mis-encoded degree sign (GBK reading of UTF-8 "°")
    s = s.replace("\u00b2", "^2").replace("\u00b3", "^3").replace("\u03c0", "\\pi ")  # cm², cm³, π
    s = s.replace("$", "").replace("\\[", "").replace("\\]", "").replace("\\(", "").replace("\\)", "")
    s = re.sub(r"\\(?:mathrm|text|mathbf|textbf|operatorname)\s*\{\s*~?\s*([^{}]*?)\s*\}", r" \1", s)
    s = re.sub(r"\^\s*\{\s*(\d|\\circ)\s*\}", r"^\1", s).replace("~", " ")
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    s = _LABEL.sub("", s).lstrip("=").strip()  # "Volume =874.93", "=\frac{7}{4}"
    return _TRAILING_UNIT.sub("", s).strip().rstrip(".").strip() or s


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", strip_markup(text)).rstrip(".").casefold()


__all__ = [
    "JUDGE_NOTE",
    "NAME",
    "VERSIONS",
    "clean_free_form",
    "gold_letters",
    "is_correct",
    "load",
    "parse_choices",
]

"""MathVista testmini (Lu et al., ICLR 2024, arXiv:2310.02255): loader and the official scoring rules.

Release layout (github.com/lupantech/MathVista, `data/`), which `load` reads:
    testmini.json              {pid: row}; 1000 rows, pids "1".."1000"
    query.json                 {pid: prompt} for test + testmini (or `query_testmini.json`, the testmini subset)
    images/<pid>.jpg           the row's `image` path, relative to this folder (not needed to load or score)
The prompt is the release's `query`: a type-specific "Hint: ..." line, "Question: ...", and for multiple choice
"Choices:\\n(A) ...". Rows that carry their own `query` field (the HF release) need no query file.

Scoring follows evaluation/extract_answer.py and evaluation/calculate_score.py:
1. Extraction. An empty response gives ""; a multiple-choice response that is exactly one of the choices, an
   integer-type response `int()` accepts and a float-type response `float()` accepts are kept as they are; the
   text inside `The answer is "..."` (their `--quick_extract`) is taken. Everything else goes to GPT-4 with five
   demonstrations in the official script; here rules stand in for it (`_rule_extract`), on the last \\boxed{}
   or "answer is"/"Answer:" sentence (else the whole answer text): multiple choice: an option's text, an option
   letter (read as `engine.rewards` reads it), the last option text mentioned; integer/float: the first number
   of the answer sentence (after its last "="), or the last number of free prose; list: the last [...] list (or
   all numbers), written "[a, b]" as the release does.
   Measured on the repository's stored Bard and GPT-4 testmini responses, these rules give the same verdict as
   GPT-4's extraction on 978 and 951 of 1000 rows (Bard 33.2% vs 34.8% published, GPT-4 26.4% vs 26.1%).
2. Normalisation (`normalize_extracted_answer`, as calculate_score.py): multiple choice: the first "(x)" letter if
   any, a letter A.. maps to its option, else the option at the smallest Levenshtein distance (earliest on a tie),
   so every extraction, "" included, becomes an option; integer: str(int(float(x))) (truncates); float:
   str(round(float(x), precision)); list: str(x); a failure gives None.
3. The prediction must equal the release's answer string exactly (for multiple choice the option text).
Quirks kept on purpose: pid 168/849 have options written "(a)".."(e)", so "(b)" is read as letter B.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from engine.benchmarks import BenchRow, answer_text
from engine.log import warn_once
from engine.rewards import choice_letter, narrow_answer, strip_markup
from engine.rewards import extract_answer as _strip_think

NAME = "mathvista"
JUDGE_NOTE = (
    "MathVista's extract_answer.py asks GPT-4 to extract the answer from any response that is not already a bare "
    "option or number; rules (\\boxed{}, 'answer is', option letter/text, last number) stand in for that call, and "
    "calculate_score.py's normalisation and exact match are applied unchanged."
)

QUERY_FILES = ("query_testmini.json", "query.json")
"""Prompt files looked up next to the annotations, first found wins."""
QUESTION_TYPES = ("multi_choice", "free_form")
ANSWER_TYPES = ("text", "integer", "float", "list")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ---------------------------------------------------------------- loading
def load(path: str | Path) -> list[BenchRow]:
    """MathVista rows, in file order.

    Args:
        path: the release's `data/` folder (holding testmini.json and query.json or query_testmini.json), or the
            path of an annotation file in that layout (queries are looked up beside it).

    Returns:
        One BenchRow per pid: problem = the release's `query`, answer = the release's answer string (option text
        for multiple choice), category = `metadata.task`, meta = question_type, answer_type, precision, unit,
        question and the `metadata` fields flattened (language, source, category, context, grade, skills, ...),
        the keys calculate_score.py breaks scores down by.
    """
    path = Path(path)
    data_file = path if path.is_file() else path / "testmini.json"
    if not data_file.is_file():
        raise ValueError(
            f"mathvista: {data_file} not found; pass the release's data/ folder (testmini.json, query.json or "
            "query_testmini.json, images/) or the annotation file itself"
        )
    root = data_file.parent
    annotations = json.loads(data_file.read_text(encoding="utf-8"))
    if not isinstance(annotations, dict):
        raise ValueError(f"mathvista: {data_file} must be a JSON object keyed by pid, got {type(annotations).__name__}")
    queries = _load_queries(root)
    rows, problems = [], []
    for key, item in annotations.items():
        pid = str(item.get("pid", key))
        query = queries.get(pid, item.get("query"))
        bad = _check_item(pid, item, query)
        if bad:
            problems.extend(bad)
            continue
        rows.append(_row(pid, item, query, root))
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(f"mathvista: {data_file}: {len(problems)} problems\n  {shown}")
    missing = sum(not p.is_file() for r in rows for p in r.images)
    if missing:
        warn_once(f"mathvista: {missing} of {len(rows)} images missing under {root} (the release's images/ folder)")
    return rows


def _load_queries(root: Path) -> dict[str, str]:
    for name in QUERY_FILES:
        if (root / name).is_file():
            return {str(k): v for k, v in json.loads((root / name).read_text(encoding="utf-8")).items()}
    return {}


def _check_item(pid: str, item: dict[str, Any], query: str | None) -> list[str]:
    """Problems with one annotation row (empty when it can be scored)."""
    if query is None:
        return [f"pid {pid}: no query (no {' or '.join(QUERY_FILES)} next to the annotations, no `query` field)"]
    qt, at = item.get("question_type"), item.get("answer_type")
    out = []
    if qt not in QUESTION_TYPES:
        out.append(f"pid {pid}: question_type {qt!r} not in {QUESTION_TYPES}")
    if at not in ANSWER_TYPES:
        out.append(f"pid {pid}: answer_type {at!r} not in {ANSWER_TYPES}")
    if qt == "multi_choice" and not item.get("choices"):
        out.append(f"pid {pid}: multi_choice row without choices")
    if at == "float" and item.get("precision") is None:
        out.append(f"pid {pid}: float row without precision")
    if item.get("answer") is None:
        out.append(f"pid {pid}: no answer (the test split has none; score testmini)")
    return out


def _row(pid: str, item: dict[str, Any], query: str, root: Path) -> BenchRow:
    precision = item.get("precision")
    meta = {
        "question_type": item["question_type"],
        "answer_type": item["answer_type"],
        # The repository stores an int, the HF release a float such as 1.0: the scorer uses int(precision).
        "precision": None if precision is None else int(precision),
        "unit": item.get("unit"),
        "question": item.get("question", ""),
        **item.get("metadata", {}),
    }
    image = item.get("image")
    return BenchRow(
        id=pid,
        problem=query,
        images=[root / image] if image else [],
        answer=str(item["answer"]),
        category=meta.get("task", ""),
        choices=[str(c) for c in item["choices"]] if item.get("choices") else None,
        meta=meta,
    )


# ---------------------------------------------------------------- scoring
def is_correct(row: BenchRow, response: str) -> bool:
    """True when the response's normalised extraction equals the release's answer (calculate_score.py)."""
    prediction = normalize_extracted_answer(
        extract_answer(row, response),
        row.choices,
        row.meta["question_type"],
        row.meta["answer_type"],
        row.meta.get("precision"),
    )
    return prediction is not None and prediction == row.answer


def extract_answer(row: BenchRow, response: str) -> str:
    """The `extraction` the official extract_answer.py would store, with rules where it would call GPT-4.

    The response is first narrowed to its last <answer> block (or, with none, stripped of <think> blocks).
    """
    text = _strip_think(answer_text(response))
    qt, at = row.meta["question_type"], row.meta["answer_type"]
    if text == "":
        return ""
    if qt == "multi_choice" and text in (row.choices or []):
        return text
    if at == "integer":
        try:
            return str(int(text))
        except ValueError:
            pass
    if at == "float":
        try:
            return str(float(text))
        except ValueError:
            pass
    quick = re.search(r'The answer is "(.*)"\.', text)  # the official --quick_extract rule
    if quick:
        return quick.group(1)
    return _rule_extract(text, row)


def normalize_extracted_answer(
    extraction: Any, choices: list[str] | None, question_type: str, answer_type: str, precision: int | None
) -> str | None:
    """calculate_score.py's `normalize_extracted_answer`: the prediction string compared to the answer, or None."""
    if question_type == "multi_choice":
        text = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letter = re.findall(r"\(([a-zA-Z])\)", text)
        if letter:
            text = letter[0].upper()
        letters = _LETTERS[: len(choices)]
        if len(text) == 1 and text in letters:
            return choices[letters.index(text)]
        distances = [edit_distance(text, c) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision)))
    except (ValueError, TypeError, OverflowError):
        return None
    if answer_type == "list":
        return str(extraction)
    return extraction  # no other answer type occurs in testmini; the old script kept the extraction as is


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insert, delete, substitute), as python-Levenshtein's `distance`."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# ---------------------------------------------------------------- the rules that stand in for GPT-4
_NUMBER = re.compile(r"(?<![\w)\]}.])-?(?:\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+(?:\.\d+)?)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_LIST = re.compile(r"\[([^\[\]]*)\]")


def _clean(text: str) -> str:
    return strip_markup(text).strip().rstrip(".").strip().strip("\"'").strip()


def _rule_extract(text: str, row: BenchRow) -> str:
    """What the GPT-4 extractor is asked to return: an option letter, a number or a list (or the answer text)."""
    narrowed = _clean(narrow_answer(text))
    from_marker = narrowed != _clean(text)  # a \boxed{} or an "answer is" sentence was found
    at = row.meta["answer_type"]
    if row.meta["question_type"] == "multi_choice":
        choices = row.choices or []
        return (
            _option_named(narrowed, choices)
            or choice_letter(text, _LETTERS[: len(choices)], choices)
            or _last_option_mentioned(narrowed, choices)
            or narrowed
        )
    if at in ("integer", "float"):
        # In the answer sentence the value comes first ("1982 with an income of $931,441") or after the last
        # "=" ("x = 2 + 3 = 5"); in free prose the last number is the best guess.
        if from_marker:
            return _first_number(narrowed.rsplit("=", 1)[-1]) or _first_number(narrowed) or narrowed
        return _last_number(narrowed) or narrowed
    if at == "list":  # the release writes lists as Python does: "[2014, 2016]"
        lists = _LIST.findall(narrowed)
        items = [x.strip() for x in lists[-1].split(",")] if lists else _numbers(narrowed)  # "2007 and 2008"
        return "[" + ", ".join(items) + "]" if items else narrowed
    return narrowed


def _option_named(text: str, choices: list[str]) -> str | None:
    """The option whose text the answer is: exactly, else the only one equal up to case."""
    if text in choices:
        return text
    hits = [c for c in choices if c.strip().casefold() == text.casefold()]
    return hits[0] if len(set(hits)) == 1 else None


def _last_option_mentioned(text: str, choices: list[str]) -> str | None:
    """The option whose text occurs last in `text` as a whole token (the longer option on the same end)."""
    best, best_key = None, (-1, -1)
    for c in choices:
        if not c.strip():
            continue
        for m in re.finditer(rf"(?<!\w){re.escape(c.strip())}(?!\w)", text, re.IGNORECASE):
            key = (m.end(), len(c.strip()))
            if key > best_key:
                best, best_key = c, key
    return best


def _numbers(text: str) -> list[str]:
    """Numbers in order: "1,234" -> "1234", a Unicode minus -> "-"; a fraction stays "a/b" (float() rejects it)."""
    text = _FRAC.sub(r"\1/\2", text.replace("\u2212", "-"))
    return [re.sub(r"\s+", "", n) for n in _NUMBER.findall(_THOUSANDS.sub("", text))]


def _first_number(text: str) -> str | None:
    nums = _numbers(text)
    return nums[0] if nums else None


def _last_number(text: str) -> str | None:
    nums = _numbers(text)
    return nums[-1] if nums else None


__all__ = ["JUDGE_NOTE", "NAME", "edit_distance", "extract_answer", "is_correct", "load", "normalize_extracted_answer"]

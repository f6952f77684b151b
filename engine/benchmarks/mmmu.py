"""MMMU validation: 900 college-level multimodal questions, 30 subjects in 6 disciplines (30 per subject).

Expected layout of `path`: the validation parquet files of the HF dataset `MMMU/MMMU` (one config per subject),
as `huggingface-cli download MMMU/MMMU --repo-type dataset --include "*/validation-*" --local-dir <path>` leaves
them (any `validation-*.parquet` below `path` is read, so one merged file works too):

    <path>/Accounting/validation-00000-of-00001.parquet     columns id, question, options (a string holding a
    <path>/Agriculture/validation-00000-of-00001.parquet    Python list), answer, question_type, image_1..image_7
    ...                                                     (HF Image: {bytes, path}), subfield, img_type, ...

The images are embedded in the parquet files; `load` writes each one once to `<path>/_images/<id>_<k>.<ext>`
(kept between runs), since BenchRow.images are paths; a read-only `path` (a shared dataset mount) gets them in
`image_cache_dir(path)` under $XDG_CACHE_HOME or ~/.cache instead.

Prompt: the official one (`mmmu/configs/llava1.5.yaml` + `utils/data_utils.py: construct_prompt`) is, for multiple
choice, the question, a newline, the options as `(A) text` lines, then "Answer with the option's letter from the
given choices directly."; for open questions the question, a newline, then "Answer the question using a single
word or phrase.". By default we leave those answer-style instructions out (the eval template asks for our own
format); `load(path, with_instruction=True)` keeps them. MMMU interleaves images: every `<image k>` marker in the
question and options becomes our `<image>` placeholder, in reading order, and image k goes there (a marker used
twice repeats the image; images that no marker names are dropped; with no marker at all, every image goes first).

Scoring: the official rule-based `mmmu/utils/eval_utils.py`, rebuilt (not copied): `parse_multi_choice_response`
for multiple choice (a letter in parentheses, else a bare letter, else an option's text in a response of more than
5 words; the latest mention wins), `parse_open_response` + `eval_open` for open questions (key phrases, numbers
rounded to 2 decimals, substring match). When nothing parses, the official code guesses a random letter with the
process-wide generator seeded once (`random.seed(42)` at import), so its k-th guess in a run is the k-th draw. We
draw from a fresh `random.Random(42)` for every response: the same letter as the official run's first guess, and
a score that never depends on what was scored before it. Pass one shared `random.Random(42)` as `rng` to replay the
official stream in the official order. Category = subject (from the id); accuracy per subject, and discipline and
overall accuracy weighted by instances, as the official report.
"""

from __future__ import annotations

import ast
import os
import random
import re
from pathlib import Path

from engine.benchmarks import BenchRow, answer_text, cache_dir, media_dir
from engine.log import warn_once

NAME = "mmmu"
JUDGE_NOTE = ""
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
FALLBACK_SEED = 42
"""Seed of the official random guess when no option parses (`random.seed(42)` in eval_utils.py)."""

DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
        "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics", "Energy_and_Power",
        "Materials", "Mechanical_Engineering",
    ),
}  # fmt: skip
"""The official grouping of the 30 subjects (`utils/data_utils.py: DOMAIN_CAT2SUB_CAT`)."""
SUBJECT_DISCIPLINE = {s: d for d, subjects in DISCIPLINES.items() for s in subjects}

_MARKER = re.compile(r"<image (\d+)>")
_NUM_IMAGE_COLUMNS = 7
_NUM_VALIDATION_ROWS = 900
_GET_DATA = (
    "download the HF dataset MMMU/MMMU: huggingface-cli download MMMU/MMMU --repo-type dataset "
    '--include "*/validation-*" --local-dir <path>'
)


# ---------------------------------------------------------------- loading
def load(path: str | Path, with_instruction: bool = False) -> list[BenchRow]:
    """Validation rows from the parquet files under `path`, images extracted to `<path>/_images/` (or, when
    `path` is read-only, e.g. a shared dataset mount, to a cache folder: `image_cache_dir`)."""
    root = Path(path)
    files = sorted(p for p in root.rglob("validation-*.parquet") if "_images" not in p.parts)
    if not files:
        raise FileNotFoundError(f"MMMU: no validation-*.parquet under {root}; {_GET_DATA}")
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RuntimeError(
            "engine.benchmarks.mmmu reads parquet with pyarrow: run `.venv/bin/pip install pyarrow`"
        ) from e
    image_dir = media_dir(root, "_images", NAME)
    if image_dir != root / "_images":
        warn_once(f"MMMU: {root} is read-only; its embedded images go to {image_dir}")
    rows, missing, seen = [], [], set()
    for file in files:
        for rec in pq.read_table(file).to_pylist():
            if rec["id"] in seen:
                raise ValueError(f"MMMU: id {rec['id']} appears twice under {root} (second time in {file})")
            seen.add(rec["id"])
            images = {k: _extract_image(rec, k, image_dir) for k in range(1, _NUM_IMAGE_COLUMNS + 1)}
            row, row_missing = build_row(rec, images, with_instruction)
            rows.append(row)
            missing += [f"{rec['id']} <image {k}>" for k in row_missing]
    if missing:
        raise ValueError(
            f"MMMU: {len(missing)} image markers name an empty image column under {root} "
            f"(first: {', '.join(missing[:3])}); re-download the parquet files ({_GET_DATA})"
        )
    if len(rows) != _NUM_VALIDATION_ROWS:
        warn_once(f"MMMU: {len(rows)} validation rows under {root}; the release has {_NUM_VALIDATION_ROWS}")
    return rows


def image_cache_dir(root: Path) -> Path:
    """Where a read-only release's images are extracted: $XDG_CACHE_HOME (or ~/.cache)/specs-engine/mmmu/<key>."""
    return cache_dir(NAME, root)


def _extract_image(rec: dict, k: int, image_dir: Path) -> Path | None:
    """Write column image_k's embedded bytes to `image_dir` once; None when the column is empty."""
    cell = rec.get(f"image_{k}")
    if not cell or not cell.get("bytes"):
        return None
    data = cell["bytes"]
    ext = Path(cell.get("path") or "").suffix.lower() or _sniff_ext(data)
    out = image_dir / f"{rec['id']}_{k}{ext}"
    if not (out.is_file() and out.stat().st_size == len(data)):  # cached from an earlier load
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f"{out.suffix}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(out)  # atomic: a concurrent loader never sees half a file
        except OSError as e:
            raise RuntimeError(
                f"MMMU: cannot write the embedded images to {image_dir} ({e}); `path` must be writable"
            ) from e
    return out


def _sniff_ext(data: bytes) -> str:
    for magic, ext in ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp")):
        if data.startswith(magic):
            return ext
    return ".webp" if data[8:12] == b"WEBP" else ".img"


def build_row(rec: dict, images: dict[int, Path | None], with_instruction: bool = False) -> tuple[BenchRow, list[int]]:
    """One BenchRow from an HF record (id, question, options, answer, question_type, ...) and its image files.

    Returns:
        (row, missing): `missing` lists the k of every `<image k>` marker whose image_k is empty.
    """
    subject = "_".join(rec["id"].split("_")[1:-1])  # official: validation_<Subject>_<n>
    mc = rec["question_type"] == "multiple-choice"  # the official code treats every other type as open
    options = _as_list(rec.get("options") or "[]")
    text = rec["question"]
    if mc:
        text += "\n" + "".join(f"({chr(ord('A') + i)}) {opt}\n" for i, opt in enumerate(options))
        text = text + "\n" + MC_INSTRUCTION if with_instruction else text.rstrip("\n")
    elif with_instruction:
        text += "\n" + OPEN_INSTRUCTION
    ks = [int(m) for m in _MARKER.findall(text)]
    missing = sorted({k for k in ks if images.get(k) is None})
    if ks:
        paths = [images[k] for k in ks if images.get(k) is not None]
        text = _MARKER.sub("<image>", text)
    else:
        paths = [p for _, p in sorted(images.items()) if p is not None]
    row = BenchRow(
        id=rec["id"],
        problem=text,
        images=paths,
        answer=rec["answer"] if isinstance(rec["answer"], str) else str(rec["answer"]),
        category=subject,
        choices=[str(o) for o in options] if mc else None,
        meta={
            "question_type": rec["question_type"],
            "golds": [str(g) for g in _as_list(rec["answer"])] if not mc else [rec["answer"]],
            "discipline": SUBJECT_DISCIPLINE.get(subject, ""),
            "subfield": rec.get("subfield") or "",
            "img_type": rec.get("img_type") or "",
            "topic_difficulty": rec.get("topic_difficulty") or "",
        },
    )
    return row, missing


def _as_list(value) -> list:
    """A list as given; a string holding a Python list of strings parsed (the official code evals `options`, and
    the official answer key lists the alternatives of three open answers, e.g. "['$MgS$', 'MgS']"); else [value]."""
    if isinstance(value, list):
        return value
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
            return parsed
    return [value]


# ---------------------------------------------------------------- scoring
def is_correct(row: BenchRow, response: str) -> bool:
    """Official rule: the parsed letter equals the gold (multiple choice); else `eval_open` on the parsed answer."""
    text = answer_text(response)
    if row.meta["question_type"] == "multiple-choice":
        letters = [chr(ord("A") + i) for i in range(len(row.choices or []))]
        pred = parse_multi_choice_response(text, letters, dict(zip(letters, row.choices or [], strict=True)))
        return pred in row.meta["golds"]
    return eval_open(row.meta["golds"], parse_open_response(text))


def parse_multi_choice_response(
    response: str, all_choices: list[str], index2ans: dict[str, str], rng: random.Random | None = None
) -> str:
    """The letter the official parser reads from `response` (see the module docstring for the random guess)."""
    for ch in ",.!?;:'":  # official: strip each of these characters from both ends, in this order
        response = response.strip(ch)
    padded = f" {response} "  # spaces so " A " also matches at the ends
    by_content = False
    candidates = [c for c in all_choices if f"({c})" in padded]
    with_brackets = bool(candidates)
    if not candidates:
        candidates = [c for c in all_choices if f" {c} " in padded]
    if not candidates and len(padded.split()) > 5:
        # Option texts count only in a response of more than 5 words (a short one is more likely a bare letter).
        candidates = [c for c, text in index2ans.items() if text.lower() in padded.lower()]
        by_content = bool(candidates)
    if not candidates:
        return (rng or random.Random(FALLBACK_SEED)).choice(all_choices)
    if len(candidates) == 1:
        return candidates[0]
    # Several: the one mentioned last wins (ties: the first candidate, as numpy's argmax).
    if by_content:
        positions = [padded.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif with_brackets:
        positions = [padded.rfind(f"({c})") for c in candidates]
    else:
        positions = [padded.rfind(f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))]


_KEY_PHRASES = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_NUMBER_PATTERNS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # comma-grouped: 1,234,567
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # scientific: 1.5e-3
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # plain: 12, 1.5, .5
)


def parse_open_response(response: str) -> list[str | float]:
    """Official `parse_open_response`: candidate answers, numbers as floats rounded to 2 decimals."""
    text = response.strip().strip(".").lower()
    # Official quirk: the sentence split looks for ". " before a capital letter, but the text is already
    # lower-cased, so only newlines split it.
    pieces = re.split(r"\.\s(?=[A-Z])|\n", text)
    tails = []
    for i, piece in enumerate(pieces):
        phrases = _KEY_PHRASES + (("=",) if i == len(pieces) - 1 else ())  # "=" only in the last piece
        shortest = None
        for phrase in phrases:
            if phrase in piece:
                tail = piece.split(phrase)[-1].strip()
                if not shortest or len(tail) < len(shortest):  # an empty tail counts as none, as there
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            tails.append(shortest)
    if not tails:
        tails = [text]
    candidates = list(tails)
    for tail in tails:
        candidates += [n for pattern in _NUMBER_PATTERNS for n in pattern.findall(tail)]
    return list({norm for c in candidates for norm in _normalize(c)})


def _normalize(s: str) -> list[str | float]:
    """Official `normalize_str`: a number -> [float rounded to 2 decimals]; a string -> lower-cased, a single
    character padded both ways (" x", "x ") so it only matches as a word."""
    s = s.strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        pass
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]


def eval_open(golds: list[str], preds: list[str | float]) -> bool:
    """Official `eval_open`: a string prediction containing a gold string, or a number equal to a gold number."""
    norm_golds = [g for gold in golds for g in _normalize(gold)]
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in norm_golds):
                return True
        elif pred in norm_golds:
            return True
    return False


def accuracy_report(rows: list[BenchRow], correct: dict[str, bool]) -> dict[str, float]:
    """Official report: accuracy per subject, per discipline and overall (instance-weighted), keyed as
    `<Subject>`, `Overall-<Discipline>` and `Overall`; only groups with rows appear."""
    groups: dict[str, list[bool]] = {}
    for row in rows:
        ok = bool(correct.get(row.id, False))
        for key in (row.category, f"Overall-{row.meta['discipline']}", "Overall"):
            groups.setdefault(key, []).append(ok)
    return {key: sum(v) / len(v) for key, v in groups.items()}


__all__ = [
    "NAME", "JUDGE_NOTE", "DISCIPLINES", "SUBJECT_DISCIPLINE", "load", "build_row", "is_correct",
    "parse_multi_choice_response", "parse_open_response", "eval_open", "accuracy_report",
]  # fmt: skip

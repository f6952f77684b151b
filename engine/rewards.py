"""Rule-based rewards for SPECS (arXiv:2510.25801): format 0.5 + accuracy 1.0, used by the stages and eval.

Format (`format_ok`): exactly one `<think>...</think>` followed by exactly one `<answer>...</answer>`, only
whitespace before, between and after, each of the four tags exactly once in the whole response (so nested or
duplicated tags fail). The think block may be empty; the answer block must be non-empty after strip.

Accuracy is independent of format (unless `require_format_for_accuracy`). The answer text is the content of the
`<answer>` block when the response has exactly one well-formed one (even inside think), else the response with
its think blocks and stray tags removed. Then, by gold type:
  choice  (choices given, or gold is one letter A-Z): `choice_letter` tiers, see there. Several letters -> wrong.
  number  (gold is a plain number): last `\\boxed{}`, else the text after the last "answer is"/"answer:", else
          all of it; "$1,234.5 cm", "50%", "x = 3", "7." are numbers; LaTeX goes to math-verify; in prose the
          last number counts. A "%" on either side also accepts the value / 100 ("50%" == "50" == "0.5").
  math    (gold has LaTeX, fractions, operators): math-verify `parse` + `verify`, imported lazily.
  string  (anything else): normalised exact match (case, whitespace, trailing period); on a mismatch the
          optional `judge(extracted, gold)` decides when it returns a bool.
  boxes   (declared "boxes", or a gold in V-Triune's `[{'bbox_2d': [...], 'label': ...}]` form): detection and
          grounding, scored by IoU as V-Triune does (engine/reward_boxes.py): the accuracy reward is
          accuracy_weight x a score in [0, 1], partial credit.
A gold that is empty or that math-verify cannot parse scores 0 (or 1 with `unparseable_gold_is_correct`, the
MM-EUREKA behaviour), sets `Reward.gold_unparseable` and is counted in `num_gold_unparseable()`.
"""

import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from engine.log import logger, warn_once
from engine.reward_boxes import box_score, looks_like_boxes, parse_boxes

Judge = Callable[[str, str], bool | None]


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    think_open: str = "<think>"
    think_close: str = "</think>"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"
    format_weight: float = 0.5
    """Reward for a well-formatted response."""
    accuracy_weight: float = 1.0
    """Reward for a correct answer."""
    rel_tol: float = 1e-4
    """Relative tolerance of numeric comparisons (math.isclose)."""
    abs_tol: float = 1e-8
    """Absolute tolerance of numeric comparisons, for golds near 0."""
    unparseable_gold_is_correct: bool = False
    """True reproduces MM-EUREKA: an unparseable gold scores full accuracy. Off by default: it rewards noise."""
    require_format_for_accuracy: bool = False
    """True: a response that fails the format check also gets accuracy 0 (stricter than SPECS, which adds them)."""
    math_timeout_s: int = 5
    """math-verify parse/verify timeout, in seconds (signal based: applied on the main thread only)."""
    box_iou_threshold: float = 0.0
    """Boxes: score at this one IoU threshold (the GRPO stage sets V-Triune's dynamic schedule per rollout batch,
    engine/reward_boxes.py); 0.0 averages over V-Triune's eleven thresholds."""


@dataclass(slots=True)
class Reward:
    format: float
    accuracy: float
    total: float
    gold_unparseable: bool = False
    extracted: str = ""
    """The answer text that was compared (after tag and \\boxed{} extraction)."""
    method: str = ""
    """Which comparison decided: choice, number, math, string, boxes, judge, none."""


_counts = {"gold_unparseable": 0, "unknown_answer_type": 0}
_lock = threading.Lock()


def num_gold_unparseable() -> int:
    """How many gold answers this process has not been able to parse."""
    return _counts["gold_unparseable"]


# ---------------------------------------------------------------- format and answer extraction
@lru_cache(maxsize=8)
def _format_re(tags: tuple[str, str, str, str]) -> re.Pattern:
    t0, t1, a0, a1 = (re.escape(t) for t in tags)
    return re.compile(rf"\s*{t0}(.*?){t1}\s*{a0}(.*?){a1}\s*", re.DOTALL)


def _tags(cfg: RewardConfig) -> tuple[str, str, str, str]:
    return (cfg.think_open, cfg.think_close, cfg.answer_open, cfg.answer_close)


def format_ok(response: str, cfg: RewardConfig | None = None) -> bool:
    """True when the response is `<think>R</think><answer>A</answer>` as described in the module docstring."""
    tags = _tags(cfg or RewardConfig())
    if any(response.count(tag) != 1 for tag in tags):
        return False
    m = _format_re(tags).fullmatch(response)
    return m is not None and m.group(2).strip() != ""


def extract_answer(response: str, cfg: RewardConfig | None = None) -> str:
    """The `<answer>` content when there is exactly one well-formed block, else the response minus think blocks."""
    t0, t1, a0, a1 = _tags(cfg or RewardConfig())
    i, j = response.find(a0), response.find(a1)
    if response.count(a0) == 1 and response.count(a1) == 1 and i < j:
        return response[i + len(a0) : j].strip()
    text = re.sub(re.escape(t0) + ".*?" + re.escape(t1), " ", response, flags=re.DOTALL)
    for tag in (t0, t1, a0, a1):
        text = text.replace(tag, " ")
    return text.strip() or response.strip()


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), with nested braces; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for k in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[i:k]
    return text[i:]  # unclosed: take the rest


_MARKER = re.compile(r"answer\s*(?:is|:|=)\s*:?", re.IGNORECASE)


def narrow_answer(text: str) -> str:
    """The last \\boxed{} content, else the sentence after the last "answer is"/"answer:", else the text."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    hits = list(_MARKER.finditer(text))
    if hits:
        tail = text[hits[-1].end() :].strip()
        tail = re.split(r"(?<!\d)\.(?!\d)\s|\n", tail, maxsplit=1)[0]  # up to the end of the sentence
        if tail.strip():
            return tail.strip()
    return text.strip()


# ---------------------------------------------------------------- multiple choice
_LETTER_GOLD = re.compile(r"\(?\s*([A-Z])\s*\)?[.:]?")
_SINGLE = re.compile(r"\(?\s*([A-Za-z])\s*\)?[.:)]?")
_LABELLED = re.compile(r"\(?([A-Z])[.):]\s+(.+)", re.DOTALL)
# Case-insensitive markers, but the letter itself must be a capital ("the answer is a cat" is not option A).
_ANSWER_LETTER = re.compile(r"(?i:answer\s*(?:is|:|=)?\s*:?\s*(?:option\s+|choice\s+)?)\(?([A-Z])\)?(?![A-Za-z'])")
_OPTION_LETTER = re.compile(r"\b(?i:option|choice)\s+\(?([A-Z])\)?(?![A-Za-z'])")
_HEDGE = re.compile(r"\s*(?:,|or|and|/|&)\s*\(?[A-Z]\)?(?![A-Za-z'])")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")
_BARE_LETTER = re.compile(r"(?<![A-Za-z'\\])([A-Z])(?![A-Za-z'])")
_ARTICLE = re.compile(r"\s+[a-z]")  # "A total of", "I think": an article or pronoun, not an option


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def strip_markup(text: str) -> str:
    """Drop \\text{}-style wrappers, bold and math delimiters (used by the benchmark scorers too)."""
    text = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", text)
    return text.replace("**", "").replace("$", "").replace("\\(", "").replace("\\)", "").strip()


def choice_letter(text: str, letters: str, choices: Sequence[str] | None) -> str | None:
    """The option letter the answer names, or None when it names none or several.

    Tiers, first hit wins: (1) the whole answer is a letter form: "B", "(b)", "B.", "B)"; (2) it is an option's
    text, or "B. <text of B>"; (3) the last "answer is X"/"Answer: X" (None if followed by "or Y"); (4) every
    "option X" agrees; (5) every "(X)" agrees; (6) the only bare capital letter among the valid ones, where a
    capital A/I followed by a lowercase word is an article/pronoun ("A total of 3"), not an option.
    """
    boxed = _last_boxed(text)  # not narrow_answer: tier 3 needs the "answer is" marker itself
    text = strip_markup(boxed if boxed is not None else text)
    m = _SINGLE.fullmatch(text)
    if m:
        return m.group(1).upper() if m.group(1).upper() in letters else None
    if choices:
        hits = [letters[k] for k, c in enumerate(choices) if _norm(c) == _norm(text)]
        if len(hits) == 1:
            return hits[0]
        m = _LABELLED.fullmatch(text)
        if m and m.group(1) in letters and _norm(m.group(2)) == _norm(choices[letters.index(m.group(1))]):
            return m.group(1)
    hits = [m for m in _ANSWER_LETTER.finditer(text) if m.group(1).upper() in letters]
    if hits:
        if _HEDGE.match(text, hits[-1].end()):
            return None
        return hits[-1].group(1).upper()
    for pattern in (_OPTION_LETTER, _PAREN_LETTER):
        found = {m.group(1).upper() for m in pattern.finditer(text)} & set(letters)
        if found:
            return found.pop() if len(found) == 1 else None
    found = {
        m.group(1)
        for m in _BARE_LETTER.finditer(text)
        if m.group(1) in letters and not (m.group(1) in "AI" and _ARTICLE.match(text, m.end()))
    }
    return found.pop() if len(found) == 1 else None


def _gold_letter(gold: str, letters: str, choices: Sequence[str] | None) -> str | None:
    m = _LETTER_GOLD.fullmatch(gold)
    if m and m.group(1) in letters:
        return m.group(1)
    hits = [letters[k] for k, c in enumerate(choices or []) if _norm(c) == _norm(gold)]
    return hits[0] if len(hits) == 1 else None


def _option_text(choice: str) -> str:
    return re.sub(r"^\(?[A-Z][.):]\s*", "", choice.strip())  # "B. dog" -> "dog"


# ---------------------------------------------------------------- numbers
_NUM = r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+"
_NUM_RE = re.compile(_NUM)
_NUMBER_FULL = re.compile(
    rf"(?:[$\u20ac\u00a3]\s*)?(?P<num>{_NUM})\s*(?P<pct>%)?\s*(?P<unit>[a-zA-Z\u00b0][a-zA-Z\u00b0/^0-9.]*(?:\s+[a-zA-Z]+)*)?"
)
_NOT_UNITS = {"pi", "i", "e", "x", "sqrt"}
_LATEX_NOISE = re.compile(r"\\[,!;: ]|~|\\left|\\right|\^\{?\\circ\}?|\\%")
_MATHY = re.compile(r"\\[a-zA-Z]+|[\d)}]\s*/\s*[\d({]|\^|\u03c0|\u221a")


def _clean_number_text(text: str) -> str:
    text = _LATEX_NOISE.sub(lambda m: "%" if m.group(0) == "\\%" else "", strip_markup(text))
    text = text.replace("\\[", "").replace("\\]", "").strip().rstrip(".,;!").strip()
    if "=" in text and "==" not in text:
        text = text.rsplit("=", 1)[1].strip()  # "x = 3" -> "3"
    return text


def _to_float(num: str) -> float:
    return float(num.replace(",", "").replace("\u2212", "-"))


def _parse_number(text: str) -> tuple[float, bool] | None:
    """(value, had_percent) when the whole text is one number with optional currency, percent or unit."""
    m = _NUMBER_FULL.fullmatch(_clean_number_text(text))
    if m is None or (m.group("unit") or "").lower() in _NOT_UNITS:
        return None
    return _to_float(m.group("num")), m.group("pct") is not None


def _numbers_equal(a: tuple[float, bool], b: tuple[float, bool], cfg: RewardConfig) -> bool:
    va = {a[0], a[0] / 100} if a[1] else {a[0]}
    vb = {b[0], b[0] / 100} if b[1] else {b[0]}
    return any(math.isclose(x, y, rel_tol=cfg.rel_tol, abs_tol=cfg.abs_tol) for x in va for y in vb)


# ---------------------------------------------------------------- math-verify (optional, lazy)
def _math_verify():
    try:
        import math_verify
    except ImportError as e:
        raise RuntimeError(
            "engine.rewards needs math-verify for a symbolic comparison (LaTeX, fractions, expressions): "
            "run `.venv/bin/pip install math-verify==0.9.0`"
        ) from e
    return math_verify


def _timeout_s(cfg: RewardConfig) -> int | None:
    # math-verify times out with signal.alarm, which raises off the main thread: run without a timeout there.
    if threading.current_thread() is threading.main_thread():
        return cfg.math_timeout_s
    warn_once("engine.rewards: math-verify runs without a timeout off the main thread (signal.alarm limitation)")
    return None


def _math_parse(text: str, cfg: RewardConfig) -> list:
    mv = _math_verify()
    if _looks_math(text) and not any(d in text for d in ("$", "\\(", "\\[", "\\boxed")):
        text = f"${text}$"  # bare LaTeX is only found inside delimiters; prose is not wrapped (words -> symbols)
    return mv.parse(text, fallback_mode="no_fallback", parsing_timeout=_timeout_s(cfg))


def _looks_math(text: str) -> bool:
    rest = re.sub(r"\\[a-zA-Z]+|\b(?:sin|cos|tan|log|ln|exp|sqrt|pi)\b", " ", text)
    return re.search(r"[A-Za-z]{2,}", rest) is None and re.search(r"[\d\\^/=+*\u03c0\u221a]", text) is not None


# ---------------------------------------------------------------- answer types
ANSWER_TYPES = ("choice", "number", "math", "open", "boxes")
"""Answer types a row may declare (`answer_type` column); "" or absent: decided by the gold's shape."""


def answer_type(gold: str, choices: Sequence[str] | None = None, declared: str = "") -> str:
    """The verifier a row's answer gets: its declared type when that is one of ANSWER_TYPES, else the gold's shape:
    "boxes" (V-Triune's labelled boxes), "choice" (choices given with a letter or option gold, or a one-letter gold),
    "number", "math" (LaTeX, fractions, operators) or "open" (free text, judged by an LLM when a judge is configured).
    A declared type outside ANSWER_TYPES is counted (`num_unknown_answer_type`) and gives "unknown": the rules score
    it, no judge does."""
    if declared in ANSWER_TYPES:
        return declared
    if declared:
        with _lock:
            _counts["unknown_answer_type"] += 1
        warn_once(f"engine.rewards: unknown answer_type {declared!r} (known: {', '.join(ANSWER_TYPES)}); such rows are "
                  f"scored by the rules only; count: rewards.num_unknown_answer_type()")
        return "unknown"  # rules only: never sent to a judge (a task we have no verifier for)
    gold = gold.strip()
    if looks_like_boxes(gold):
        return "boxes"
    if choices:
        opts = [_option_text(c) for c in choices]
        if _gold_letter(gold, "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(opts)], opts) is not None:
            return "choice"
    elif _LETTER_GOLD.fullmatch(gold):
        return "choice"
    if _parse_number(gold) is not None:
        return "number"
    return "math" if _looks_math(gold) else "open"


def num_unknown_answer_type() -> int:
    """How many rows with an unknown declared answer type this process has scored by the rules."""
    return _counts["unknown_answer_type"]


# ---------------------------------------------------------------- scoring
def _accuracy(pred: str, gold: str, choices, cfg: RewardConfig, judge: Judge | None) -> tuple[bool | None, str, str]:
    """(correct or None for an unparseable gold, extracted answer, method)."""
    gold = gold.strip()
    if not gold:
        return None, pred, "none"
    if choices:
        opts = [_option_text(c) for c in choices]
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(opts)]
        gold_letter = _gold_letter(gold, letters, opts)
        if gold_letter is not None:
            return choice_letter(pred, letters, opts) == gold_letter, pred, "choice"
    elif _LETTER_GOLD.fullmatch(gold):
        gold_letter = _LETTER_GOLD.fullmatch(gold).group(1)
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: max(5, ord(gold_letter) - 64)]
        return choice_letter(pred, letters, None) == gold_letter, pred, "choice"
    narrowed = narrow_answer(pred)
    gold_num = _parse_number(gold)
    if gold_num is not None:
        pred_num = _parse_number(narrowed)
        if pred_num is not None:
            return _numbers_equal(pred_num, gold_num, cfg), narrowed, "number"
        if not _MATHY.search(narrowed):  # prose: the last number is the answer
            nums = _NUM_RE.findall(narrowed)
            pct = bool(nums) and narrowed.rstrip(" .").endswith("%")
            return bool(nums) and _numbers_equal((_to_float(nums[-1]), pct), gold_num, cfg), narrowed, "number"
    if gold_num is not None or _looks_math(gold):
        gold_parsed = _math_parse(gold if gold_num is None else repr(gold_num[0]), cfg)  # "3 cm" -> "3.0"
        if not gold_parsed:
            return None, narrowed, "math"
        pred_parsed = _math_parse(narrowed, cfg)
        ok = bool(pred_parsed) and _math_verify().verify(gold_parsed, pred_parsed, timeout_seconds=_timeout_s(cfg))
        return ok or _norm(narrowed) == _norm(gold), narrowed, "math"
    if _norm(strip_markup(narrowed)) == _norm(strip_markup(gold)):
        return True, narrowed, "string"
    if judge is not None:
        verdict = judge(narrowed, gold)
        if verdict is not None:
            return bool(verdict), narrowed, "judge"
    return False, narrowed, "string"


def score(
    response: str,
    answer: str,
    choices: Sequence[str] | None = None,
    *,
    cfg: RewardConfig | None = None,
    judge: Judge | None = None,
    declared_type: str = "",
) -> Reward:
    """Format + accuracy reward of one response.

    Args:
        response: the model's full response text.
        answer: the gold answer (a letter for multiple choice, a number, LaTeX, or free text).
        choices: the option texts in order A, B, ... ("B. dog" and "dog" both work), or None.
        cfg: tags, weights and tolerances; defaults to `RewardConfig()`.
        judge: called as judge(extracted, gold) only when the string path finds no exact match; a bool
            decides, None keeps the rule-based verdict (wrong).
        declared_type: the row's `answer_type` column; "boxes" scores by IoU even a gold of bare boxes (a gold in
            V-Triune's labelled-box form is recognised without it).

    Returns:
        Reward with format in {0, format_weight}, accuracy in {0, accuracy_weight} (boxes: accuracy_weight x an
        IoU score in [0, 1]) and their total.
    """
    cfg = cfg or RewardConfig()
    fmt = format_ok(response, cfg)
    extracted = extract_answer(response, cfg)
    if declared_type == "boxes" or (not declared_type and looks_like_boxes(answer)):
        gold_boxes = parse_boxes(answer)
        correct = box_score(parse_boxes(extracted), gold_boxes, cfg.box_iou_threshold) if gold_boxes else None
        method = "boxes"
    else:
        correct, extracted, method = _accuracy(extracted, answer, choices, cfg, judge)
    gold_bad = correct is None
    if gold_bad:
        with _lock:
            _counts["gold_unparseable"] += 1
        # One stable message (warn_once dedups on it); each gold goes to the debug log.
        warn_once(
            f"engine.rewards: unparseable gold answers score {int(cfg.unparseable_gold_is_correct)} "
            f"(unparseable_gold_is_correct={cfg.unparseable_gold_is_correct}); count: rewards.num_gold_unparseable()"
        )
        logger.debug("unparseable gold answer %r", answer[:200])
        correct = cfg.unparseable_gold_is_correct
    if cfg.require_format_for_accuracy and not fmt:
        correct = False
    f = cfg.format_weight if fmt else 0.0
    a = cfg.accuracy_weight * float(correct)  # boxes: an IoU score in [0, 1]; else True or False
    return Reward(format=f, accuracy=a, total=f + a, gold_unparseable=gold_bad, extracted=extracted, method=method)

"""MEGA-Bench per-field metrics and the JSON/code-block helpers they share with the response parser.

Each rule is re-stated from the official evaluator (TIGER-AI-Lab/MEGA-Bench, `megabench/metrics/`, commit ee324ab,
Apache-2.0); the code is ours. A metric takes `(response, gold)`: `response` is what the parser produced for the
field (a string, or a JSON value / None when the task's responses are parsed as JSON) and `gold` the answer string
with one level of quotes removed. It returns a number in [0, 1], or -1 meaning "leave this field out of the query
score" (positive_int_match). `field_score` calls a metric the way the official `MetricType.match` does: any
exception inside the metric scores 0.

Known differences from the official code:
- `general_single_numerical_match` reads numbers through sympy's LaTeX parser there (sympy 1.13 + antlr4 4.11; the
  antlr4 4.13 in our venv cannot load it). `_LatexNumber` re-implements the numeric part of that grammar (numbers
  with `,` thousands groups and skipped spaces, + - * / : \\times \\cdot \\div \\frac ^, groups, \\left/\\right, the
  symbol E = 2.718 and "x" as a times sign between numbers); anything else (functions, other symbols) is
  non-numeric, which is what the official code ends with too (sympy prints it, Python's eval raises, the metric
  falls back to string matching). The official Python `eval` fallback for text sympy rejects is replaced by a safe
  evaluator of literals, arithmetic and comparisons. Where sympy's ANTLR parser backs off or commits is modelled
  from observed behaviour (backtracking, plus the rules in `number`). Products with negative powers can differ in
  the last bit (sympy prints 4.5*10**(-3) as 4.5/10**3).
- `near_str_match` approximates `unidecode` by dropping accents (NFKD); rapidfuzz's Damerau-Levenshtein is ours.
- The official timeouts (5 s for eval, 10 s for \boxed) are not modelled; the 0.1 s JSON-search timeout is kept.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import operator
import re
import signal
import threading
import unicodedata
import warnings
from collections.abc import Callable
from numbers import Number
from typing import Any

import numpy as np
import regex  # the official JSON finder needs recursive patterns, which `re` lacks (regex ships with transformers)

from engine.benchmarks.megabench_numbers import number_value

# ------------------------------------------------------------------ time limits


class TimeLimitError(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """SIGALRM after `seconds`, where signals can be used (the main thread on POSIX); otherwise no limit."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeLimitError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------ literals, containers, JSON


def literal_eval(value: Any) -> Any:
    """ast.literal_eval without the warnings it prints for invalid escapes in model text ("\\(", "\\frac")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
        return ast.literal_eval(value)


def unquote(value: Any) -> Any:
    """Drop one level of string quotes: a string literal becomes its content, anything else is returned as is."""
    try:
        out = literal_eval(value)
    except MemoryError:
        return ""  # the official evaluate_as_string returns "" when the literal overflows
    except Exception:
        return value
    return out if isinstance(out, str) else value


def str_to_iterable(kind: Callable, text: Any) -> Any:
    """`kind` (list or set) of the items a string holds: a Python literal if it parses, else its comma-split
    parts (brackets dropped). Non-strings and unbalanced brackets give an empty container; "None" gives ""."""
    if not isinstance(text, str):
        return kind()
    text = text.strip(" ")
    if not text:
        return kind()
    closing = {"(": ")", "{": "}", "[": "]"}.get(text[0])
    if closing and not text.endswith(closing):
        return kind()
    try:
        value = literal_eval(text)
        if value is None:
            return ""
        if isinstance(value, int | float):
            value = [value]
        return kind(value)
    except (SyntaxError, ValueError):
        inner = text[1:-1] if closing else text
        return kind(item.strip() for item in inner.split(","))
    except TypeError:  # unhashable items for a set
        return kind()


def _freeze(obj: Any) -> Any:
    if isinstance(obj, dict):
        return frozenset((k, _freeze(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return tuple(_freeze(item) for item in obj)
    if isinstance(obj, set):
        return frozenset(obj)
    return obj


def cast_to_set(obj: Any) -> set:
    obj = _freeze(obj)
    if isinstance(obj, frozenset | set | tuple):
        return set(obj)
    return str_to_iterable(set, obj)


def cast_to_dict(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {key: cast_to_dict(val) for key, val in obj.items()}
    if isinstance(obj, str):
        return parse_json(obj) or obj
    return obj


def code_block(text: str, code_type: str | None = None, ascii_art: bool = False, strip_ws: bool = True):
    """(content of the first ``` block, True), or (text, False) when there is none."""
    if code_type:
        pattern = rf"```{code_type}\s*\n*(.*?)\s*```"
    elif ascii_art:
        if not text.strip() or len(text) > 10000:
            text = text.rstrip()
        pattern = r"```\w*(?:\s*\n+)?(.*?)\s*```" if strip_ws else r"```\w*(?:\s*\n+)?(.*?)(?:\n+\s*)?```"
    else:
        pattern = r"```\w*\s*\n*(.*?)\s*```"
    match = re.search(pattern, text, flags=re.DOTALL)
    if not match:
        return text, False
    return (match.group(1), True) if ascii_art else (match.group(1).strip(), True)


_ANSWER_LINE = re.compile(r"^(?:\*\*Answer:|Answer:)\s*(.+)", re.MULTILINE)
# A {...} with balanced braces, or a [...] running to the last "]" before an unbalanced brace (the official pattern).
_JSON_CANDIDATE = regex.compile(r"(\{(?:[^{}]|(?R))*\}|\[(?:[^{}]|(?R))*\])")
_STRING_LITERAL = regex.compile(r'"(?:\\.|[^"\\])*"')


def _json_candidate_values(candidate: str) -> list:
    """The values one candidate parses to, in the official order (JSON, then single quotes as double, then Python)."""
    out = []
    text = candidate.replace('\\"', "\0DQ\0").replace("\\'", "\0SQ\0")
    for literal in _STRING_LITERAL.findall(text):  # a string that itself holds JSON is inlined
        try:
            inner = json.loads(literal[1:-1].replace("\0DQ\0", '"').replace("\0SQ\0", "'"))
        except ValueError:
            continue
        if isinstance(inner, dict | list):
            text = text.replace(literal, json.dumps(inner))
    text = text.replace("\0DQ\0", '\\"').replace("\0SQ\0", "\\'")
    try:
        out.append(json.loads(text))
    except ValueError:
        try:
            out.append(json.loads(re.sub(r"(?<!\w)'|'(?!\w)", '"', text)))
        except ValueError:
            pass
    for attempt in (text, text.replace('\\"', '\\\\"').replace("\\'", "\\\\'")):
        try:
            out.append(literal_eval(attempt))
            break
        except Exception:  # the official code catches SyntaxError/ValueError only and crashes on the rest
            continue
    return out


def parse_json(text: str) -> Any:
    """The last JSON (or Python literal) object/array in `text`; {} (or [] for text starting with "[") if none.
    A line starting with "Answer:" narrows the text to the rest of that line; a ```json block to its content."""
    match = _ANSWER_LINE.search(text)
    text = match.group(1).strip() if match else text.strip()
    text, _ = code_block(text, "json")
    try:
        candidates = _JSON_CANDIDATE.findall(text, timeout=0.1)
    except TimeoutError:
        candidates = []
    values = [value for candidate in candidates for value in _json_candidate_values(candidate)]
    if values:
        return values[-1]
    return [] if text.startswith("[") else {}


# ------------------------------------------------------------------ strings


def _single_letter(text: str) -> str:
    match = re.match(r"^\(?([A-Za-z])\)?(?:\s*\.\s*|\.)?(.*)", text)
    return match.group(1) if match else text


def exact_str_match(response: Any, gold: Any) -> int:
    """Exact equality. For a one-letter gold, a longer response is first cut to its leading letter ("(B) x" -> B)."""
    response, gold = str(response), str(gold)
    if len(gold) == 1 and gold.isalpha() and len(response) > 1:
        response = _single_letter(response)
    return int(response == gold)


def _simplify(text: str) -> str:
    for char in (" ", "-", "\n", "\t", "."):
        text = text.replace(char, "")
    return text.lower()


def simple_str_match(response: Any, gold: str) -> int:
    """Exact match after deleting spaces, "-", newlines, tabs and "." and lower-casing both sides."""
    return exact_str_match(_simplify(str(response)), _simplify(gold))


def exact_str_match_case_insensitive(response: Any, gold: Any) -> int:
    if not isinstance(response, str) and isinstance(gold, str):
        return 0
    return exact_str_match(response.lower(), gold.lower())


def code_result_exact_str_match(response: Any, gold: str) -> int:
    """Exact match against the gold's ``` block content (kept verbatim)."""
    gold, _ = code_block(gold, ascii_art=True, strip_ws=False)
    return exact_str_match(response, gold)


def multi_ref_phrase(response: Any, gold: str) -> int:
    """1 when simple_str_match holds for any reference of the gold list (a Chinese comma separates too)."""
    refs = str_to_iterable(list, gold.replace("\uff0c", ","))
    return int(any(simple_str_match(response, ref if isinstance(ref, str) else str(ref)) for ref in refs))


def _damerau_levenshtein(a: str, b: str) -> int:
    """Unrestricted Damerau-Levenshtein distance (Lowrance-Wagner), as rapidfuzz computes it."""
    big = len(a) + len(b)
    dist = [[big] * (len(b) + 2)] + [[big] + [0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        dist[i + 1][1] = i
    for j in range(len(b) + 1):
        dist[1][j + 1] = j
    last_row: dict[str, int] = {}
    for i in range(1, len(a) + 1):
        last_col = 0
        for j in range(1, len(b) + 1):
            i1, j1 = last_row.get(b[j - 1], 0), last_col
            cost = int(a[i - 1] != b[j - 1])
            if not cost:
                last_col = j
            dist[i + 1][j + 1] = min(dist[i][j] + cost, dist[i + 1][j] + 1, dist[i][j + 1] + 1,
                                     dist[i1][j1] + (i - i1 - 1) + 1 + (j - j1 - 1))
        last_row[a[i - 1]] = i
    return dist[len(a) + 1][len(b) + 1]


def _dl_similarity(a: str, b: str) -> float:
    longest = max(len(a), len(b))
    return 1.0 - _damerau_levenshtein(a, b) / longest if longest else 1.0


def normalized_similarity_damerau_levenshtein(response: Any, gold: Any) -> float:
    if not isinstance(response, str) and isinstance(gold, str):
        return 0
    return _dl_similarity(response, gold)


def _approximate(text: str) -> str:
    words = [word for word in text.split(" ") if word.lower() not in {"the", "a"}]
    decomposed = unicodedata.normalize("NFKD", " ".join(words))
    return "".join(char for char in decomposed if not unicodedata.combining(char)).lower()


def near_str_match(response: Any, gold: Any, threshold: float = 0.9) -> float:
    """Damerau-Levenshtein similarity of the article-free, accent-free, lower-cased strings; 0 below 0.9."""
    if not isinstance(response, str) or not isinstance(gold, str):
        return 0
    similarity = _dl_similarity(_approximate(response), _approximate(gold))
    return similarity if similarity >= threshold else 0.0


def _close(pred: Any, gold: Any) -> bool:
    try:
        return not math.isnan(pred) and gold - abs(gold) * 0.01 <= pred <= gold + abs(gold) * 0.01
    except Exception:
        return False


def _close_lists(pred: Any, gold: list) -> bool:
    if not isinstance(pred, list) or len(pred) != len(gold) or any(not isinstance(x, int | float) for x in pred):
        return False  # a tuple never matches: the official check wants a list
    return all(_close(p, g) for p, g in zip(sorted(pred), sorted(gold), strict=True))


def _strip_assignment(text: str) -> str:
    """Drop \\( \\) and \\[ \\] delimiters, then keep what follows the first "=", "≈" or \\approx (that line)."""
    text = re.sub(r"\\\[(.*?)\\\]", r"\1", re.sub(r"\\\((.*?)\\\)", r"\1", text))
    match = re.search(r"(?:=|\u2248|\\approx)\s*(.+)", text)
    return match.group(1).strip() if match else text


def general_single_numerical_match(response: Any, gold: str) -> float:
    """1 when both sides read as numbers within 1% of the gold (lists: sorted, element-wise); if either side is not
    numeric, simple_str_match decides."""
    response, gold = _strip_assignment(str(response)), _strip_assignment(gold)
    pred, target = number_value(response), number_value(gold)
    if pred is None or target is None:
        return simple_str_match(response, gold)
    if isinstance(pred, list) and isinstance(target, list) or isinstance(pred, tuple) and isinstance(target, tuple):
        return float(_close_lists(pred, target))
    return float(_close(pred, target))


def _boxed(text: str) -> str:
    match = re.search(r"\\boxed\{((?:[^\{\}]+|\{[^\{\}]*\})*)\}", text)
    return match.group(1) if match else text


def boxed_single_numerical_match(response: Any, gold: str) -> float:
    return general_single_numerical_match(_boxed(str(response)), _boxed(gold))


def positive_int_match(response: Any, gold: str) -> int:
    """Both sides must be int literals and equal; -1 (field ignored) when both are <= 0. A non-string response
    (a JSON number) scores 0, because the official code literal-evals it."""
    try:
        pred = literal_eval(response)
    except (SyntaxError, ValueError):
        return 0
    if not gold:
        return 0
    target = literal_eval(gold)
    if not isinstance(target, int) or not isinstance(pred, int):
        return 0
    if target <= 0 and pred <= 0:
        return -1
    return int(pred == target)


def number_rel_diff_ratio(response: Any, gold: str) -> float:
    """max(0, 1 - |pred - gold| / |gold|)."""
    try:
        pred = response if isinstance(response, Number) else literal_eval(response)
        if not isinstance(pred, Number):
            return 0
        target = literal_eval(gold)
        return max(0, 1 - math.fabs((pred - target) / target))
    except (SyntaxError, ValueError):
        return 0


def normalized_rmse(response: Any, gold: str) -> float:
    """1 - clip(|pred - gold|, 0, 0.1) / 0.1 for two number literals; 0 when either is not one."""
    try:
        rmse = np.clip(np.sqrt((literal_eval(response) - literal_eval(gold)) ** 2), 0.0, 0.1)
        return float(1 - rmse / 0.1)
    except Exception:
        return 0


def angle_seq_float_rmse(response: Any, gold: str) -> float:
    """1 - clip(mean |pred_i - gold_i|, 0, 10) / 10 for equal-length number lists."""
    pred, target = str_to_iterable(list, response), str_to_iterable(list, gold)
    if len(pred) != len(target):
        return 0
    try:
        error = float(np.sqrt((np.array(pred) - np.array(target)) ** 2).sum() / len(target))
    except Exception:
        return 0
    score = 1 - np.clip(error, 0.0, 10.0) / 10.0
    return 0 if math.isnan(score) else float(score)


# ------------------------------------------------------------------ sets, sequences, dicts


def _overlap(pred: Any, target: Any, denominator: Callable[[set, set], int]) -> float:
    """|pred & target| / denominator; an empty denominator scores 1 (so an empty prediction has precision 1)."""
    pred, target = set(pred), set(target)
    size = denominator(pred, target)
    return len(pred & target) / size if size else 1


def _jaccard(pred: Any, target: Any) -> float:
    return _overlap(pred, target, lambda p, t: len(p | t))


def _lower_all(items: Any) -> set:
    return {item.lower() if isinstance(item, str) else item for item in items}


def jaccard_index_case_insensitive(response: Any, gold: Any) -> float:
    """Jaccard index of lower-cased strings; for tuples, of tuples normalised like simple_str_match (and "_")."""
    pred, target = cast_to_set(response), cast_to_set(gold)
    first = next(iter(target))
    if isinstance(first, str):
        return _jaccard({str(x).lower() for x in pred}, {x.lower() for x in target})
    if isinstance(first, tuple):
        norm = {tuple(_simplify(x).replace("_", "") for x in item) for item in pred}
        return _jaccard(norm, {tuple(_simplify(x).replace("_", "") for x in item) for item in target})
    return 0


def chess_move_list_jaccard_index(response: Any, gold: str) -> float:
    """Jaccard index of SAN moves, ignoring a trailing "!" or "#" (check/mate marks)."""
    pred, target = ({move.removesuffix("!").removesuffix("#") for move in str_to_iterable(set, side)}
                    for side in (response, gold))
    return _jaccard(pred, target)


def sequence_accuracy_case_insensitive(response: Any, gold: str) -> float:
    """Fraction of positions equal (strings case-insensitively); 0 when the lengths differ."""
    pred, target = str_to_iterable(list, response), str_to_iterable(list, gold)
    if len(pred) != len(target):
        return 0
    correct = 0
    for p, t in zip(pred, target, strict=True):
        if isinstance(t, str):
            correct += p.lower() == t.lower()
        elif isinstance(t, Number) and isinstance(p, Number):
            correct += p == t
    return correct / len(target)


def longest_common_list_prefix_ratio(response: Any, gold: str) -> float:
    pred, target = str_to_iterable(list, response), str_to_iterable(list, gold)
    pairs = zip(pred, target, strict=False)
    return next((i for i, (p, t) in enumerate(pairs) if p != t), min(len(pred), len(target))) / len(target)


def _dicts(response: Any, gold: str) -> tuple[dict, Any]:
    pred = cast_to_dict(response)
    if not isinstance(pred, dict):
        raise ValueError("the response is no dict")  # scores 0
    return pred, cast_to_dict(gold)


def dict_precision(response: Any, gold: str) -> float:
    """Fraction of the response's keys whose value exact-matches the gold's."""
    pred, target = _dicts(response, gold)
    if not pred:
        return 0
    return sum(1 for k, v in pred.items() if k in target and exact_str_match(v, target[k])) / len(pred)


def _dict_agg_union(metric: Callable, response: Any, gold: str) -> float:
    """Mean of `metric` per key over the union of both dicts' keys (a missing side is [])."""
    pred, target = _dicts(response, gold)
    keys = set(pred) | set(target)
    return sum(metric(pred.get(k, []), target.get(k, [])) for k in keys) / len(keys)


# ------------------------------------------------------------------ boxes and points (normalised [0, 1] coords)


def _literal_or_json(text: str, errors: tuple = (SyntaxError, ValueError)) -> Any:
    try:
        return literal_eval(text)
    except errors:
        return json.loads(text)


def _boxes(text: Any) -> list:
    """[x1, y1, x2, y2] boxes from a literal/JSON string (a single box is wrapped); [] for anything else."""
    if isinstance(text, tuple | list):
        return text
    try:
        boxes = _literal_or_json(text) if isinstance(text, str) else []
    except ValueError:
        return []
    if len(boxes) == 4 and isinstance(boxes[0], Number):
        boxes = [boxes]
    if not isinstance(boxes, tuple | list):
        return []
    return [b for b in boxes if isinstance(b, tuple | list) and len(b) == 4
            and all(isinstance(c, float | int) for c in b)]


def _iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0


def _mean_best_iou(pred: list, target: list) -> float:
    """Mean over predicted boxes of each one's best IoU with a target box; 0 without predictions."""
    scores = [max([0] + [_iou(p, t) for t in target]) for p in pred]
    return sum(scores) / len(scores) if scores else 0


def nbbox_iou_tuple(response: Any, gold: Any) -> float:
    pred, target = _boxes(response), _boxes(gold)
    try:
        return _mean_best_iou(pred, target)
    except Exception:
        return 0


def nbbox_iou_single(response: Any, gold: str) -> float:
    target = literal_eval(gold)
    try:
        pred = literal_eval(response)
    except SyntaxError:
        return 0
    try:
        return _mean_best_iou([pred], [target])
    except Exception:
        return 0


def nbbox_iou_sequence(response: Any, gold: Any) -> float:
    """Mean IoU of boxes paired in order; 0 when the counts differ (NaN when both are empty, as officially)."""
    pred, target = _boxes(response if isinstance(response, tuple | list) else str(response)), _boxes(gold)
    if len(pred) != len(target):
        return 0
    return float(np.mean([_mean_best_iou([p], [t]) for p, t in zip(pred, target, strict=True)]))


def _xml_boxes(text: Any) -> list:
    boxes = []
    for inner in re.findall(r"<box>(.*?)</box>", text) if isinstance(text, str) else []:
        try:
            box = tuple(float(c.strip()) for c in inner.split(","))
        except ValueError:
            continue
        if len(box) == 4:
            boxes.append(box)
    return boxes


def xml_nbbox_iou_single(response: Any, gold: Any) -> float:
    pred = response if isinstance(response, tuple | list) else _xml_boxes(response)
    target = gold if isinstance(gold, tuple | list) else _xml_boxes(gold)
    if pred and isinstance(pred[0], Number) and len(pred) == 4:
        pred = [pred]
    return _mean_best_iou(pred, target)


def _xml_point(text: Any) -> Any:
    """(x, y) from the one <point>x, y</point> in text, or the tuple/list itself; None otherwise."""
    if isinstance(text, tuple | list):
        return text
    found = re.findall(r"<point>(.*?)</point>", text) if isinstance(text, str) else []
    if len(found) != 1 or len(found[0].split(",")) != 2:
        return None
    try:
        return tuple(float(c.strip()) for c in found[0].split(","))
    except ValueError:
        return None


def xml_norm_point_distance(response: Any, gold: Any) -> float:
    """max(0, 1 - Euclidean distance) of two <point>x, y</point> points in [0, 1]^2."""
    points = [_xml_point(response), _xml_point(gold)]
    if any(not p or len(p) != 2 or not all(0 <= c <= 1 for c in p) for p in points):
        return 0
    return max(0, 1 - math.dist(*points))


def xml_norm_point_in_bbox(response: Any, eval_context: dict) -> int:
    """1 when the <point> lies in one of the query's eval_context["bounding_boxes"]."""
    boxes = [_boxes(text)[0] for text in eval_context["bounding_boxes"]]
    point = _xml_point(response)
    if not point or len(point) != 2:
        return 0
    return int(any(x0 <= point[0] <= x1 and y0 <= point[1] <= y1 for x0, y0, x1, y1 in boxes))


def sequence_coords_similarity(response: Any, gold: Any) -> float:
    """Mean over keypoints of exp(-10 * distance / sqrt(2)); 0 when the shapes differ."""
    def coords(text):
        if isinstance(text, tuple | list):
            return text
        items = _literal_or_json(text, (SyntaxError,)) if isinstance(text, str) else []
        return [c for c in items if isinstance(c, tuple | list) and len(c) == 2 and all(isinstance(v, float | int)
                                                                                       for v in c)]

    pred, target = np.array(coords(response)), np.array(coords(gold))
    if pred.shape != target.shape:
        return 0
    return float(np.mean(np.exp(-10 * np.linalg.norm(pred - target, axis=1) / np.sqrt(2))))


# ------------------------------------------------------------------ registry


def _maybe(metric: Callable) -> Callable:
    """A metric that scores 0 for a missing (None) response, as the official set metrics do."""
    return lambda response, gold: 0 if response is None else metric(response, gold)


METRICS: dict[str, Callable[[Any, Any], float]] = {
    "exact_str_match": exact_str_match,
    "simple_str_match": simple_str_match,
    "exact_str_match_case_insensitive": exact_str_match_case_insensitive,
    "code_result_exact_str_match": code_result_exact_str_match,
    "multi_ref_phrase": multi_ref_phrase,
    "near_str_match": near_str_match,
    "normalized_similarity_damerau_levenshtein": normalized_similarity_damerau_levenshtein,
    "general_single_numerical_match": general_single_numerical_match,
    "boxed_single_numerical_match": boxed_single_numerical_match,
    "positive_int_match": positive_int_match,
    "number_rel_diff_ratio": number_rel_diff_ratio,
    "normalized_rmse": normalized_rmse,
    "angle_seq_float_rmse": angle_seq_float_rmse,
    # sets (a string is read by str_to_iterable: a literal, else comma-separated)
    "set_equality": lambda r, g: int(cast_to_set(r) == cast_to_set(g)),
    "set_equality_case_insensitive": lambda r, g: int({x.upper() for x in cast_to_set(r)}
                                                      == {x.upper() for x in cast_to_set(g)}),
    "str_set_equality_comma": lambda r, g: int(_lower_all(str_to_iterable(set, r))
                                               == _lower_all(str_to_iterable(set, g))),
    "str_set_equality_line_break": lambda r, g: int(_lower_all(r.replace("\\n", "\n").split("\n"))
                                                    == _lower_all(g.replace("\\n", "\n").split("\n"))),
    "set_precision": _maybe(lambda r, g: _overlap(cast_to_set(r), cast_to_set(g), lambda p, t: len(p))),
    "jaccard_index": _maybe(lambda r, g: _jaccard(cast_to_set(r), cast_to_set(g))),
    "jaccard_index_case_insensitive": _maybe(jaccard_index_case_insensitive),
    "chess_move_list_jaccard_index": _maybe(chess_move_list_jaccard_index),
    # sequences
    "sequence_equality": lambda r, g: int(str_to_iterable(list, str(r)) == str_to_iterable(list, g)),
    "sequence_equality_case_insensitive": lambda r, g: int(
        [x.lower() if isinstance(x, str) else str(x) for x in str_to_iterable(list, str(r))]
        == [x.lower() for x in str_to_iterable(list, g)]),
    "sequence_accuracy_case_insensitive": sequence_accuracy_case_insensitive,
    "longest_common_list_prefix_ratio": longest_common_list_prefix_ratio,
    # dicts (a string is read by parse_json)
    "dict_equality": lambda r, g: int(operator.eq(*_dicts(r, g))),
    "dict_precision": dict_precision,
    "dict_exact_str_match_agg_recall": lambda r, g: (lambda p, t: sum(exact_str_match(p.get(k), v)
                                                                      for k, v in t.items()) / len(t))(*_dicts(r, g)),
    "dict_jaccard_agg_jaccard": lambda r, g: _dict_agg_union(METRICS["jaccard_index"], r, g),
    "dict_set_equality_agg_jaccard": lambda r, g: _dict_agg_union(METRICS["set_equality"], r, g),
    "dict_nbbox_iou_tuple_agg_jaccard": lambda r, g: _dict_agg_union(nbbox_iou_tuple, r, g),
    # boxes and points
    "nbbox_iou_tuple": nbbox_iou_tuple,
    "nbbox_iou_single": nbbox_iou_single,
    "nbbox_iou_sequence": nbbox_iou_sequence,
    "xml_nbbox_iou_single": xml_nbbox_iou_single,
    "xml_norm_point_distance": xml_norm_point_distance,
    "sequence_coords_similarity": sequence_coords_similarity,
}
"""Rule metrics scored from (response, gold). xml_norm_point_in_bbox takes the query's eval_context instead."""

CONTEXT_METRICS = {"xml_norm_point_in_bbox": xml_norm_point_in_bbox}

JUDGE_METRICS = {"gpt_4o_as_judge", "ascii_art_gpt4o_judge"}
"""Fields scored by a GPT-4o judge: their task is an open ("llm") task."""

UNSUPPORTED_METRICS = {
    "geo_proximity_location_dict": "geocodes place names with geopy",
    "nli_entailment": "an NLI model",
    "bleu": "sacrebleu",
}
"""Rule metrics we do not re-implement, and why (their tasks are marked unscorable). The LaTeX, GLEU, planning and
program and constrained-generation metrics live in their own modules (megabench_latex, _gleu, _planning, _code,
_constrained); megabench.py joins them."""


def field_score(metric: str, response: Any, gold: Any, table: dict[str, Callable] | None = None) -> float:
    """One field's score as the official evaluator records it (an exception in the metric scores 0). `table` maps
    metric names to functions (default: METRICS)."""
    try:
        return (METRICS if table is None else table)[metric](response, gold)
    except Exception:
        return 0

"""MATH-Vision (MATH-V): 3,040 competition math problems with figures, 16 subjects, levels 1-5.

Expected layout of `path` (the GitHub release `mathllm/MATH-V` `data/` plus the images from the HF dataset
`MathLLMs/MathVision`, `images.zip`):

    <path>/testmini.jsonl      304 rows (19 per subject); the split `load` reads by default
    <path>/test.jsonl          3040 rows (the full benchmark)
    <path>/images/<id>.jpg     one (merged) figure per problem, named by each row's `image` field

Split: `load(path)` reads testmini (304), the split this project takes SPECS's MathVision numbers to be on (its
Qwen2.5-VL-7B baseline is 25.4; the split was not re-checked against the paper here). The MATH-V paper's own
headline accuracy, and its leaderboard, are on `test` (3040; shared SOURCE.md): `load(path, split="test")`.
Both files hold identical rows for the same id.

Prompt: the official one (`models/GPT4V.py`, `process_example_mergedimg`) is the question, then the five options
as `(A) text` lines, left out when the options are just the letters A-E (the choices are drawn in the figure).
We drop its leading "put your answer in \\boxed{}" instruction: the eval template asks for our answer format. The
question keeps its literal `<image1>`, `<image2>` labels (they name parts of the single merged figure, which goes
before the text).

Scoring: the official rule-based `evaluation/evaluate.py` + `evaluation/utils.py`, rebuilt (not copied) in
`extract_answer` (letter / "is <number>" / "the answer is" / last `\\boxed{}` extraction, then MATH-style string
normalisation) and `is_equal` (string equality, tuples element-wise, else latex2sympy values rounded to 2
decimals). A response is correct when it equals the gold letter or the gold option's text. The official code
evaluates `str(latex2sympy(x))` with Python `eval` after `from math import *`, using the original latex2sympy2
(whose antlr4 4.7 pin conflicts with math-verify's). We parse with latex2sympy2_extended, bent towards the
original where they differ (see `_latex2sympy`), and evaluate the string with a restricted evaluator that allows
the same names (math's functions and constants, a few builtins), so e.g. sympy's `E` or `oo` fail as they do
there.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import operator
import re
from pathlib import Path

from engine.benchmarks import BenchRow, answer_text

NAME = "mathvision"
JUDGE_NOTE = ""
SPLITS = ("testmini", "test")
_LETTERS = "ABCDE"
_PHRASES = ("the final answer is", "the answer is", "the correct answer is", "the answer should be")


# ---------------------------------------------------------------- loading
def load(path: str | Path, split: str = "testmini") -> list[BenchRow]:
    """Rows of `<path>/<split>.jsonl` with their images resolved under `path` (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"mathvision split={split!r}; allowed: {', '.join(SPLITS)}")
    root = Path(path)
    file = root / f"{split}.jsonl"
    if not file.is_file():
        raise FileNotFoundError(
            f"MATH-V: {file} does not exist; expected <path>/{split}.jsonl from github.com/mathllm/MATH-V (data/) "
            "with the figures from huggingface.co/datasets/MathLLMs/MathVision (images.zip) under <path>/images/"
        )
    with open(file, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    rows = [_row(rec, root) for rec in records]
    missing = [str(p) for r in rows for p in r.images if not p.is_file()]
    if missing:
        raise ValueError(
            f"MATH-V {split}: {len(missing)} of {len(rows)} image files are missing under {root} "
            f"(first: {', '.join(missing[:3])}); unzip images.zip from huggingface.co/datasets/MathLLMs/MathVision"
        )
    return rows


def _row(rec: dict, root: Path) -> BenchRow:
    options = list(rec["options"])
    lines = ""
    # Official prompt: options listed as "(A) text" lines unless they are just the letters (drawn in the figure).
    if options and "".join(options) != _LETTERS:
        lines = "".join(f"({letter}) {text}\n" for letter, text in zip(_LETTERS, options, strict=False))
    return BenchRow(
        id=str(rec["id"]),
        problem=f"{rec['question']}\n{lines}".rstrip("\n"),
        images=[root / rec["image"]],
        answer=str(rec["answer"]),
        category=rec["subject"],
        choices=options or None,
        meta={"level": rec["level"]},
    )


# ---------------------------------------------------------------- scoring
def is_correct(row: BenchRow, response: str) -> bool:
    """Official rule: the extracted answer equals the gold letter or the text of the option that letter names."""
    pred = extract_answer(answer_text(response))
    gold_value = ""
    if row.choices and len(row.answer) == 1 and 0 <= ord(row.answer) - ord("A") < len(row.choices):
        gold_value = row.choices[ord(row.answer) - ord("A")]
    return is_equal(row.answer, pred) or is_equal(gold_value, pred)


def extract_answer(response: str) -> str:
    """The answer string as official `evaluate.py` extracts it from a raw response (lower-cased, normalised)."""
    ans = response.strip()
    # 1. A bare letter: "... C.", "... (C).", or a first line that is "C", "(C)" or "(C) C".
    for c in _LETTERS:
        if ans.endswith((f" {c}.", f" ({c}).")) or ans.startswith((f"{c}\n", f"({c})\n", f"({c}) {c}\n")):
            ans = c
    # 2. "... is <number>." -> the number.
    tail = ans.split("is ")[-1].rstrip(".")
    if _is_float(tail):
        ans = tail
    # 3. Without \boxed: the text after the last answer phrase, first line, up to the first ". ". Each phrase is
    #    tried in lower then capitalised form, in order, on what the previous phrases left.
    if "oxed{" not in ans:
        for phrase in _PHRASES:
            for flag in (phrase, phrase.replace("the", "The")):
                found = flag in ans
                ans = ans.split(flag)[-1].strip()
                if found:
                    ans = ans.split("\n")[0].split(". ")[0]
    elif ans.count("oxed{") > 1:  # several boxes: the last one
        ans = "\\boxed{" + ans.split("oxed{")[-1]
    ans = _find_math_answer(ans)
    for c in "abcde":  # "(b)" and "{b}" become "b"
        ans = ans.replace(f"({c})", c)
    for c in "abcde":
        ans = ans.replace(f"{{{c}}}", c)
    return ans.rstrip(".").lstrip(":").strip()


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _find_math_answer(s: str) -> str:
    """Official `find_math_answer`: boxed content, right of the last `=`/`\\approx`, units and LaTeX noise gone."""
    s = s.lower().replace("{}", "")
    boxed = re.findall(r"oxed{(.*)}", s, flags=re.S)  # greedy: up to the LAST closing brace
    ans = boxed[-1] if boxed else s
    # A "}" before any "{" closes the box early: keep what precedes it.
    if "}" in ans and ("{" not in ans or ans.find("}") < ans.find("{")):
        ans = ans.split("}")[0]
    ans = ans.split("=")[-1].split("\\approx")[-1]
    for old, new in (
        (" ", ""), ("\\,", ""), ("\u221e", "\\infty"), ("+\\infty", "\\infty"), ("\\\\", "\\"), ("\n", ""),
        ("\\text", ""), ("\\mbox", ""), ("bmatrix", "pmatrix"), ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""),
        ("^\\circ", ""), ("{m}^3", ""), ("m^3", ""), ("{units}", ""), ("units", ""), ("{km}", ""), ("km", ""),
    ):  # fmt: skip
        ans = ans.replace(old, new)
    return _strip_string(ans)


def _strip_string(s: str) -> str:
    """The MATH dataset's `_strip_string` as MATH-V's utils.py has it (its quirks kept: fractions are only
    rebraced when the string also holds a sqrt; only the exact string "0.5" becomes \\frac{1}{2})."""
    for old, new in (
        ("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
        ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""), ("$", ""),
    ):  # fmt: skip
        s = s.replace(old, new)
    s = s.split("\\text{ ")[0]  # a unit in \text{ ...} on the right
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2:
        s = s.split("=")[-1]
    if len(s.split("\\approx")) == 2:
        s = s.split("\\approx")[-1]
    if "sqrt" in s:
        s = _fix_sqrt(s)
    s = s.replace(" ", "")
    if "sqrt" in s:
        s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def _fix_sqrt(s: str) -> str:
    head, *parts = s.split("\\sqrt")
    return head + "".join(f"\\sqrt{{{p[0]}}}{p[1:]}" if p and p[0] != "{" else "\\sqrt" + p for p in parts)


def _fix_fracs(s: str) -> str:
    head, *parts = s.split("\\frac")
    out = head
    for p in parts:
        out += "\\frac"
        if p and p[0] == "{":
            out += p
        elif len(p) < 2:
            return s  # official: give up and return the input unchanged
        elif p[1] != "{":
            out += f"{{{p[0]}}}{{{p[1]}}}{p[2:]}"
        else:
            out += f"{{{p[0]}}}{p[1:]}"
    return out


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def is_equal(gold: str, pred: str) -> bool:
    """Official `is_equal`: case-insensitive string equality, then tuples/lists element-wise (values rounded to 2
    decimals), then both sides' latex2sympy values rounded to 2 decimals. Any parse or evaluation error: False."""
    gold, pred = gold.lower(), pred.lower()
    if not gold.replace(" ", "") or not pred.replace(" ", ""):
        return False
    if gold.strip() == pred.strip():
        return True
    if _eval_tuple(gold) == _eval_tuple(pred):
        return True
    try:
        return round(_value(gold), 2) == round(_value(pred), 2)
    except Exception:  # the official comparison is a bare try/except: any failure means "not equal"
        return False


def _eval_tuple(s: str) -> str:
    """Official `eval_tuple`: "(a,b)" / "[a,b]" with 2+ elements -> each element's value rounded to 2 decimals
    (elements holding "infty" or equal to "a"/"-a" stay as text); on any error the input unchanged."""
    if len(s) < 2 or (s[0], s[-1]) not in (("(", ")"), ("[", "]")) or len(s[1:-1].split(",")) < 2:
        return s
    try:
        items = [
            sub if "infty" in sub or sub in ("a", "-a") else str(round(_value(sub), 2)) for sub in s[1:-1].split(",")
        ]
    except Exception:
        return s
    return f"{s[0]}{','.join(items)}{s[-1]}"


def _value(latex: str):
    """The official `eval(str(latex2sympy(latex)))`; raises ValueError on anything that would raise there."""
    ok, value = _cached_value(latex)
    if not ok:
        raise ValueError(f"no value for {latex[:40]!r}")
    return value


@functools.lru_cache(maxsize=16384)
def _cached_value(latex: str) -> tuple[bool, object]:
    """(True, value) or (False, None); failures are cached too (gold letters such as "c" fail on every call).

    The official parser (the original latex2sympy2, an ANTLR grammar) stops at the first token that cannot continue
    the expression and returns what it read, so "8+2\\sqrt{2}}.theansweris:..." is worth 8+2*sqrt(2). Our parser
    rejects the whole string, so on failure we retry on the prefix before the first unmatched closing bracket or
    the first "." that is not a decimal point, the two cut points that cover the official outputs' cases.
    """
    parser = _parser()  # outside the try: a missing package is an environment problem, not a wrong answer
    cut = _stop_index(latex)
    for text in (latex, latex[:cut]) if 0 < cut < len(latex) else (latex,):
        try:
            return True, _py_eval(_sympy_str(_latex2sympy(text, parser)))
        except Exception:  # as the official bare except: any parse or evaluation error means "no value"
            continue
    return False, None


def _sympy_str(expr) -> str:
    # The original parser reads decimals as rationals ("3.0" -> 3, "0.5" -> 1/2), so "(3.0,-4)" evaluates to the
    # tuple string "(3,-4)"; turn our parser's floats back into the decimals they were written as.
    import sympy

    if isinstance(expr, sympy.Basic):
        expr = expr.xreplace({f: sympy.Rational(str(f)) for f in expr.atoms(sympy.Float)})
    return str(expr)


def _stop_index(s: str) -> int:
    depth = 0
    for i, ch in enumerate(s):
        if ch in "{([":
            depth += 1
        elif ch in "})]":
            depth -= 1
            if depth < 0:
                return i
        elif ch == "." and not s[i + 1 : i + 2].isdigit():
            return i
    return len(s)


# What the original latex2sympy2 rejects but latex2sympy2_extended reads (degrees, \boxed, \( \), \text, unicode
# pi and approx; "20%" and "20 \%", while "20\%" is 1/5 there): the official comparison fails on them, so ours too.
_UNPARSEABLE = ("\\circ", "\\!", "\\boxed", "\\(", "\\)", "\\text", "\u03c0", "\u2248")
_BAD_PERCENT = re.compile(r"(?<!\\)%|\s\\%")
_IMPLICIT_INT = re.compile(r"(?<![\w.])(\d+)(?![\d.])(?=\s*[({]|\s+\d|\s*\\(?:frac|sqrt))")  # "2\frac", "2 3", "2("
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


@functools.cache
def _parser():
    try:
        from latex2sympy2_extended.latex2sympy2 import ConversionConfig, latex2sympy
    except ImportError as e:
        raise RuntimeError(
            "engine.benchmarks.mathvision needs latex2sympy2_extended (installed with math-verify): "
            "run `.venv/bin/pip install math-verify==0.9.0`"
        ) from e
    # No normalisation, no lower-casing: closest to the original. (Its mixed-fraction flag has no effect: see below.)
    config = ConversionConfig(interpret_as_mixed_fractions=False, lowercase_symbols=False)
    return functools.partial(latex2sympy, normalization_config=None, conversion_config=config)


def _latex2sympy(latex: str, parser):
    if any(t in latex for t in _UNPARSEABLE) or _BAD_PERCENT.search(latex):
        raise ValueError(f"not parseable by the official latex2sympy2: {latex[:40]!r}")
    latex = latex.strip()
    while latex.startswith("{") and latex.endswith("}") and _stop_index(latex[1:-1]) == len(latex) - 2:
        latex = latex[1:-1].strip()  # the original reads "{18}" as a group (18), the extended parser as a set
    # The original latex2sympy2's own clean-up (it blanks out `$`, spacing commands and \displaystyle, reads
    # `a:b` as a division and \left( \right) as brackets), then no further normalisation, as there.
    for old in ("$", "\\displaystyle", "\\qquad", "\\quad", "~", "\\,", "\\left", "\\right"):
        latex = latex.replace(old, " ")
    latex = latex.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace(":", "/")
    # latex2sympy2_extended adds an integer to a rational factor that follows it ("2\frac{1}{2}" -> 5/2, "2 3" ->
    # 5, whatever its config says); the original multiplies. An integer written as a float keeps the product.
    latex = _IMPLICIT_INT.sub(r"\1.0", latex)
    latex = _THOUSANDS.sub("", latex)  # the original's numbers may hold thousands commas: "10,404" is 10404
    return parser(latex)


# Names visible to the official eval: `from math import *` plus builtins.
_NAMES = {k: v for k, v in vars(math).items() if not k.startswith("_")}
_NAMES.update(abs=abs, round=round, min=min, max=max, pow=pow, int=int, float=float, sum=sum)
_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv,
}  # fmt: skip


def _py_eval(text: str):
    """Evaluate a sympy expression string the way Python's eval would with math's names, without eval."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float | complex):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else +v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and isinstance(right, int) and abs(right) > 10_000:
                raise OverflowError("exponent too large")  # guard: the official eval would just hang
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.Name) and node.id in _NAMES:
            return _NAMES[node.id]
        if isinstance(node, ast.Call) and not node.keywords:
            return ev(node.func)(*[ev(a) for a in node.args])
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        raise ValueError(f"not evaluable: {ast.dump(node)[:60]}")

    return ev(ast.parse(text, mode="eval"))


__all__ = ["NAME", "JUDGE_NOTE", "SPLITS", "load", "is_correct", "extract_answer", "is_equal"]

"""MEGA-Bench's LaTeX metrics: `latex_expr_equality` and `text_with_latex_expr_equality` (4 core tasks).

The rules are re-stated from the official evaluator (TIGER-AI-Lab/MEGA-Bench, `megabench/metrics/scoring/
latex_expr_equality.py` and `common/transformations.py`, commit ee324ab, Apache-2.0); the code is ours. Both sides
are normalised (\\bar -> \\overline, macron letters -> \\overline{x}, subscripts pulled inside \\overline, Unicode
Greek -> LaTeX commands, \\begin/\\end and \\( \\) \\[ \\] removed), parsed with sympy's LaTeX parser and compared
with `Expr.equals`; when parsing fails (or takes over 15 s) the normalised strings are compared with
simple_str_match instead.

sympy's ANTLR parser is the official one, but `sympy.parsing.latex.parse_latex` insists on the antlr4 runtime
4.11, while math-verify (our reward) needs 4.13. The grammar generated for 4.11 loads and runs under 4.13 (only a
version notice, which we silence), so `parse_latex` below builds the same lexer and parser itself and skips that
check. Checked against the official code in its own environment (sympy 1.13.2, antlr4 4.11.0): see docs/LOG.md.
"""

from __future__ import annotations

import contextlib
import io
import re
import unicodedata
from typing import Any

from engine.benchmarks.megabench_metrics import TimeLimitError, simple_str_match, time_limit

TIMEOUT_S = 15  # the official per-comparison alarm; on expiry the metric falls back to string matching

_GREEK = dict(zip("αβγδεζηθικλμνξοπρστυφχψω",
                  ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda",
                   "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi",
                   "omega"], strict=True))
_GREEK.update({upper: name.capitalize() for upper, name in
               zip("ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ", _GREEK.values(), strict=True)})


def _overline_macrons(text: str) -> str:
    """ā (precomposed or a + U+0304) -> \\overline{a}; a stray leading U+0304 is an IndexError, as officially."""
    out: list[str] = []
    for char in text:
        if char.isalpha():
            parts = unicodedata.normalize("NFD", char)
            out.append(f"\\overline{{{parts[0]}}}" if len(parts) > 1 and parts[1] == "\u0304" else char)
        elif char == "\u0304":
            out[-1] = f"\\overline{{{out[-1]}}}"
        else:
            out.append(char)
    return "".join(out)


def _greek(match: re.Match) -> str:
    # The official pattern is the code-point ranges α-ω and Α-Ω, which also hold ς and U+03A2; those have no
    # entry and raise KeyError, which ends the metric with 0. We keep that.
    return "\\" + _GREEK[match.group()] + " "


def normalize_latex(text: str) -> str:
    """The official normalisation, in its order."""
    text = text.replace("\\bar", "\\overline")
    text = _overline_macrons(text)
    text = re.sub(r"\\overline\{([^}]*)\}_([^{}\\ ]*)", r"\\overline{\1_\2}", text)
    text = re.sub(r"[α-ωΑ-Ω]", _greek, text)
    text = re.sub(r"\\(begin|end)\{.*?\}(?:\[[^\[\]]*\])?", "", text)
    return re.sub(r"\\\(|\\\)|\\\[|\\\]", "", text)


def parse_latex(text: str) -> Any:
    """sympy's ANTLR LaTeX parser (what `sympy.parsing.latex.parse_latex` runs), without its runtime version pin."""
    import antlr4
    from sympy.parsing.latex import _parse_latex_antlr as grammar

    text = text.strip()
    errors = grammar.MathErrorListener(text)
    with contextlib.redirect_stdout(io.StringIO()):  # "ANTLR runtime and generated code versions disagree"
        lexer = grammar.LaTeXLexer(antlr4.InputStream(text))
        lexer.removeErrorListeners()
        lexer.addErrorListener(errors)
        parser = grammar.LaTeXParser(antlr4.CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(errors)
    return grammar.convert_relation(parser.math().relation())


def latex_expr_equality(response: Any, gold: Any) -> int:
    """1 when both LaTeX strings parse to sympy expressions that are `equals`; string match when parsing fails."""
    from sympy.core.sympify import SympifyError
    from sympy.parsing.latex.errors import LaTeXParsingError

    if not isinstance(response, str) or not isinstance(gold, str):
        return 0
    response, gold = normalize_latex(response), normalize_latex(gold)
    try:
        with time_limit(TIMEOUT_S):
            return 1 if parse_latex(response).equals(parse_latex(gold)) else 0
    except (LaTeXParsingError, SympifyError, TypeError, TimeLimitError, NotImplementedError):
        return simple_str_match(response, gold)


def _split_math(text: str) -> tuple[list[str], list[str]]:
    """(the plain-text parts, stripped; the $...$ spans, with their dollars)."""
    parts = re.split(r"(\$[^$]*\$)", text)
    math = [p for p in parts if p.startswith("$") and p.endswith("$")]
    plain = [p.strip() for p in parts if not (p.startswith("$") and p.endswith("$"))]
    return plain, math


def text_with_latex_expr_equality(response: Any, gold: Any) -> int:
    """1 when the text outside $...$ matches (simple_str_match, commas dropped) and the $...$ spans, joined with
    spaces and without commas, are latex_expr_equality-equal."""
    if not isinstance(response, str) or not isinstance(gold, str):
        return 0
    (res_text, res_math), (gold_text, gold_math) = _split_math(response), _split_math(gold)
    text_match = simple_str_match("".join(res_text).replace(",", ""), "".join(gold_text).replace(",", ""))

    def joined(spans):
        return " ".join(span[1:-1].strip().replace(",", "") for span in spans)

    # Both halves are always evaluated (the LaTeX one can raise, which scores 0 even when the text differs).
    math_match = latex_expr_equality(joined(res_math), joined(gold_math))
    return 1 if text_match and math_match else 0


METRICS = {"latex_expr_equality": latex_expr_equality, "text_with_latex_expr_equality": text_with_latex_expr_equality}

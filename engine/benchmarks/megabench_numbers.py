"""How MEGA-Bench's numeric metrics read a number: a model of sympy's LaTeX number parsing plus the official
float() / eval() fallbacks (split out of megabench_metrics.py; see the differences listed there).

`number_value(text)` is the entry point; `_LatexNumber` is the grammar model.
"""

from __future__ import annotations

import ast
import operator
import re
import warnings
from collections.abc import Callable
from typing import Any


class _LatexError(Exception):
    """sympy's LaTeX parser would not take this branch (it backs off, or fails at the top)."""


class _LatexFatalError(_LatexError):
    """sympy's LaTeX parser commits to this branch and raises: the lexer fails, a lone digit ends in ".", ..."""


_SKIP_COMMANDS = {"thinspace", "medspace", "thickspace", "quad", "qquad", "negthinspace", "negmedspace",
                  "negthickspace", "left", "right", "vrule", "vcenter", "vbox", "vskip", "vspace", "hfil"}
_MUL_OPS = {"*", "/", ":", "\\times", "\\cdot", "\\div"}
_REL_OPS = {"=": "==", "<": "<", ">": ">", "\\neq": "!=", "\\leq": "<=", "\\le": "<=", "\\leqq": "<=",
            "\\leqslant": "<=", "\\geq": ">=", "\\ge": ">=", "\\geqq": ">=", "\\geqslant": ">="}
_CLOSERS = {")", "]", "}", "\\}", "\\right|", "\\rangle", "\\rfloor", "\\rceil", "eof"}
_FRACS = {"\\frac", "\\dfrac", "\\tfrac"}
_E = 2.718  # the official eval runs where E = 2.718 is a global, so the LaTeX symbol E evaluates to it
_DIFFERENTIAL = re.compile(r"d[ \t\r\n]*?(?:[a-zA-Z]|\\[a-zA-Z]+)")


def _latex_tokens(text: str) -> list[tuple[str, str]]:
    """(kind, text) tokens of sympy's LaTeX lexer, as far as they matter here; ("error", "") where it fails."""
    out, i = [], 0
    while i < len(text):
        char = text[i]
        if char in " \t\r\n":
            i += 1
        elif char == "\\":
            name = re.match(r"[a-zA-Z]*", text[i + 1:]).group()
            nxt = text[i + 1 + len(name): i + 2 + len(name)]
            if name in ("left", "right") and nxt == "|":
                out.append(("cmd", f"\\{name}|"))
                i += len(name) + 2
            elif name:
                if name not in _SKIP_COMMANDS:
                    out.append(("cmd", "\\" + name))
                i += len(name) + 1
            elif nxt and nxt in ",:;!*-./\"(=":
                i += 2  # thin spaces and escapes the lexer skips
            elif nxt and nxt in "{}":
                out.append(("\\" + nxt, ""))
                i += 2
            else:
                return out + [("error", "")]
        elif _DIFFERENTIAL.match(text, i):
            i = _DIFFERENTIAL.match(text, i).end()
            out.append(("diff", ""))
        elif char.isascii() and (char.isalpha() or char.isdigit()):
            out.append(("letter" if char.isalpha() else "digit", char))
            i += 1
        elif char == "'":
            i = re.compile(r"'+").match(text, i).end()
            out.append(("'", ""))
        elif char == "&" and re.compile(r"&[ \t\r\n]*?=").match(text, i):
            i = re.compile(r"&[ \t\r\n]*?=").match(text, i).end()
            out.append(("=", ""))
        elif char in "+-*/(){}[]|_^:!,.<>=":
            out.append((char, ""))
            i += 1
        else:
            return out + [("error", "")]
    return out


class _LatexNumber:
    """Reads the numeric subset of sympy's LaTeX grammar (sympy 1.13 LaTeX.g4) by recursive descent and returns the
    number Python's eval gets from sympy's printout, or None for a non-numeric expression; raises _LatexError where
    sympy raises. Where sympy's ANTLR parser backs off from a continuation that fails ("2 + (3" reads as 2), we
    backtrack; like sympy's non-strict parse, tokens after the expression are ignored. Checked against sympy 1.13
    on a few hundred strings (tests/test_bench_megabench.py keeps the cases)."""

    def __init__(self, text: str):
        self.tokens, self.pos = _latex_tokens(text.strip()), 0

    def peek(self, ahead: int = 0) -> str:
        kind, text = self.tokens[self.pos + ahead] if self.pos + ahead < len(self.tokens) else ("eof", "")
        if kind == "error":
            raise _LatexFatalError
        return text if kind == "cmd" else kind

    def take(self, expected: str | None = None) -> str:
        kind = self.peek()
        if kind == "eof" or (expected is not None and kind != expected):
            raise _LatexError
        self.pos += 1
        return self.tokens[self.pos - 1][1] or kind

    def attempt(self, parse: Callable) -> Any:
        """parse(), or _FAILED with the position restored when it fails in a way sympy backs off from."""
        start = self.pos
        try:
            return parse()
        except _LatexFatalError:
            raise
        except _LatexError:
            self.pos = start
            return _FAILED

    def parse(self) -> Any:
        value = self.relation()
        if value is _BAD:
            raise _LatexFatalError  # sympy fails converting a number like "07"
        return value

    def relation(self) -> Any:
        value = self.expr()
        if self.peek() not in _REL_OPS:
            return value
        op = _REL_OPS[self.take()]
        try:
            rhs = self.expr()
        except _LatexError:
            raise _LatexFatalError from None
        if self.peek() in _REL_OPS:
            raise _LatexFatalError  # sympy raises TypeError comparing a truth value; the official code falls back
        if value is None or rhs is None or _BAD in (value, rhs):
            return _symbolic(value, rhs)
        return int({"==": value == rhs, "!=": value != rhs, "<": value < rhs, ">": value > rhs,
                    "<=": value <= rhs, ">=": value >= rhs}[op])  # sympy evaluates numeric relations to True/False

    def binary_loop(self, ops: set, operand: Callable, value: Any) -> Any:
        while self.peek() in ops:
            start = self.pos
            op = self.take()
            rhs = self.attempt(operand)
            if rhs is _FAILED:
                self.pos = start
                break
            value = _arith({"\\times": "*", "\\cdot": "*", ":": "/", "\\div": "/"}.get(op, op), value, rhs)
        return value

    def expr(self) -> Any:
        return self.binary_loop({"+", "-"}, self.mp, self.mp())

    def mp(self) -> Any:
        return self.binary_loop(_MUL_OPS, self.unary, self.unary())

    def unary(self) -> Any:
        if self.peek() in ("+", "-"):
            sign = self.take()
            value = self.unary()
            return _arith("-", 0, value) if sign == "-" else value
        terms = [self.postfix()]
        while self.peek() not in _CLOSERS | _MUL_OPS | set(_REL_OPS) | {"+", "-", "^", "_", "!", ",", ".", "'"}:
            if self.peek() == "digit" and self.dangling_digits() == 1:
                break  # sympy stops before a lone digit ending in "."
            term = self.attempt(self.postfix)
            if term is _FAILED:
                break
            terms.append(term)
        # sympy's quirk: a lone "x" between two symbol-free factors is read as a times sign
        kept = [term for i, term in enumerate(terms) if not (0 < i < len(terms) - 1 and term[1] == "x"
                                                             and terms[i - 1][1] == terms[i + 1][1] == "pure")]
        value = kept[0][0]
        for term in kept[1:]:
            value = _arith("*", value, term[0])
        return value

    def postfix(self) -> tuple[Any, str]:
        """(value, kind): kind is "pure" for a symbol-free number, "x" for the letter x, else "symbolic"."""
        value, kind = self.comp()
        while self.peek() == "^":
            start = self.pos
            self.take()
            power = self.attempt(self.power_operand)
            if power is _FAILED:
                self.pos = start
                break
            value = _arith("**", value, power[0])
            kind = "pure" if kind == power[1] == "pure" and value is not None else "symbolic"
        while self.peek() == "!":
            self.take()
            value, kind = _symbolic(value), "symbolic"  # factorial(n): a call the official eval cannot resolve
        return value, kind

    def power_operand(self) -> tuple[Any, str]:
        if self.peek() != "{":
            return self.atom()
        self.take()
        value = self.expr()
        self.take("}")
        return value, "pure" if value is not None else "symbolic"

    def comp(self) -> tuple[Any, str]:
        closing = {"(": ")", "[": "]", "{": "}", "\\{": "\\}", "|": "|"}.get(self.peek())
        if closing:
            opening = self.take()
            value = self.expr()
            self.take(closing)
            if opening == "|":
                return _symbolic(value), "symbolic"  # Abs(...): a call the official eval cannot resolve
            return value, "pure" if value is not None else "symbolic"
        if self.peek() == "\\sqrt":
            self.take()
            index = None
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.take("]")
            self.take("{")
            base = self.expr()
            self.take("}")
            if index is None or index == 2:
                return _symbolic(base, index), "symbolic"  # printed sqrt(...): the official eval cannot resolve it
            value = _arith("**", base, _arith("/", 1, index))
            return value, "pure" if value is not None else "symbolic"
        return self.atom()

    def atom(self) -> tuple[Any, str]:
        kind = self.peek()
        if kind == "digit":
            return self.number(), "pure"
        if kind in _FRACS:
            self.take()
            upper = self.frac_part()
            value = _arith("/", upper, self.frac_part())
            return value, "pure" if value is not None else "symbolic"
        if kind == "letter":
            letter, decorated = self.take(), False
            while self.peek() in ("_", "'"):  # x_1, x', x_{10}: another symbol
                decorated = True
                if self.take() == "_":
                    self.power_operand()
            if self.peek() == "(":  # f(x): a function call, when the parentheses close
                args = self.attempt(self.call_args)
                if args is not _FAILED:
                    return _symbolic(*args), "symbolic"
            if letter == "E" and not decorated:
                return _E, "symbolic"
            return None, "x" if letter == "x" and not decorated else "symbolic"
        if kind == "diff" or kind.startswith("\\") and kind not in _CLOSERS | _MUL_OPS | set(_REL_OPS):
            self.take()  # a differential, or a command read as a symbol (functions, Greek letters, \infty, ...)
            return None, "symbolic"
        raise _LatexError

    def call_args(self) -> list:
        self.take("(")
        args = [self.expr()]
        while self.peek() == ",":
            self.take()
            args.append(self.expr())
        self.take(")")
        return args

    def frac_part(self) -> Any:
        if self.peek() == "digit":
            return int(self.take())
        self.take("{")
        value = self.expr()
        self.take("}")
        return value

    def dangling_digits(self) -> int:
        """Length of the digit run here when "." and a non-digit follow it (sympy's parser trips on those), else 0."""
        run = 0
        while self.peek(run) == "digit":
            run += 1
        return run if self.peek(run) == "." and self.peek(run + 1) != "digit" else 0

    def number(self) -> int | float:
        dangling = self.dangling_digits()
        if dangling == 1:
            raise _LatexFatalError  # "5." fails; "12." reads as 1 and the rest is ignored
        if dangling:
            return int(self.take())
        digits = ""
        while self.peek() == "digit":
            digits += self.take()
        while self.peek() == "," and all(self.peek(k) == "digit" for k in (1, 2, 3)) and not (
                self.peek(4) == "." and self.peek(5) != "digit"):
            self.take()
            digits += self.take() + self.take() + self.take()
        if self.peek() != ".":
            if digits[0] == "0" and digits.strip("0"):
                return _BAD  # sympy cannot sympify "07" (Python forbids leading zeros): fails if it is used
            return int(digits)
        self.take()
        decimals = self.take("digit")
        # a last decimal digit followed by "." or ", ddd" is left to start the next number: "3.143.5" = 3.14 * 3.5
        while self.peek() == "digit" and not (self.peek(1) == "." or self.peek(1) != "digit" and [
                self.peek(k) for k in (1, 2, 3, 4)] == [",", "digit", "digit", "digit"]):
            decimals += self.take()
        return float(f"{digits}.{decimals}")


_FAILED = object()
_BAD = object()


def _symbolic(*values: Any) -> Any:
    """The value of a non-numeric construct over `values`: None, or _BAD when a part cannot be converted."""
    return _BAD if any(value is _BAD for value in values) else None


def _arith(op: str, a: Any, b: Any) -> Any:
    """Python's arithmetic on two numbers (what eval of sympy's printout computes); None when undefined or huge."""
    if a is None or b is None or a is _BAD or b is _BAD:
        return _symbolic(a, b)
    try:
        if op == "**" and isinstance(b, int) and isinstance(a, int) and abs(b) > 4096 and abs(a) > 1:
            return None  # the official eval would time out or overflow
        value = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
                 "**": lambda: a**b}[op]()
    except (ArithmeticError, ValueError):
        return None  # 1/0: sympy prints it, Python's eval raises
    return value


_PY_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.BitXor: operator.xor, ast.BitAnd: operator.and_, ast.BitOr: operator.or_,
              ast.LShift: operator.lshift, ast.RShift: operator.rshift}
_PY_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
               ast.Gt: operator.gt, ast.GtE: operator.ge}


def _python_value(text: str) -> Any:
    """What the official fallback `eval(text)` gives for literals, arithmetic and comparisons (Python semantics:
    "2^3" is XOR); None for anything else (names other than E, calls, ...) or an error."""

    def walk(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and node.id == "E":
            return _E
        if isinstance(node, ast.Tuple | ast.List):
            items = [walk(item) for item in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.UnaryOp) and not isinstance(node.op, ast.Not):
            return {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}[type(node.op)](
                walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _PY_BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow | ast.LShift) and isinstance(right, int) and abs(right) > 4096:
                raise ValueError  # the official eval would time out or overflow
            return _PY_BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.Compare) and all(type(op) in _PY_COMPARE for op in node.ops):
            values = [walk(node.left)] + [walk(item) for item in node.comparators]
            return all(_PY_COMPARE[type(op)](a, b) for op, a, b in zip(node.ops, values, values[1:], strict=False))
        raise ValueError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
            tree = ast.parse(text.strip(" \t"), mode="eval")
        return walk(tree.body)
    except Exception:
        return None


def _floatify(value: Any) -> int | float | None:
    try:
        value = float(value)
    except Exception:
        return None
    return round(value) if value.is_integer() else value


def _clean_units(text: str) -> str:
    """The official number_it's first step: pi becomes 3.14, % becomes /100, currency and degree signs go."""
    text = text.replace("\\pi", "\u03c0")
    text = re.sub(r"(?<![\d}])\\?\u03c0", "3.14", text)
    text = re.sub(r"(\d)(\\?\u03c0)", r"\1*3.14", text)
    text = re.sub(r"\{(\\?\u03c0)\}", "3.14", text)
    text = re.sub(r"\*(\\?\u03c0)", "*3.14", text)
    for old, new in (("%", "/100"), ("$", ""), ("\u00a5", ""), ("\u00b0C", ""), (" C", ""), ("\u00b0", "")):
        text = text.replace(old, new)
    return text


def number_value(text: str) -> Any:
    """The number (or list/tuple) the official `number_it` reads from `text`; None when it reads none."""
    text = _clean_units(text)
    try:
        value = _LatexNumber(text).parse()
        return None if value is None else _floatify(value)
    except _LatexError:
        pass  # sympy rejected it: the official code tries float(), then Python's eval, on the text itself
    if _floatify(text) is not None:
        return _floatify(text)
    value = _python_value(text)
    return value if isinstance(value, list | tuple) else _floatify(value)

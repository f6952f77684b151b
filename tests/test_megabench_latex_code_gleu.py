"""MEGA-Bench's LaTeX, program and Chinese GLEU metrics (engine/benchmarks/megabench_{latex,code,gleu}.py).

Their agreement with the official evaluator run in its own environment is recorded in docs/LOG.md; these tests pin
the rules and the quirks that change scores."""

import time
from pathlib import Path

import pytest

from engine import sandbox
from engine.benchmarks import megabench_code as mc
from engine.benchmarks import megabench_gleu as mg
from engine.benchmarks import megabench_latex as ml

# ------------------------------------------------------------------ LaTeX


@pytest.mark.parametrize("response, gold, expected", [
    ("x^2+2x+1", "(x+1)^2", 1),  # symbolic equality, not string equality
    (r"\frac{2}{4}", r"\frac{1}{2}", 1),
    (r"\(\sqrt{8}\)", r"2\sqrt{2}", 1),  # \( \) removed
    (r"\begin{equation}a+b\end{equation}", "b+a", 1),
    ("α+β", r"\alpha+\beta", 1),  # Unicode Greek -> LaTeX commands
    (r"\bar{AB}", r"\overline{AB}", 1),
    ("x+1", "x+2", 0),
    ("x=1", "x=2", 0),
    (r"\cdot", r"\cdot", 1),  # unparseable on both sides: the normalised strings are compared instead
    (r"\cdot", r"\times", 0),
    (None, "x", 0),
    ("x", 3, 0),
])
def test_latex_expr_equality(response, gold, expected):
    assert ml.latex_expr_equality(response, gold) == expected


def test_latex_metric_errors_score_zero():
    """Final sigma is in the official α-ω range but has no LaTeX name: the metric raises, and the field scores 0."""
    from engine.benchmarks.megabench import RULE_METRICS
    from engine.benchmarks.megabench_metrics import field_score

    with pytest.raises(KeyError):
        ml.latex_expr_equality("ς", "ς")
    assert field_score("latex_expr_equality", "ς", "ς", RULE_METRICS) == 0
    assert field_score("latex_expr_equality", "2x", "x+x", RULE_METRICS) == 1


def test_normalize_latex():
    assert ml.normalize_latex("ā + \\bar{b}_1") == "\\overline{a} + \\overline{b_1}"
    assert ml.normalize_latex("πr") == "\\pi r"
    assert ml.normalize_latex(r"\[\begin{pmatrix}[c]1\end{pmatrix}\]") == "1"


def test_parse_latex_is_quiet_and_uses_the_antlr_grammar(capsys):
    import sympy

    x = sympy.Symbol("x")
    parsed = ml.parse_latex(r"\frac{x}{2} + 1")
    assert parsed.equals(x / 2 + 1) and parsed.free_symbols == {x}
    assert capsys.readouterr().out == ""  # the runtime-version notice of the 4.11 grammar is silenced


def test_latex_timeout_falls_back_to_string_match(monkeypatch):
    def slow(text):
        time.sleep(5)

    monkeypatch.setattr(ml, "parse_latex", slow)
    monkeypatch.setattr(ml, "TIMEOUT_S", 1)
    start = time.perf_counter()
    assert ml.latex_expr_equality("a + b", "a+b") == 1  # simple_str_match of the normalised strings
    assert ml.latex_expr_equality("a + b", "b+a") == 0
    assert time.perf_counter() - start < 4


@pytest.mark.parametrize("response, gold, expected", [
    ("The answer is $x = 2$, so", "The answer is $x=2$, so", 1),
    ("area $r^2\\pi$", "area $\\pi r^2$", 1),
    ("area $r^2\\pi$ cm", "area $\\pi r^2$", 0),  # the text outside $...$ must match too
    ("area $2r$", "area $\\pi r^2$", 0),
    ("no math", "no-math.", 1),  # both LaTeX sides empty: string-equal
])
def test_text_with_latex_expr_equality(response, gold, expected):
    assert ml.text_with_latex_expr_equality(response, gold) == expected


# ------------------------------------------------------------------ programs

TIME_12H = ("h, m = map(int, input().split(':'))\nsuffix = 'AM' if h < 12 else 'PM'\n"
            "print(f'{h % 12 or 12}:{m:02d} {suffix}')")
CASES = [{"input": ["21:11"], "expected": "9:11 PM"}, {"input": ["09:05"], "expected": "9:05 AM"},
         {"input": ["00:00"], "expected": "12:00 AM\n"}]
MAIN = 'if __name__ == "__main__":\n    main()'


needs_sandbox = pytest.mark.skipif(sandbox.problem() is not None,
                                   reason=f"bubblewrap sandbox not usable here: {sandbox.problem()}")


@needs_sandbox
def test_program_judge_scores_the_fraction_of_passed_cases():
    assert mc.program_judge(TIME_12H, {"test_case": CASES}) == 1
    assert mc.program_judge(TIME_12H, {"test_case": CASES[0]}) == 1  # a single case may be a dict
    wrong = TIME_12H.replace("h % 12 or 12", "h % 12")
    assert mc.program_judge(wrong, {"test_case": CASES}) == pytest.approx(2 / 3)
    assert mc.program_judge(TIME_12H, {"test_case": []}) == 0
    with pytest.raises(TypeError, match="string"):
        mc.program_judge(None, {"test_case": CASES})


@pytest.mark.parametrize("code, expected", [
    # Without the exact main guard the code runs like exec(code) inside a function: top-level names are locals,
    # invisible from the functions it defines.
    ("def twice(s):\n    return s + s\ndef main():\n    print(twice(input()))\nmain()", False),
    ("def twice(s):\n    return s + s\ndef main():\n    print(twice(input()))\n" + MAIN, True),
    ("def twice(s):\n    return s + s\ndef main():\n    print(twice(input()))\nif __name__ == '__main__':\n"
     "    main()", False),  # single quotes are not the official guard
    ("import json\ndef main():\n    print(json.loads('1') and input() * 2)\nmain()", True),  # json is a module global
    ("def main():\n    print(input('your word: ') * 2)\n" + MAIN, True),  # the prompt is not echoed
    ("print(input() * 2)\nimport sys\nsys.exit(0)", False),  # any exit fails the case
    ("print(input() * 2)\ninput()", False),  # reading past the input is an error
    ("import sys\nprint(sys.stdin.read() + input() * 2)", True),  # stdin itself is empty
    ("import sys\nprint('noise', file=sys.stderr)\nsys.stdout.write(input() * 2)", True),
])
@needs_sandbox
def test_program_judge_execution_rules(code, expected):
    assert mc.program_judge(code, {"test_case": {"input": ["ab"], "expected": "abab"}}) == expected


@needs_sandbox
def test_program_judge_time_limit_and_forged_results(monkeypatch):
    monkeypatch.setattr(mc, "TIMEOUT_S", 0.5)
    start = time.perf_counter()
    assert mc.program_judge("while True:\n    pass", {"test_case": CASES[0]}) == 0
    assert time.perf_counter() - start < 5
    forged = 'import json, sys\nsys.__stdout__.write(json.dumps({"output": "9:11 PM"}) + "\\n")\nsys.exit()'
    assert mc.program_judge(forged, {"test_case": CASES[0]}) == 0
    # The program runs in the sandbox's own temporary folder, not ours (the attacks: tests/test_sandbox.py).
    ok, out = mc.run_case("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())", [])
    assert ok and out == sandbox.WORKDIR and not Path("left.txt").exists()


@needs_sandbox
def test_program_judge_contains_runaway_programs():
    """Output written straight to the real stdout goes nowhere (and is bounded by the file-size limit, not
    buffered in our memory); starting a process fails the case (the sandbox allows none)."""
    flood = "import os\nwhile True:\n    os.write(1, b'x' * 65536)"
    start = time.perf_counter()
    assert mc.run_case(flood, [])[0] is False
    assert time.perf_counter() - start < 10
    spawn = ("import subprocess, sys\np = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
             "print(p.pid)")
    ok, out = mc.run_case(spawn, [])
    assert not ok and "Errno 11" in out


@needs_sandbox
def test_program_judge_long_output_fails_as_officially():
    """The official child blocks on a result that overflows its queue's 64 KiB pipe and is killed at the time limit
    (measured with the official CodeTester: 65,510 characters pass, 65,515 fail)."""
    assert mc.run_case("print('x' * 65510)", []) == (True, "x" * 65510)
    ok, out = mc.run_case("print('x' * 65515)", [])
    assert not ok and out.startswith("time limit")


@needs_sandbox
def test_program_judge_string_input_is_fed_per_character():
    """The official feed joins `input` with newlines: a string gives one line per character."""
    code = "print(input() + input())"
    assert mc.program_judge(code, {"test_case": {"input": "34", "expected": "34"}}) == 1


# ------------------------------------------------------------------ GLEU


def test_sentence_gleu_by_hand():
    # 1- to 4-grams: 3 + 2 + 1 = 6 on each side; shared: a, b, (a, b).
    assert mg.sentence_gleu(list("abc"), list("abd")) == 0.5
    assert mg.sentence_gleu(list("abc"), list("abc")) == 1.0
    assert mg.sentence_gleu(list("ab"), list("abcd")) == 3 / 10  # divided by the larger count
    assert mg.sentence_gleu([], []) == 0.0


def test_gleu_cn():
    pytest.importorskip("jieba", reason="jieba is a dependency (setup.py); this checks the installed environment")
    assert mg.gleu_cn("我爱北京天安门", "我爱北京天安门") == 1.0
    assert 0 < mg.gleu_cn("我爱北京天安门", "我爱上海") < 0.5
    assert mg.gleu_cn(None, "我") == 0

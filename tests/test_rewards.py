"""engine/rewards.py: format and accuracy on real-world and adversarial answer strings, counters, judge hook."""

import threading

import pytest

from engine import rewards
from engine.rewards import Reward, RewardConfig, extract_answer, format_ok, score

ABCD = ["cat", "dog", "bird", "fish"]


def w(answer: str, think: str = "Let me look at the image.") -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


# (response, gold, choices, format 0/0.5, accuracy 0/1)
CASES = [
    # ---- format: malformed and adversarial
    (w("B"), "B", None, 0.5, 1.0),
    ("  \n" + w("B") + "\n\n", "B", None, 0.5, 1.0),
    ("<think></think><answer>B</answer>", "B", None, 0.5, 1.0),  # empty think is allowed
    (w("   "), "B", None, 0.0, 0.0),  # empty answer
    (w("B") + "<answer>C</answer>", "B", None, 0.0, 0.0),  # two answer blocks: whole text names B and C
    (w("B") + "<answer>B</answer>", "B", None, 0.0, 1.0),  # duplicated but consistent
    ("<think>so <answer>B</answer></think>", "B", None, 0.0, 1.0),  # answer only inside think
    ("Sure! " + w("B"), "B", None, 0.0, 1.0),  # text before
    (w("B") + " Hope this helps.", "B", None, 0.0, 1.0),  # text after
    ("<think>x</think> so <answer>B</answer>", "B", None, 0.0, 1.0),  # text between
    ("<think>reasoning\n<answer>B", "B", None, 0.0, 1.0),  # unclosed tags
    ("<think>x</think><answer>B", "B", None, 0.0, 1.0),
    ("<think>a<think>b</think></think><answer>B</answer>", "B", None, 0.0, 1.0),  # nested think
    ("<answer>B</answer><think>x</think>", "B", None, 0.0, 1.0),  # answer before think
    ("<think>x</think></think>\n<answer>B</answer>", "B", None, 0.0, 1.0),  # duplicated closing tag
    ("B", "B", None, 0.0, 1.0),  # no tags at all: format-incorrect but accurate
    ("<think>A is tempting but the answer is C.</think>\nThe answer is C", "C", None, 0.0, 1.0),
    # ---- multiple choice, letter gold
    (w("(B)"), "B", None, 0.5, 1.0),
    (w("B."), "B", None, 0.5, 1.0),
    (w("B)"), "B", None, 0.5, 1.0),
    (w("**B**"), "B", None, 0.5, 1.0),
    (w("b"), "B", None, 0.5, 1.0),
    (w("$\\boxed{B}$"), "B", None, 0.5, 1.0),
    (w("\\boxed{\\text{B}}"), "B", None, 0.5, 1.0),
    (w("The answer is B"), "B", None, 0.5, 1.0),
    (w("Answer: B"), "B", None, 0.5, 1.0),
    (w("option B"), "B", None, 0.5, 1.0),
    (w("The answer is (C) because option A ignores the shadow."), "C", None, 0.5, 1.0),
    (w("A total of 3 apples are visible, which matches option C."), "C", None, 0.5, 1.0),
    (w("A total of 3 apples are visible."), "A", None, 0.5, 0.0),  # article, not option A
    (w("I think it is D"), "D", None, 0.5, 1.0),
    (w("A or B"), "A", None, 0.5, 0.0),  # hedging
    (w("The answer is A or B"), "A", None, 0.5, 0.0),
    (w("A, B, C, D"), "A", None, 0.5, 0.0),  # lists every option
    (w("A. cat B. dog C. bird D. fish"), "B", ABCD, 0.5, 0.0),
    (w("(A) cat (B) dog"), "A", ABCD, 0.5, 0.0),
    (w("C"), "B", None, 0.5, 0.0),
    (w("The answer is a cat"), "A", None, 0.5, 0.0),  # lowercase "a" after the marker is an article
    (w("C. The bird is on the left."), "C", None, 0.5, 1.0),
    (w(""), "B", None, 0.0, 0.0),
    # ---- multiple choice with option texts
    (w("dog"), "B", ABCD, 0.5, 1.0),
    (w("  Dog. "), "B", ABCD, 0.5, 1.0),
    (w("B. dog"), "B", ABCD, 0.5, 1.0),
    (w("cat"), "B", ABCD, 0.5, 0.0),
    (w("B"), "dog", ABCD, 0.5, 1.0),  # gold given as option text
    (w("B"), "B", ["A. cat", "B. dog", "C. bird"], 0.5, 1.0),  # labelled choices
    (w("dog"), "B", ["A. cat", "B. dog", "C. bird"], 0.5, 1.0),
    # ---- numbers
    (w("3"), "3", None, 0.5, 1.0),
    (w("3.0"), "3", None, 0.5, 1.0),
    (w("7."), "7", None, 0.5, 1.0),
    (w("-2.5"), "-2.5", None, 0.5, 1.0),
    (w("2.5"), "-2.5", None, 0.5, 0.0),
    (w("1,234"), "1234", None, 0.5, 1.0),
    (w("1234"), "1,234", None, 0.5, 1.0),
    (w("3 cm"), "3", None, 0.5, 1.0),
    (w("12.5%"), "12.5", None, 0.5, 1.0),
    (w("50%"), "50", None, 0.5, 1.0),
    (w("0.5"), "50%", None, 0.5, 1.0),
    (w("$4.00"), "4", None, 0.5, 1.0),
    (w("\\boxed{3}"), "3", None, 0.5, 1.0),
    (w("$3$"), "3", None, 0.5, 1.0),
    (w("\\(3\\)"), "3", None, 0.5, 1.0),
    (w("x = 3"), "3", None, 0.5, 1.0),
    (w("1.5e3"), "1500", None, 0.5, 1.0),
    (w("60^\\circ"), "60", None, 0.5, 1.0),
    (w("There are 3 boxes of 14, so 42 apples."), "42", None, 0.5, 1.0),
    (w("\\boxed{42} (I first guessed 41)"), "42", None, 0.5, 1.0),
    (w("3.01"), "3", None, 0.5, 0.0),  # close but outside 1e-4 relative
    (w("3.0001"), "3", None, 0.5, 1.0),  # inside
    (w("1000.2"), "1000", None, 0.5, 0.0),
    (w("no idea"), "3", None, 0.5, 0.0),
    (w("4"), "3", None, 0.5, 0.0),
    # ---- fractions and LaTeX through math-verify
    (w("\\frac{1}{2}"), "0.5", None, 0.5, 1.0),
    (w("0.5"), "\\frac{1}{2}", None, 0.5, 1.0),
    (w("1/2"), "\\frac{1}{2}", None, 0.5, 1.0),
    (w("\\dfrac{2}{4}"), "1/2", None, 0.5, 1.0),
    (w("0.333"), "\\frac{1}{3}", None, 0.5, 0.0),
    (w("\\boxed{\\frac{\\sqrt{3}}{2}}"), "\\frac{\\sqrt{3}}{2}", None, 0.5, 1.0),
    (w("2^{1/2}"), "\\sqrt{2}", None, 0.5, 1.0),
    (w("$2\\pi$"), "2\\pi", None, 0.5, 1.0),
    (w("2"), "2\\pi", None, 0.5, 0.0),
    (w("So we get \\boxed{\\frac{x+1}{2}}."), "\\frac{1+x}{2}", None, 0.5, 1.0),
    (w("\\boxed{\\frac{1}{3}}"), "\\frac{1}{2}", None, 0.5, 0.0),
    (w("It is $\\frac{1}{2}$ of the cake"), "0.5", None, 0.5, 1.0),  # prose with inline LaTeX
    (w("\\frac{6}{2}"), "3 cm", None, 0.5, 1.0),
    (w("x + 1"), "1+x", None, 0.5, 1.0),
    # ---- plain strings
    (w("Paris."), "paris", None, 0.5, 1.0),
    (w("  the   Eiffel Tower "), "The Eiffel Tower", None, 0.5, 1.0),
    (w("London"), "Paris", None, 0.5, 0.0),
]


@pytest.mark.parametrize(("response", "gold", "choices", "fmt", "acc"), CASES)
def test_score_table(response, gold, choices, fmt, acc):
    r = score(response, gold, choices)
    assert (r.format, r.accuracy) == (fmt, acc), r
    assert r.total == r.format + r.accuracy
    assert not r.gold_unparseable


def test_format_ok_custom_tags():
    cfg = RewardConfig(think_open="<reason>", think_close="</reason>", answer_open="<ans>", answer_close="</ans>")
    assert format_ok("<reason>r</reason><ans>4</ans>", cfg)
    assert not format_ok(w("4"), cfg)
    r = score("<reason>r</reason><ans>4</ans>", "4", cfg=cfg)
    assert (r.format, r.accuracy, r.extracted) == (0.5, 1.0, "4")


def test_extract_answer():
    assert extract_answer(w(" 42 ")) == "42"
    assert extract_answer("<think>thinking about 7</think> 42") == "42"  # think removed from the fallback
    assert extract_answer("<think>only thoughts</think>") == "<think>only thoughts</think>"


@pytest.mark.parametrize("gold", ["", "   ", "\\frac{", "\\sqrt{"])
def test_unparseable_gold_counted_and_flagged(gold):
    before = rewards.num_gold_unparseable()
    r = score(w("3"), gold)
    assert r.gold_unparseable and r.accuracy == 0.0 and r.format == 0.5
    assert rewards.num_gold_unparseable() == before + 1
    r = score(w("3"), gold, cfg=RewardConfig(unparseable_gold_is_correct=True))
    assert r.gold_unparseable and r.accuracy == 1.0 and r.total == 1.5
    assert rewards.num_gold_unparseable() == before + 2


def test_weights_and_require_format():
    cfg = RewardConfig(format_weight=0.2, accuracy_weight=2.0)
    assert score(w("3"), "3", cfg=cfg) == Reward(0.2, 2.0, 2.2, False, "3", "number")
    strict = RewardConfig(require_format_for_accuracy=True)
    assert score("3", "3").accuracy == 1.0
    assert score("3", "3", cfg=strict).accuracy == 0.0


def test_judge_called_only_when_undecided():
    calls = []

    def judge(pred, gold):
        calls.append((pred, gold))
        return pred.startswith("a red")

    assert score(w("a red bus"), "red double-decker bus", judge=judge).accuracy == 1.0
    assert calls == [("a red bus", "red double-decker bus")]
    assert score(w("a blue car"), "red double-decker bus", judge=judge).accuracy == 0.0
    assert len(calls) == 2
    for resp, gold in [(w("B"), "B"), (w("C"), "B"), (w("4"), "3"), (w("1/2"), "0.5"), (w("Paris"), "paris")]:
        r = score(resp, gold, judge=judge)
        assert r.method != "judge"
    assert len(calls) == 2  # choice, number, math and exact string matches never ask the judge
    r = score(w("blue"), "red", judge=lambda p, g: None)  # None keeps the rule verdict
    assert (r.accuracy, r.method) == (0.0, "string")


def test_math_off_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(score(w("\\frac{1}{2}"), "0.5")))
    t.start()
    t.join()
    assert out[0].accuracy == 1.0 and out[0].method == "math"


def test_missing_math_verify_is_clear(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "math_verify":
            raise ImportError("no math_verify")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert score(w("3 cm"), "3").accuracy == 1.0  # numbers, choices and strings need no math-verify
    assert score(w("B"), "B").accuracy == 1.0
    with pytest.raises(RuntimeError, match="pip install math-verify"):
        score(w("\\frac{1}{2}"), "0.5")

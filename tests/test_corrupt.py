"""The five format corruptions: each fails the format check and keeps the reasoning and answer text."""

import random

import pytest

from engine.corrupt import CORRUPTIONS, corrupt, format_ok, format_ok_local, split_response

_REASONING = [
    "The area is $\\pi r^2 = \\pi \\cdot 3^2 = 9\\pi$.",
    "Let $f(x) = \\frac{x^{2}+1}{x}$; then $f'(x) = 1 - \\frac{1}{x^2}$ and \\{a, b\\} is a set.",
    "First paragraph: count the red blocks.\n\nSecond paragraph: there are 3 of them.\n\nThird: done.",
    "I think the answer is B, because the think-aloud says the answer cannot be A.",
    "Der Würfel hat 6 Flächen; 角度 is 30°, so sin θ = ½ → ✓.",
    "Using \\begin{align} x &= 2 \\\\ y &= 3 \\end{align} we add: x + y = 5.",
    "short",
    "Answer: not yet. Reasoning: see below.\n  indented line\n\ttabbed line",
    "Compare 0.5 < 0.75 and 3 > 2 & 1 <= 1.",
    "$$\\sum_{i=1}^{n} i = \\frac{n(n+1)}{2}$$ gives 55 for n = 10.",
]
_ANSWERS = ["B", "42", "9\\pi", "$\\frac{1}{2}$", "x = 2, y = 3", "(C) 3.5 cm", "yes", "think", "答案是 7", "-1e-3"]
_PADS = ["", " ", "\n", "\n\n", "  \n\t", " \n "]


def _responses(num: int = 240) -> list[tuple[str, str, str]]:
    """(response, R, A) triples: varied reasoning, answers and whitespace around and inside the tags."""
    rng = random.Random(1234)
    out = []
    for i in range(num):
        r = _REASONING[i % len(_REASONING)]
        if rng.random() < 0.3:
            r = r + "\n\n" + rng.choice(_REASONING)
        a = _ANSWERS[(i * 7 + i // len(_ANSWERS)) % len(_ANSWERS)]
        p = [rng.choice(_PADS) for _ in range(7)]
        resp = f"{p[0]}<think>{p[1]}{r}{p[2]}</think>{p[3]}<answer>{p[4]}{a}{p[5]}</answer>{p[6]}"
        out.append((resp, r, a))
    return out


RESPONSES = _responses()


def _in_order(text: str, first: str, second: str) -> bool:
    i = text.find(first)
    return i >= 0 and text.find(second, i + len(first)) >= 0


def test_generated_responses_are_well_formatted():
    assert len(RESPONSES) >= 200
    for resp, r, a in RESPONSES:
        assert format_ok(resp) and format_ok_local(resp), resp
        got_r, got_a = split_response(resp)
        assert (got_r.strip(), got_a.strip()) == (r, a)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruption_fails_format_and_keeps_content(kind):
    fn = CORRUPTIONS[kind]
    for resp, r, a in RESPONSES:
        out = fn(resp)
        assert not format_ok(out), (kind, out)
        assert not format_ok_local(out), (kind, out)
        assert _in_order(out, r.strip(), a.strip()), (kind, resp, out)
        assert fn(resp) == out  # pure


def test_corruption_shapes():
    resp = "<think>R1</think><answer>A1</answer>"
    assert CORRUPTIONS["no_tags"](resp) == "R1\n\nA1"
    assert CORRUPTIONS["no_answer_tags"](resp) == "<think>R1</think>\nA1"
    assert CORRUPTIONS["plain_markers"](resp) == "Reasoning: R1\n\nAnswer: A1"
    for kind in ("no_tags", "plain_markers"):
        assert "<" not in CORRUPTIONS[kind](resp)
    assert "<answer>" not in CORRUPTIONS["no_answer_tags"](resp)


@pytest.mark.parametrize("kind", ["misplaced", "broken_structure"])
def test_both_variants_are_used(kind):
    def signature(out: str) -> tuple:
        return out.endswith("</think>"), out.count("</think>"), out.count("</answer>")

    outs = [signature(CORRUPTIONS[kind](resp)) for resp, _, _ in RESPONSES]
    assert len(set(outs)) == 2 and min(outs.count(s) for s in set(outs)) > len(RESPONSES) / 4, outs


def test_corrupt_seeded_rng_is_deterministic_and_covers_all_kinds():
    def run(seed):
        rng = random.Random(seed)
        return [corrupt(resp, rng=rng) for resp, _, _ in RESPONSES]

    first, again = run(7), run(7)
    assert first == again
    assert run(8) != first
    kinds = [k for _, k in first]
    assert set(kinds) == set(CORRUPTIONS)
    assert min(kinds.count(k) for k in CORRUPTIONS) > len(RESPONSES) / 5 / 2  # roughly uniform
    for (resp, _, _), (rejected, kind) in zip(RESPONSES, first, strict=True):
        assert rejected == CORRUPTIONS[kind](resp)


def test_corrupt_explicit_kind():
    resp = RESPONSES[0][0]
    assert corrupt(resp, kind="no_tags") == (CORRUPTIONS["no_tags"](resp), "no_tags")
    with pytest.raises(ValueError, match="unknown kind.*no_tags"):
        corrupt(resp, kind="shuffle")


@pytest.mark.parametrize(
    "bad",
    [
        "no tags at all",
        "<think>r</think>",
        "<answer>a</answer>",
        "<answer>a</answer><think>r</think>",
        "<think>r</think><answer>a</answer> trailing text",
        "leading <think>r</think><answer>a</answer>",
        "<think>r</think>middle<answer>a</answer>",
        "<think>r<think>r</think><answer>a</answer>",
        "<think>r</think><answer>a</answer><answer>b</answer>",
        "<think>r</think><answer>a",
        "Reasoning: r\nAnswer: a",
    ],
)
def test_malformed_input_raises(bad):
    assert not format_ok(bad)
    with pytest.raises(ValueError, match="not well formatted") as exc:
        corrupt(bad, rng=random.Random(0))
    assert repr(bad[:20])[1:-1] in str(exc.value)
    for fn in CORRUPTIONS.values():
        with pytest.raises(ValueError):
            fn(bad)

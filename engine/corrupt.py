"""Format corruptions for SPECS self-distilled preference pairs (arXiv:2510.25801).

SPECS builds DPO pairs whose chosen side is a well-formatted response of the model itself,
`<think>R</think><answer>A</answer>`, and whose rejected side is the same response with its format broken:
the reasoning text R and the final answer text A are kept, so the pair differs only in format. The paper
says it uses five corruption types but does not list them; the five below are our choice:

  no_tags           every tag removed:                    "R\\n\\nA"
  no_answer_tags    only the answer tags removed:         "<think>R</think>\\nA"
  plain_markers     tags replaced by plain-text markers:  "Reasoning: R\\n\\nAnswer: A"
  misplaced         answer block nested inside think:     "<think>R\\n<answer>A</answer>\\n</think>"
                    or think closed after answer opened: "<think>R\\n<answer>A</think></answer>"
  broken_structure  an unclosed answer tag:               "<think>R</think>\\n<answer>A"
                    or a duplicated closing think tag:    "<think>R</think></think>\\n<answer>A</answer>"

`misplaced` and `broken_structure` each have two variants. The variant is picked by one bit of the
sha256 of the response, so every function stays pure (same input, same output) while a data set gets
both variants in about equal shares.

Guarantees (tests/test_corrupt.py checks them on a few hundred varied responses): the result fails
`format_ok`, and R.strip() then A.strip() appear in it as substrings, in that order. `format_ok` is the
reward's check (engine.rewards.format_ok, default tags) when that module imports, else the local twin
`format_ok_local` with the same rule; inputs must pass both.
"""

import hashlib
import random
import re
from collections.abc import Callable

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)

try:  # the reward's format check is the source of truth when it exists (engine/rewards.py)
    from engine.rewards import format_ok as _rewards_format_ok
except ImportError:
    _rewards_format_ok = None


def format_ok_local(response: str) -> bool:
    """Exactly one `<think>...</think>` followed by exactly one `<answer>...</answer>`, only whitespace outside."""
    if any(response.count(tag) != 1 for tag in TAGS):
        return False
    return _FORMAT_RE.fullmatch(response) is not None


def format_ok(response: str) -> bool:
    """The format check the corruptions must fail: engine.rewards.format_ok if present, else the local one."""
    if _rewards_format_ok is not None:
        return bool(_rewards_format_ok(response))
    return format_ok_local(response)


def split_response(response: str) -> tuple[str, str]:
    """(R, A): the raw text inside the think and answer tags of a well-formatted response.

    Raises:
        ValueError: the response is not well formatted (the message shows the start of it).
    """
    m = _FORMAT_RE.fullmatch(response)
    if m is None or not format_ok_local(response) or not format_ok(response):
        raise ValueError(
            f"response is not well formatted (want <think>R</think><answer>A</answer> with only whitespace "
            f"outside, one of each tag), got {_preview(response)}"
        )
    return m.group(1), m.group(2)


def _preview(text: str, num_chars: int = 200) -> str:
    return repr(text) if len(text) <= num_chars else repr(text[:num_chars]) + f"... ({len(text)} chars)"


def _variant(response: str) -> int:
    """0 or 1, a stable function of the response (not Python's salted hash)."""
    return hashlib.sha256(response.encode("utf-8")).digest()[0] & 1


def no_tags(response: str) -> str:
    r, a = split_response(response)
    return f"{r.strip()}\n\n{a.strip()}"


def no_answer_tags(response: str) -> str:
    r, a = split_response(response)
    return f"<think>{r}</think>\n{a.strip()}"


def plain_markers(response: str) -> str:
    r, a = split_response(response)
    return f"Reasoning: {r.strip()}\n\nAnswer: {a.strip()}"


def misplaced(response: str) -> str:
    r, a = split_response(response)
    if _variant(response) == 0:
        return f"<think>{r}\n<answer>{a}</answer>\n</think>"  # answer block inside the think block
    return f"<think>{r}\n<answer>{a}</think></answer>"  # think closed after the answer opened


def broken_structure(response: str) -> str:
    r, a = split_response(response)
    if _variant(response) == 0:
        return f"<think>{r}</think>\n<answer>{a}"  # unclosed answer tag
    return f"<think>{r}</think></think>\n<answer>{a}</answer>"  # duplicated closing think tag


CORRUPTIONS: dict[str, Callable[[str], str]] = {
    "no_tags": no_tags,
    "no_answer_tags": no_answer_tags,
    "plain_markers": plain_markers,
    "misplaced": misplaced,
    "broken_structure": broken_structure,
}


def corrupt(response: str, kind: str | None = None, rng: random.Random | None = None) -> tuple[str, str]:
    """Turn a well-formatted response into a format-violating one with the same reasoning and answer.

    Args:
        response: `<think>R</think><answer>A</answer>`, whitespace allowed between and inside the blocks.
        kind: one of CORRUPTIONS; None picks one uniformly with `rng`.
        rng: the generator for that pick; None uses the global `random` module (seeded by the caller).
            Pass a seeded `random.Random` for a reproducible sequence of kinds.

    Returns:
        (rejected, kind): the corrupted response and the name of the corruption applied.

    Raises:
        ValueError: `kind` is unknown, or `response` is not well formatted to begin with.
    """
    if kind is None:
        kind = (rng or random).choice(sorted(CORRUPTIONS))
    elif kind not in CORRUPTIONS:
        raise ValueError(f"corrupt(kind={kind!r}): unknown kind, allowed: {', '.join(CORRUPTIONS)}")
    rejected = CORRUPTIONS[kind](response)
    assert not format_ok(rejected), f"corruption {kind} produced a well-formatted response"
    return rejected, kind

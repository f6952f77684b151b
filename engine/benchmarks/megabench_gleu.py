"""MEGA-Bench's `gleu_cn` metric (the core task image_translation_en2cn): sentence GLEU of jieba's search-mode words.

Re-stated from the official evaluator (TIGER-AI-Lab/MEGA-Bench, `megabench/metrics/scoring/gleu.py`, commit
ee324ab, Apache-2.0), which segments both strings with `jieba.cut_for_search` and scores them with NLTK's
`sentence_gleu` (1- to 4-grams): the n-grams both sides share (with multiplicity) over the larger of the two n-gram
counts. For one reference the score is symmetric, so which side is called the reference does not matter. The
segmentation is jieba's own (a dependency, version 0.42.1 as officially); the GLEU arithmetic is ours and was checked
against NLTK 3.9.1 (docs/LOG.md).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

MAX_N = 4


def _ngrams(tokens: list[str]) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, MAX_N + 1) for i in range(len(tokens) - n + 1))


def sentence_gleu(reference: list[str], hypothesis: list[str]) -> float:
    """Shared 1- to 4-grams / max(n-grams of the hypothesis, n-grams of the reference); 0 when both are empty."""
    ref, hyp = _ngrams(reference), _ngrams(hypothesis)
    total = max(sum(ref.values()), sum(hyp.values()))
    return sum((ref & hyp).values()) / total if total else 0.0


def _words(text: str) -> list[str]:
    import jieba  # imported on first use: loading its dictionary takes a few seconds

    jieba.setLogLevel(60)  # it logs its dictionary loading at INFO
    return list(jieba.cut_for_search(text))


def gleu_cn(response: Any, gold: Any) -> float:
    """GLEU of the response against the gold translation, both segmented by jieba; 0 for a non-string side."""
    if not isinstance(response, str) or not isinstance(gold, str):
        return 0
    return sentence_gleu(_words(response), _words(gold))


METRICS = {"gleu_cn": gleu_cn}

"""MEGA-Bench's `constrained_generation` metric (18 core tasks: poetry_*, contain_*, multi_contain_*, xor_images,
autorater_artifact_reason): every constraint of the query's eval_context must hold; the score is their minimum.

The rules are re-stated from the official evaluator (TIGER-AI-Lab/MEGA-Bench, `megabench/metrics/scoring/
constrained_generation.py` and `parsing/common/parsers.py`, commit ee324ab, Apache-2.0); the code is ours. They
use the same libraries as the official code, because the scores depend on their data:
- "contain" constraints count a lemmatised phrase in each lemmatised sentence: NLTK's `sent_tokenize` and
  `word_tokenize` (punkt_tab model) and WordNet's noun lemmas (`WordNetLemmatizer`); the count is a substring count
  ("cat" is found in "catalog"), per sentence, sentences numbered from 1 for the position constraints;
- syllables, rhymes and iambic meter read CMUdict through `pronouncing` (0.3.0; the official 0.2.0 differs only in
  `rhymes()`, unused here, and an import of pkg_resources, which new setuptools lack), with the official
  extra words and suffix/prefix guesses for words CMUdict lacks;
- "length" counts `\\b\\w+\\b` words; acrostics compare the first letters of lines (or of every word).
NLTK's data is not on PyPI: `python -m nltk.downloader punkt_tab wordnet` fetches it. Without it these tasks are
left out (`available()` is False and megabench.py keeps the metric unsupported, saying so).

Where the official code raises (a malformed constraint, an unknown length operator, an empty word in an
alliteration line), its evaluator stops; here the query scores 0. Each constraint has the official 10 s limit
(SIGALRM, in the main thread): past it, that constraint scores 0. Checked against the official code, both running
on the same NLTK data (docs/LOG.md).
"""

from __future__ import annotations

import ast
import collections
import functools
import itertools
import re
from typing import Any

from engine.benchmarks.megabench_metrics import TimeLimitError, str_to_iterable, time_limit

TIMEOUT_S = 10  # per constraint, as officially
NLTK_DATA_HINT = "python -m nltk.downloader punkt_tab wordnet"

# Pronunciations the official code adds for words CMUdict lacks.
_EXTRA_PHONES = {
    "'gainst": ["G EH1 N S T", "G EY1 N S T"], "'midst": ["M IH1 D S T"], "'mongst": ["M AH1 NG S T"],
    "'neath": ["N IY1 TH"], "beguiles": ["B IH0 G AY1 L Z"], "cerulean": ["S ER0 UW1 L IY0 AH0 N"],
    "doggo": ["D AO1 G OW0"], "downtorn": ["D AW1 N T AO2 R N"], "enthrall": ["EH0 N TH R AO1 L"],
    "fam'ly": ["F AE1 M L IY0"], "fiery": ["F AY1 ER0 IY0", "F AY1 R IY0"], "flits": ["F L IH1 T S"],
    "furred": ["F ER1 D"], "kneels": ["N IY1 L Z"], "o'er": ["OW1 ER0"], "orbs": ["AO1 R B Z"],
    "quenched": ["K W EH1 N CH D"], "quietude": ["K W AY1 AH0 T UW0 D"], "retold": ["R IY0 T OW1 L D"],
    "scurries": ["S K ER1 IY0 Z"], "sunbeams": ["S AH1 N B IY2 M Z"], "syncs": ["S IH1 NG K S"],
    "'twixt": ["T W IH1 K S T"],
}


@functools.cache
def available() -> bool:
    """Whether NLTK, its punkt_tab and WordNet data, and pronouncing can be used here."""
    try:
        import pronouncing  # noqa: F401
        from nltk.stem import WordNetLemmatizer
        from nltk.tokenize import sent_tokenize

        sent_tokenize("A test. Another one.")
        WordNetLemmatizer().lemmatize("tests", "n")
    except Exception:  # missing data is a LookupError; a broken install can raise anything: not available either
        return False
    return True


# ------------------------------------------------------------------ words, lemmas, sentences


@functools.cache
def _lemmatizer():
    from nltk.stem import WordNetLemmatizer

    return WordNetLemmatizer()


def _lemmatize_phrase(phrase: str) -> str:
    """The phrase lower-cased, NLTK-tokenised and each token replaced by its WordNet noun lemma, space-joined. (The
    official code's extra "-ies"/"-ves" rules rewrite a lemma to itself, so they are left out.)"""
    from nltk.tokenize import word_tokenize

    return " ".join(_lemmatizer().lemmatize(word, "n") for word in word_tokenize(phrase.lower()))


def _occurrences(text: str, phrase: str) -> tuple[int, list[tuple[int, int]]]:
    """(total count, [(sentence number from 1, count)]) of the lemmatised phrase in each lemmatised sentence."""
    from nltk.tokenize import sent_tokenize

    target = _lemmatize_phrase(phrase)
    found = []
    for number, sentence in enumerate(sent_tokenize(text), 1):
        count = _lemmatize_phrase(sentence).count(target)
        if count > 0:
            found.append((number, count))
    return sum(count for _, count in found), found


# ------------------------------------------------------------------ pronunciations


def _cmu(word: str) -> list[str]:
    import pronouncing

    return pronouncing.phones_for_word(word)


def phones_for_word(text: str) -> list[str]:
    """CMUdict pronunciations, with the official extra words and guesses for a missing word: "'s" adds " Z";
    otherwise "-ed" (D, T, AH0 D, IH0 D), a plural "-s"/"-es" when the stem is known, "-es" otherwise, an "un-"
    prefix (AH0 N) and an elided leading "'" ("'tis" read as "atis" minus its AH0)."""
    text = text.replace("\u2019", "'").lower()
    suffixes, prefixes, drop_prefixes = [""], [""], [""]
    if text.endswith("'s"):
        suffixes, text = [" Z"], text.removesuffix("'s")
    if text in _EXTRA_PHONES:
        return [pron + suffix for pron, suffix in itertools.product(_EXTRA_PHONES[text], suffixes)]
    found = _cmu(text)
    if not found:
        if suffixes[0] != "":
            return []  # "'s" on an unknown word: no guess
        if text.endswith("ed"):
            suffixes, text = [" D", " T", " AH0 D", " IH0 D"], text.removesuffix("ed")
        elif text.endswith("s"):
            if _cmu(text.removesuffix("s")):
                suffixes = [" S", " Z", " AH0 Z", " IH0 Z"] if text.endswith("es") else [" S", " Z"]
                text = text.removesuffix("s")
            elif text.endswith("es"):
                suffixes, text = [" AH0 Z", " IH0 Z"], text.removesuffix("es")
        if text.startswith("un"):
            prefixes, text = ["AH0 N "], text.removeprefix("un")
        elif text.startswith("'") and _cmu("a" + text.removeprefix("'")):
            drop_prefixes, text = ["AH0 "], "a" + text.removeprefix("'")
        found = _cmu(text)
    return [(prefix + pron + suffix).removeprefix(drop)
            for prefix, pron, suffix, drop in itertools.product(prefixes, found, suffixes, drop_prefixes)]


def _rhyming_part(phones: str) -> str:
    """From the last stressed-or-unstressed vowel to the end, digits removed. As officially, the first phone is
    never taken as that vowel: a word whose only vowel comes first keeps all its phones."""
    parts = phones.split()
    for i in range(len(parts) - 1, 0, -1):
        if parts[i][-1] in "012":
            phones = " ".join(parts[i:])
            break
    return re.sub(r"\d", "", phones)


def _syllable_counts(line: str) -> list[int]:
    """The syllable count of every combination of the words' pronunciations (none if a word has none)."""
    import pronouncing

    options = [phones_for_word(word) for word in line.split()]
    return [sum(pronouncing.syllable_count(p) for p in combo) for combo in itertools.product(*options)]


def _stress_patterns(word: str) -> list[list[int]]:
    import pronouncing

    patterns = {tuple(int(s) for s in pronouncing.stresses(p)) for p in phones_for_word(word)}
    return [list(p) for p in patterns]  # the official set, iterated the same way


_IAMBIC_PAIRS = {(2, 1), (0, 2), (0, 1), (0, 0), (1, 1), (2, 2)}


def _is_iambic(line: str) -> bool:
    """Whether some choice of pronunciations splits the line's stresses into iambic pairs (an even total)."""
    words = line.split()
    options = [_stress_patterns(word) for word in words]

    def search(index: int, syllables: int, previous: int) -> bool:
        if index == len(words):
            return syllables % 2 == 0
        for pattern in options[index]:
            used = 0
            if syllables % 2 != 0:  # this word's first syllable completes the previous word's open pair
                if (previous, pattern[used]) not in _IAMBIC_PAIRS:  # an empty pattern raises IndexError here
                    continue
                used += 1
            rest = pattern[used:]
            pairs = list(zip(rest[0::2], rest[1::2], strict=False))[:len(rest) // 2]
            if any(pair not in _IAMBIC_PAIRS for pair in pairs):
                continue
            used += 2 * len(pairs)
            if used < len(pattern):  # one syllable left open for the next word
                if search(index + 1, syllables + used + 1, pattern[used]):
                    return True
            elif search(index + 1, syllables + used, -1):
                return True
        return False

    return search(0, 0, -1)


# ------------------------------------------------------------------ constraints


def _parse_constraint(key: str, value: str) -> dict[str, Any]:
    """"contain1##position" + "[cat]##2" -> {"contain": "[cat]", "position": 2}: "##"-separated keys (trailing digits
    dropped, lower-cased) and values (quotes stripped, digit strings as int)."""
    keys = [re.sub(r"\d+$", "", k) for k in key.strip().split("##")]
    values: list[Any] = [v.strip().strip('"').strip() for v in value.strip().split("##")]
    values = [int(v) if v.isdigit() else v for v in values]  # str.isdigit admits "²", which int() rejects: 0
    if len(keys) != len(values):
        raise ValueError(f"constraint {key!r}: {len(keys)} keys but {len(values)} values")
    return {k.lower(): v for k, v in zip(keys, values, strict=True)}


def _nested_list(text: str) -> Any:
    """The official parse_nested_str_list: quote every word, then read a Python literal; the text itself if that
    fails (the caller then iterates over its characters)."""
    try:
        return ast.literal_eval(re.sub(r"(\w+)", r'"\1"', text))
    except (ValueError, SyntaxError):
        return text


def _syllable_ranges(text: str) -> list[list[int]]:
    """"575" -> [[5, 5], [7, 7], [5, 5]]; "[7,10]5" -> [[7, 10], [5, 5]]; a space is a [0, 0] (blank) line."""
    out = []
    for chunk in re.findall(r"(?:\[\d+(?:,\s*\d+)?\]|\d| )", text.strip()):
        chunk = chunk.strip("[]")
        if "," in chunk:
            out.append(list(map(int, chunk.split(","))))
        elif chunk == " ":
            out.append([0, 0])
        else:
            out.append([int(chunk), int(chunk)])
    return out


def _contain(response: str, key: str, value: str) -> int:
    parsed = _parse_constraint(key, value)
    response = response.replace("**", "")
    records: dict[tuple, list[tuple[int, int]]] = {}
    if "contain_only" in parsed:  # exactly one of several item groups may occur
        satisfied = 0
        for group in _nested_list(parsed["contain_only"]):
            count, where = 0, []
            for item in group:
                n, found = _occurrences(response, item)
                count, where = count + n, where + found
            if count > 0:
                satisfied += 1
                records[tuple(group)] = where
        score = 1 if satisfied == 1 else 0
    else:  # any of the items occurs
        items = str_to_iterable(list, parsed["contain"])
        count, where = 0, []
        for item in items:
            n, found = _occurrences(response, item)
            count, where = count + n, where + found
        if count > 0:
            records[tuple(items)] = where
        score = 1 if count > 0 else 0
    if score > 0:
        where = next(iter(records.values()))
        if "position_only" in parsed:
            return 1 if len(where) == 1 and where[0][0] == parsed["position_only"] else 0
        if "position" in parsed:
            score = 1 if parsed["position"] in [number for number, _ in where] else 0
        if "times" in parsed:  # decides alone, even after a failed position
            score = 1 if sum(n for _, n in where) == parsed["times"] else 0
    return score


def _length(response: str, value: str) -> int:
    try:
        bound = int(value[1:])
    except ValueError:
        return 0
    words = len(re.findall(r"\b\w+\b", response))
    if value[0] == "<":
        return 1 if words < bound else 0
    if value[0] == ">":
        return 1 if words > bound else 0
    raise ValueError(f"length constraint {value!r}: expected < or >")  # the official code fails here too


def _acrostic(response: str, key: str, value: str) -> int:
    lines = response.replace("**", "").strip().lower().split("\n")
    if len(lines) != len(value):
        return 0
    every_word = "acrostic_alliteration" in key
    for line, letter in zip(lines, value.lower(), strict=False):
        line = line.strip()
        if letter == " ":
            if line != "":
                return 0
        elif not line:
            return 0
        elif every_word:
            if not all(word[0] == letter for word in line.split(" ")):  # a double space raises IndexError
                return 0
        elif line[0] != letter:
            return 0
    return 1


def _poem_lines(response: str) -> list[str]:
    """The official clean-up for syllables, rhymes and meter: punctuation dropped, dashes to spaces, a "(A)"-style
    rhyme letter at a line end dropped, lower case, split on newlines."""
    response = response.strip()
    for char in ".,!?:;\"":
        response = response.replace(char, "")
    response = response.replace("-", " ").replace("\u2014", " ")
    response = re.sub(r" *\(\w\) *(?=\n|$)", "", response)
    return response.lower().split("\n")


def _syllables(lines: list[str], value: str) -> int:
    ranges = _syllable_ranges(value)
    if len(lines) != len(ranges):
        return 0
    try:
        ok = all(any(low <= count <= high for count in _syllable_counts(line))
                 for line, (low, high) in zip(lines, ranges, strict=True))
    except IndexError:
        ok = False
    return 1 if ok else 0


def _rhymes(lines: list[str], scheme: str) -> int:
    """Lines with the same letter share a rhyming part; lines with different letters share none; a " " in the
    scheme is a blank line."""
    if len(lines) != len(scheme):
        return 0
    last_words = [line.split()[-1] if line != "" else "" for line in lines]  # a line of spaces raises IndexError
    words_of = collections.defaultdict(set)
    for letter, word in zip(scheme, last_words, strict=True):
        if letter == " ":
            if word != "":
                return 0
        else:
            words_of[letter].add(word)
    parts_of = {}
    for letter, words in words_of.items():
        common = set.intersection(*({_rhyming_part(p) for p in phones_for_word(word)} for word in words))
        if not common:
            return 0
        parts_of[letter] = common
    if any(parts_of[a] & parts_of[b] for a, b in itertools.combinations(parts_of, 2)):
        return 0
    return 1


def check_constraint(response: str, key: str, value: str) -> int:
    """1 if `response` meets the constraint `key` = `value` of an eval_context, else 0 (raises on malformed
    constraints, as the official code does)."""
    if value.strip() == "":
        return 1  # a placeholder constraint
    if "contain" in key:
        return _contain(response, key, value)
    if "length" in key:
        return _length(response, value)
    if "acrostic" in key:
        return _acrostic(response, key, value)
    lines = _poem_lines(response)
    if key == "syllables":
        return _syllables(lines, value)
    if key == "rhyming_scheme":
        return _rhymes(lines, value)
    if key == "poetry_meter":
        return 1 if all(_is_iambic(line) for line in lines) else 0
    return 0


def constrained_generation(response: Any, eval_context: dict) -> int:
    """The minimum over the eval_context's constraints (each limited to TIMEOUT_S seconds, 0 past it)."""
    scores = []
    for key, value in eval_context.items():
        try:
            with time_limit(TIMEOUT_S):
                scores.append(check_constraint(response, key, value))
        except TimeLimitError:
            scores.append(0)
    return min(scores)


CONTEXT_METRICS = {"constrained_generation": constrained_generation}

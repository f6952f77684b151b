"""MEGA-Bench's constrained_generation metric (engine/benchmarks/megabench_constrained.py).

Its "contain" constraints need NLTK's punkt_tab and WordNet data, which is not on PyPI; these tests write a stand-in
in the same formats (tests/nltk_toy_data.py) and run in a subprocess pointed at it (NLTK_DATA), so the test process's
own NLTK state is left alone. Agreement with the official code on that data is in docs/LOG.md."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.benchmarks import megabench as mb
from engine.benchmarks import megabench_constrained as mcg

from .nltk_toy_data import write_nltk_data
from .test_bench_megabench import _hf_dir

ROOT = Path(__file__).resolve().parents[1]

HAIKU = "An old silent pond\nA frog jumps into the pond\nSplash! Silence again"
CASES = [
    # (response, eval_context, expected)
    (HAIKU, {"syllables": "575", "contain": "[frog]"}, 1),
    (HAIKU, {"syllables": "577", "contain": "[frog]"}, 0),  # the last line has 5 syllables
    (HAIKU, {"syllables": "575", "contain": "[toad, newt]"}, 0),
    ("I saw a cat. The kittens played.", {"contain1##position": "[kitten]##2"}, 1),  # plural lemmatised
    ("I saw a cat. The kittens played.", {"contain1##position": "[kitten]##1"}, 0),
    ("Mice ran. A mouse hid.", {"contain##times": "[mouse]##2"}, 1),  # irregular plural from WordNet's exceptions
    ("Mice ran. A mouse hid.", {"contain##times": "[mouse]##1"}, 0),
    ("Dr. Smith met a dog. It ran.", {"contain##position_only": "[dog]##1"}, 1),  # "Dr." does not end a sentence
    ("A catalog.", {"contain": "[cat]"}, 1),  # a substring count, as officially
    ("a cat sat", {"contain_only": "[[cat], [dog]]"}, 1),
    ("a cat sat with a dog", {"contain_only": "[[cat], [dog]]"}, 0),  # more than one group occurs
    ("the cat\nin a hat\nsaw a dog\non a log", {"rhyming_scheme": "AABB"}, 1),
    ("the cat\nin a hat\nsaw a dog\non a log", {"rhyming_scheme": "ABAB"}, 0),
    ("the cat\nin a hat\nsaw a cat\non a log", {"rhyming_scheme": "AABC"}, 0),  # B and A share a rhyme
    ("Cats\nAre\n**Tall**", {"acrostic": "cat"}, 1),
    ("Cats\nAre\nTall\nToo", {"acrostic": "cat"}, 0),  # one line too many
    ("big bold bears\nrun rapidly", {"acrostic_alliteration": "br"}, 1),
    ("big bold cats\nrun rapidly", {"acrostic_alliteration": "br"}, 0),
    ("one two three", {"length1": "<5", "length2": ">2"}, 1),
    ("one two three", {"length1": "<5", "length2": ">3"}, 0),  # the minimum over constraints
    ("shall i compare thee to a summers day", {"poetry_meter": "iambic"}, 1),
    ("happy happy happy", {"poetry_meter": "iambic"}, 0),  # trochees
    ("anything", {"contain": ""}, 1),  # an empty constraint is a placeholder
]


def _run(tmp_path: Path, body: str) -> object:
    """Run `body` (which sets `result`) in a fresh interpreter on the NLTK stand-in; return `result`."""
    data = write_nltk_data(tmp_path / "nltk_data")
    script = "import json, warnings\nwarnings.simplefilter('ignore')\n" + textwrap.dedent(body)
    script += "\nprint(json.dumps(result))\n"
    env = {**os.environ, "NLTK_DATA": str(data), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_constraints_on_nltk_stand_in(tmp_path):
    result = _run(tmp_path, f"""
        from engine.benchmarks.megabench_constrained import available, constrained_generation
        assert available()
        result = [constrained_generation(r, c) for r, c, _ in {CASES!r}]
    """)
    assert result == [expected for _, _, expected in CASES]


def test_phones_and_rhymes():
    pytest.importorskip("pronouncing", reason="pronouncing is a dependency (setup.py)")
    assert mcg.phones_for_word("cat's") == [p + " Z" for p in mcg._cmu("cat")]
    assert mcg.phones_for_word("o'er") == ["OW1 ER0"]  # the official extra words
    assert mcg.phones_for_word("xqzt's") == []  # no guess for an unknown word with "'s"
    assert mcg._rhyming_part("K AE1 T") == "AE T"
    assert mcg._rhyming_part("AY1") == "AY1".rstrip("1")  # a lone first vowel keeps the whole word
    assert mcg._syllable_ranges("[7,10]5 3") == [[7, 10], [5, 5], [0, 0], [3, 3]]


def test_megabench_rows_need_the_data(tmp_path):
    """Without NLTK's data the 18 tasks are left out with the download command; with it they are scored."""
    root = _hf_dir(tmp_path / "hf")
    haiku = mb.load(root)
    row = {r.id: r for r in haiku}["poetry_haiku/0"]
    assert (row.meta["unsupported_metrics"] == ["constrained_generation"]) == (not mcg.available())
    if not mcg.available():
        with pytest.raises(ValueError, match="nltk.downloader punkt_tab wordnet"):
            mb.score(row, "a poem")
    # The fixture row asks for 5-7-5 syllables and a hamster or a paw.
    poem = "A hamster sleeps now\nIn the corner of the cage\nDreaming of seeds now"
    result = _run(tmp_path, f"""
        from engine.benchmarks import megabench as mb
        rows = {{r.id: r for r in mb.load({str(root)!r})}}
        row = rows["poetry_haiku/0"]
        result = [row.meta["scorable"], mb.score(row, {poem!r}), mb.score(row, "A hamster")]
    """)
    assert result == [True, 1.0, 0.0]

"""A tiny stand-in for NLTK's data (punkt_tab English and WordNet) in their file formats, for tests only.

NLTK's real data is not on PyPI, so tests of code that calls `sent_tokenize`, `word_tokenize` and
`WordNetLemmatizer` write this instead: an untrained punkt model with a few abbreviations, and a WordNet whose noun
index holds the given nouns (one synset each) with a handful of irregular plurals."""

from pathlib import Path

NOUNS = ("bird", "box", "bus", "cat", "child", "city", "dog", "fur", "glass", "hamster", "house", "kitten", "knife",
         "leaf", "light", "man", "moon", "mouse", "night", "ox", "paw", "puppy", "rodent", "seed", "sky", "star",
         "sun", "tail", "tree", "whisker", "wife", "wolf", "woman")
IRREGULAR = {"mice": "mouse", "children": "child", "men": "man", "women": "woman", "oxen": "ox", "leaves": "leaf",
             "wolves": "wolf", "wives": "wife", "knives": "knife"}


def write_nltk_data(root: Path, nouns=NOUNS) -> Path:
    """Write the stand-in under `root` (use it as NLTK_DATA) and return `root`."""
    punkt = root / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True, exist_ok=True)
    (punkt / "collocations.tab").write_text("")
    (punkt / "sent_starters.txt").write_text("however\nthe\n")
    (punkt / "abbrev_types.txt").write_text("dr\nmr\nmrs\n")
    (punkt / "ortho_context.tab").write_text("")
    wordnet = root / "corpora" / "wordnet"
    wordnet.mkdir(parents=True, exist_ok=True)
    (wordnet / "lexnames").write_text("00\tadj.all\t3\n01\tadj.pert\t3\n02\tadv.all\t4\n03\tnoun.Tops\t1\n")
    words = {"noun": sorted(set(nouns)), "verb": ["jump", "run"], "adj": ["big", "red"], "adv": ["fast"]}
    for suffix, tag in (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r")):
        lines = ["  1 A stand-in WordNet index for tests."]
        lines += [f"{word} {tag} 1 0 1 0 {1000 + i:08d}" for i, word in enumerate(words[suffix])]
        (wordnet / f"index.{suffix}").write_text("\n".join(lines) + "\n")
        (wordnet / f"data.{suffix}").write_text("  1 WordNet 3.0 Copyright 2006 by Princeton University (stand-in)\n")
        exceptions = "".join(f"{k} {v}\n" for k, v in IRREGULAR.items()) if suffix == "noun" else ""
        (wordnet / f"{suffix}.exc").write_text(exceptions)
    (wordnet / "index.sense").write_text("")
    (wordnet / "cntlist.rev").write_text("")
    return root

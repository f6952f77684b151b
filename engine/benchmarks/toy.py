"""The toy world's test splits as a benchmark (recipes/tiny.toml): `data/test.parquet` (in distribution) and
`data/test_ood.parquet` (task families held out of training).

Unlike the real benchmarks, `BenchRow.images` holds decoded PIL images: the toy stores PNG bytes inside the
parquet file and there is no image directory. Scoring is the training reward's accuracy rule (engine/rewards.py).
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from engine import rewards
from engine.benchmarks import BenchRow

NAME = "toy"
JUDGE_NOTE = ""


def load(path: str | Path) -> list[BenchRow]:
    """Rows of a toy split parquet file (id, task, problem, answer, choices, images)."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"toy benchmark: {path} is not a file; point at a toy world split, e.g. "
                         f"'world:data/test.parquet'")
    ds = datasets.Dataset.from_parquet(str(path)).with_format("arrow")
    rows = []
    for batch in ds.iter(batch_size=256):
        for r in batch.to_pylist():
            images = [Image.open(io.BytesIO(im["bytes"])) for im in r["images"] or []]
            rows.append(BenchRow(id=str(r["id"]), problem=r["problem"], images=images, answer=str(r["answer"]),
                                 category=r.get("task") or "", choices=r.get("choices") or None))
    return rows


def is_correct(row: BenchRow, response: str) -> bool:
    return rewards.score(response, row.answer, row.choices).accuracy > 0

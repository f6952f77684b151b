"""Prediction files of an eval stage: `<stage>/predictions/<model>/<benchmark>.jsonl`, one JSON object a row.

Greedy predictions and, with `samples = k`, sampled ones in `<benchmark>.samples.jsonl` (`sampled_path`).
Written by engine/stages/eval.py (rank 0 appends a chunk of rows at a time, flushed and fsynced, so a crash loses
at most the chunk being written) and read back by it to resume and by engine/report.py to score. A row is a dict
with at least `id`, `category`, `score` (0..1), `response`, `finish_reason` and `error`.
"""

import json
from pathlib import Path

from engine import atomic


def predictions_path(stage_dir: Path, model: str, benchmark: str) -> Path:
    return stage_dir / "predictions" / model / f"{benchmark}.jsonl"


def sampled_path(stage_dir: Path, model: str, benchmark: str) -> Path:
    """The sampled responses (`samples = k`): `<stage>/predictions/<model>/<benchmark>.samples.jsonl`, one line a
    row with its k responses (`n`, `temperature`, `top_p`, and per sample `scores`, `judge`, `format`, `responses`,
    `finish_reasons`; `error`)."""
    return predictions_path(stage_dir, model, benchmark + ".samples")


def read_predictions(path: Path) -> dict[str, dict]:
    """id -> prediction; a last line cut short by a crash is ignored (that row is predicted again)."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                p = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[p["id"]] = p
    return out


def drop_partial_line(path: Path) -> None:
    """Cut a last line left unfinished by a crash, so that the next append starts on a line of its own."""
    if path.exists():
        text = path.read_text()
        if text and not text.endswith("\n"):
            atomic.write_text(path, text[:text.rfind("\n") + 1])


def append_predictions(path: Path, rows: list[dict]) -> None:
    """Append rows and make them durable before returning: a rerun trusts every complete line it finds. A failed
    append (a full disk: DiskFullError) is cut back, leaving only whole rows."""
    atomic.append_text(path, "".join(json.dumps(row) + "\n" for row in rows))

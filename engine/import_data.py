"""Convert a released training set into our row schema (engine/data.py): id, problem, answer, images, choices,
answer_type, data_source. Local files only; nothing is downloaded.

    python -m engine.import_data orsta SRC OUT.parquet
    python -m engine.import_data hf SRC OUT.parquet --problem question --answer solution [--images image ...]

Kinds:
  orsta  The Orsta-Data-47k release of V-Triune ("One RL to See Them All", MiniMax-AI/One-RL-to-See-Them-All;
         huggingface.co/datasets/One-RL-to-See-Them-All/Orsta-Data-47k), read from its dataset card and its
         verl loader (verl/utils/dataset/rl_dataset.py) and verifiers (reward_server/verify.py). Columns:
         `data_source` (str), `images` (list of Image: {bytes, path}), `prompt` (chat messages [{content, role}];
         the last user message holds the question with `<image>` placeholders), `ability` (str), `reward_model`
         (struct: answer, ground_truth, accuracy_ratio, format_ratio, verifier "mathverify" | "detection",
         verifier_parm), optional `extra_info` (struct with `index`). Mapped: problem = the last user message,
         answer = reward_model.ground_truth without an `<answer>` wrapper, answer_type = "" for mathverify rows
         (the gold's shape decides: choice, number, math, or open for the judge) and "boxes" for detection and
         grounding rows (scored by IoU, engine/reward_boxes.py), data_source and ability kept.
  hf     Any Hugging Face dataset saved locally (a `save_to_disk` directory, or parquet / jsonl / arrow files):
         name its columns with --problem, --answer and optionally --images, --choices, --id, --answer-type,
         --data-source; other columns are dropped.

A source missing a required column stops with the columns it has; nothing is written until every row converted.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import datasets

OUT_COLUMNS = ("id", "problem", "answer", "images", "choices", "answer_type", "data_source")
_ANSWER_TAG = re.compile(r"^\s*<answer>(.*)</answer>\s*$", re.DOTALL)
_VERIFIER_TYPES = {"mathverify": "", "detection": "boxes"}


def read_local(src: str, split: str = "train") -> datasets.Dataset:
    """A local dataset: a `save_to_disk` directory, a directory of data files, or one parquet/jsonl/arrow file."""
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{src}: no such file or directory (nothing is downloaded: give a local copy)")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        data = datasets.load_from_disk(str(path))
        return data[split] if isinstance(data, datasets.DatasetDict) else data
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl",
                                                                                             ".json", ".arrow"))
    if not files:
        raise ValueError(f"{src}: no .parquet, .jsonl, .json or .arrow files")
    if split != "train":  # the release's layout: data/<split>-*.parquet
        files = [f for f in files if f.name.startswith(split)] or files
    builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}[files[0].suffix]
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")


def _need(rows: datasets.Dataset, columns: list[str], src: str) -> None:
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise ValueError(f"{src}: missing column(s) {missing}; it has {rows.column_names}")


def _question(messages, row: int) -> str:
    users = [m["content"] for m in messages or [] if m.get("role") == "user"]
    if not users:
        raise ValueError(f"row {row}: the prompt has no user message: {messages!r:.200}")
    return users[-1]


def convert_orsta(rows: datasets.Dataset, src: str = "orsta") -> datasets.Dataset:
    """Orsta-Data-47k rows -> our schema (see the module docstring)."""
    _need(rows, ["data_source", "images", "prompt", "reward_model"], src)
    has_extra = "extra_info" in rows.column_names

    def one(r, i):
        rm = r["reward_model"] or {}
        verifier = rm.get("verifier") or ""
        if verifier not in _VERIFIER_TYPES:
            raise ValueError(f"{src} row {i}: reward_model.verifier = {verifier!r}, known {sorted(_VERIFIER_TYPES)}")
        gold = rm.get("ground_truth") or rm.get("answer") or ""
        m = _ANSWER_TAG.match(gold)
        index = (r["extra_info"] or {}).get("index") if has_extra else None
        return {"id": f"{r['data_source']}-{index if index is not None else i}", "problem": _question(r["prompt"], i),
                "answer": (m.group(1) if m else gold).strip(), "choices": [],
                "answer_type": _VERIFIER_TYPES[verifier], "data_source": r["data_source"] or ""}

    keep = ["images", *(c for c in ("ability",) if c in rows.column_names)]
    drop = [c for c in rows.column_names if c not in keep]
    return rows.map(one, with_indices=True, remove_columns=drop)


def convert_hf(rows: datasets.Dataset, columns: dict[str, str], src: str = "hf") -> datasets.Dataset:
    """A generic dataset -> our schema. `columns` maps our names (problem, answer, images, choices, id, answer_type,
    data_source) to the source's; problem and answer are required."""
    for ours in ("problem", "answer"):
        if not columns.get(ours):
            raise ValueError(f"--{ours.replace('_', '-')} is required: the source column holding the {ours}")
    _need(rows, [c for c in columns.values() if c], src)

    def one(r, i):
        out = {"id": str(r[columns["id"]]) if columns.get("id") else f"row-{i}",
               "problem": str(r[columns["problem"]] or ""), "answer": str(r[columns["answer"]] or ""),
               "choices": [str(c) for c in r[columns["choices"]] or []] if columns.get("choices") else [],
               "answer_type": str(r[columns["answer_type"]] or "") if columns.get("answer_type") else "",
               "data_source": str(r[columns["data_source"]] or "") if columns.get("data_source") else ""}
        if columns.get("images"):
            imgs = r[columns["images"]]
            out["images"] = imgs if isinstance(imgs, list) else [] if imgs is None else [imgs]
        return out

    out = rows.map(one, with_indices=True, remove_columns=rows.column_names)
    if columns.get("images") and "images" in out.column_names:
        out = out.cast_column("images", datasets.List(datasets.Image()))
    return out


def write(rows: datasets.Dataset, out: str) -> None:
    """Parquet at `out`, written whole to a temporary name first (a failed run leaves no half file)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    rows.to_parquet(str(tmp))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.import_data", description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["orsta", "hf"])
    ap.add_argument("src", help="local dataset: a save_to_disk directory, a directory of data files, or one file")
    ap.add_argument("out", help="output parquet file")
    ap.add_argument("--split", default="train")
    for ours in ("problem", "answer", "images", "choices", "id", "answer-type", "data-source"):
        ap.add_argument(f"--{ours}", default="", help=f"hf: the source column holding the {ours}")
    args = ap.parse_args(argv)
    datasets.disable_progress_bars()
    rows = read_local(args.src, args.split)
    if args.kind == "orsta":
        out = convert_orsta(rows, args.src)
    else:
        cols = {k: getattr(args, k) for k in ("problem", "answer", "images", "choices", "id", "answer_type",
                                              "data_source")}
        out = convert_hf(rows, cols, args.src)
    write(out, args.out)
    sources = sorted(set(out["data_source"])) if "data_source" in out.column_names else []
    sys.stdout.write(f"{args.out}: {len(out)} rows, columns {out.column_names}; data sources {sources}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

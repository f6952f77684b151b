"""MEGA-Bench (Jiang et al., ICLR 2025, arXiv:2410.10563; TIGER-AI-Lab/MEGA-Bench, Apache-2.0): 505 multimodal tasks
with free-form answers, each query scored in [0, 1] by per-field rule metrics (core subset, 440 tasks) or by a GPT-4o
judge (open subset, 65 tasks). One BenchRow per query; `category` is the task name.

Layout of the directory given to `load` (one of the two forms):
  The Hugging Face release (huggingface.co/datasets/TIGER-Lab/MEGA-Bench):
    core/*.parquet, open/*.parquet    the `core` / `open` configs, one row per query (or core.jsonl / open.jsonl:
                                      the same rows saved as JSON lines); fields as the official task_processor reads
    data/...                          media from the release's data.zip (`unzip data.zip -d <dir>`); rows name
                                      them "./data/..."
  The evaluator's task files (the format of the official results/*/all_query_responses.json, data_with_scores*.json):
    *.json                            {"data": [task, ...]} or [task, ...], each task with query_response[]
    task_metrics_from_task_examples.json   each task's metric configuration (as /work/shared/benchmarks/megabench
                                      derives it from the official task cards; HF rows carry it as metric_info)
    data/...                          media, as above

Scoring (megabench/evaluation_processor.py and megabench/metrics/, commit ee324ab; rules re-implemented):
the response (narrowed by `answer_text`) is parsed by the task's response_parse_function (the text after the last
"Answer:", or a JSON object), each answer field is scored by its metric (megabench_metrics.py), and the field scores
are aggregated (weighted mean or min) into the query score. `score(row, response)` returns it; `is_correct` is
`score == 1.0`. The official MEGA-Bench number is the mean of `score`, not the accuracy of `is_correct`: per task
the mean over its queries, then the macro mean over tasks, reported for core and open tasks and overall (the macro
mean over all tasks); `summarize` computes it, so the eval stage should report it for MEGA-Bench.

Rows that our rules cannot score carry meta["scorable"] = False and `score` raises for them: open tasks
(meta["needs_judge"], a GPT-4o judge scores a field) and worldle (its geo_proximity metric geocodes place names
online), so 439 of the 440 core tasks can be scored. Two metrics need more than our code (meta
["unsupported_metrics"] lists them when missing): program_judge (8 tasks) runs the response's code
(megabench_code.py), only with `load(..., run_code=True)` and where its sandbox works (engine/sandbox.py:
bubblewrap); constrained_generation (18 tasks) needs NLTK's punkt_tab
and WordNet data (megabench_constrained.py; not on PyPI: `python -m nltk.downloader punkt_tab wordnet`). The eval
skips the rows it cannot score and reports how many; its core number then averages fewer tasks than the official
440.

The prompt (`problem`) is the task description, the demonstration and the query, with <image> / <video> where the
media go; as in the official models, demonstration images after the 4th are dropped, and the official "Think step
by step before answering." is removed (our eval template has its own). Video files (33 tasks) are listed in
meta["videos"]. `load(path, max_images=N)` feeds them as the official models feed image models (models/base_model.py,
`_set_sampling_config` / `process_video`; engine/benchmarks/video.py): each video's frames, at most ~1 per second
and within the image budget N, are extracted once as JPEG files into `frame_cache_dir(path)` (`<path>/_frames`, or
a cache folder when `path` is read-only), put into `images`, and its <video> becomes "<video frames start>", one
<image> per frame, "<video frames end>"; meta["video_frames"] holds the frame count per video. Without max_images
(the default) a video stays a <video> marker and the eval stage leaves its row out. Row ids are
"<task>/<query_idx>", the pair the official evaluator joins on; meta["global_idx"] is the HF row id.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine import sandbox
from engine.benchmarks import (
    BenchRow,
    answer_text,
    media_dir,
    megabench_code,
    megabench_constrained,
    megabench_gleu,
    megabench_latex,
    megabench_planning,
)
from engine.benchmarks.megabench_metrics import (
    CONTEXT_METRICS,
    JUDGE_METRICS,
    METRICS,
    UNSUPPORTED_METRICS,
    code_block,
    field_score,
    literal_eval,
    parse_json,
    unquote,
)
from engine.benchmarks.video import VIDEO_END, VIDEO_START, cached_frames, frame_budget

NAME = "megabench"

RULE_METRICS = {**METRICS, **megabench_latex.METRICS, **megabench_gleu.METRICS}
"""(response, gold) metrics: megabench_metrics' own plus the LaTeX and GLEU ones."""
ALL_CONTEXT_METRICS = {**CONTEXT_METRICS, **megabench_code.CONTEXT_METRICS, **megabench_constrained.CONTEXT_METRICS,
                       **megabench_planning.CONTEXT_METRICS}
"""(response, eval_context) metrics: they need the query's own eval_context."""
_NEEDS_DATA = {"constrained_generation": megabench_constrained.available}
"""Metrics scored only where their data is installed (NLTK's punkt_tab and WordNet: megabench_constrained.py)."""
CODE_METRICS = {"program_judge"}
"""Metrics that run the response's code: scored only when `load` is given run_code=True."""
_NO_CODE = ("runs the response's code (engine/benchmarks/megabench_code.py): load with run_code=True, in the eval "
            "stage the benchmark's run_code = true")


def _why_not(metric: str) -> str | None:
    """Why a metric that our code implements cannot score here (code not allowed, data missing); None otherwise."""
    if metric in CODE_METRICS:
        why = sandbox.problem()  # with run_code set, this is what stopped it
        return f"{metric} {_NO_CODE}" + (f"; and no sandbox can run it here ({why}): {sandbox.BWRAP_FIX}"
                                          if why else "")
    if metric in _NEEDS_DATA:
        return f"{metric} needs NLTK's punkt_tab and WordNet data: {megabench_constrained.NLTK_DATA_HINT}"
    return None

MACRO_OVER_CATEGORIES = True
"""The eval stage averages per task (category) first, then over tasks: the official MEGA-Bench number."""
JUDGE_NOTE = ("MEGA-Bench's 65 open tasks are scored by a GPT-4o judge that rates the response against the reference "
              "(0-10); our rule-only score cannot score them, so their rows are marked meta['needs_judge'] and the "
              "reported number covers the rule-scored (core) tasks only.")

_METRIC_TABLE = "task_metrics_from_task_examples.json"
_DOWNLOAD = ("get the `core`/`open` configs from huggingface.co/datasets/TIGER-Lab/MEGA-Bench (and data.zip, unzipped "
             "into the same directory)")
_THINK = re.compile(r"\s*Think step by step before answering\.")
_MAX_DEMO_IMAGES = 4  # the official models show at most 4 images of the demonstration example
_SINGLE_FIELD_PARSERS = {"answer_string": (False, True), "ascii_answer_string": (True, True),
                         "verbatim_answer_string": (True, False)}  # parser -> (ascii_art, strip surrounding space)


# ------------------------------------------------------------------ loading


def _literal(value: Any, default: Any) -> Any:
    """HF rows hold lists and dicts as Python-literal strings (the official code literal-evals them)."""
    if value is None or value == "":
        return default
    return literal_eval(value) if isinstance(value, str) else value


def _hf_rows(root: Path) -> list[tuple[str, dict]]:
    """(subset, row) for every HF row under root: core/*.parquet, open/*.parquet, core.jsonl, open.jsonl."""
    found = []
    for subset in ("core", "open"):
        shards, jsonl = sorted(root.glob(f"{subset}/*.parquet")), root / f"{subset}.jsonl"
        for path in shards:
            try:
                import pyarrow.parquet as pq  # ships with `datasets`
            except ImportError as exc:
                raise RuntimeError(f"reading {path} needs pyarrow: pip install pyarrow") from exc
            found += [(subset, row) for row in pq.read_table(path).to_pylist()]
        if not shards and jsonl.is_file():
            found += [(subset, json.loads(line)) for line in jsonl.read_text(encoding="utf-8").splitlines() if line]
    return found


def _queries_from_hf(rows: list[tuple[str, dict]]) -> list[dict]:
    """One query dict per row; query_idx is the row's position within its task, as the official code numbers it."""
    queries, count = [], {}
    for subset, row in rows:
        task = row["task_name"]
        count[task] = count.get(task, -1) + 1
        queries.append({
            "task": task, "subset": subset, "query_idx": count[task], "global_idx": str(row.get("id", "")),
            "description": row.get("task_description") or "", "global_media": _literal(row.get("global_media"), []),
            "example_text": row.get("example_text") or "", "example_media": _literal(row.get("example_media"), []),
            "query_text": row.get("query_text") or "", "query_media": _literal(row.get("query_media"), []),
            "answer": _literal(row["answer"], {}), "metric_info": _literal(row["metric_info"], {}),
            "eval_context": _literal(row.get("eval_context"), {}), "context_per_query": True,
        })
    return queries


def _queries_from_task_files(root: Path, files: list[Path]) -> list[dict]:
    table_path = root / _METRIC_TABLE
    if not table_path.is_file():
        raise FileNotFoundError(f"{root}: task files {[f.name for f in files]} need {_METRIC_TABLE} beside them (the "
                                "metric configuration per task; /work/shared/benchmarks/megabench has it), or use the "
                                f"HF layout instead: {_DOWNLOAD}")
    table = json.loads(table_path.read_text(encoding="utf-8"))
    queries = []
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        for task in data["data"] if isinstance(data, dict) else data:
            name = task["task_name"]
            if name not in table:
                raise ValueError(f"{path}: task {name!r} is not in {table_path}")
            info = table[name]
            for query in task["query_response"]:
                queries.append({
                    "task": name, "subset": "", "query_idx": query["query_idx"],
                    "global_idx": str(query.get("global_idx", "")), "description": task.get("global_description", ""),
                    "global_media": task.get("global_images", []),
                    "example_text": task["example_info"].get("example_text", ""),
                    "example_media": task["example_info"].get("image_paths", []),
                    "query_text": query.get("query_text", ""), "query_media": query.get("images", []),
                    "answer": query["correct_answer"], "eval_context": _literal(info.get("eval_context"), {}),
                    "metric_info": {key: info[key] for key in ("field_score_function", "aggregation",
                                                               "response_parse_function", "global_aux_metrics")
                                    if key in info},
                    "context_per_query": False,  # the table holds one task card's eval_context, not each query's
                })
    return queries


def _unscorable_metrics(query: dict, run_code: bool = False) -> list[str]:
    """The metrics of this query's task that our rules cannot compute (judges excluded), or may not (code)."""
    info = query["metric_info"]
    used = list(info["field_score_function"].values()) + list(info.get("global_aux_metrics", {}).values())
    out = sorted({m for m in used if m not in RULE_METRICS and m not in ALL_CONTEXT_METRICS
                  and m not in JUDGE_METRICS})
    if not query["context_per_query"]:
        out += sorted({m for m in used if m in ALL_CONTEXT_METRICS})
    else:
        out += sorted({m for m in used if (m in CODE_METRICS and (not run_code or sandbox.problem()))
                       or (m in _NEEDS_DATA and not _NEEDS_DATA[m]())})
    scored = set(info["field_score_function"]) | set(info.get("global_aux_metrics", {}))
    # A weight for a field without a metric is a global_aux_metrics entry our metric table lacks (worldle's proximity)
    out += [f"missing metric for weighted field {f!r}" for f in info["aggregation"]["field_weights"] if f not in scored]
    return out


def _prompt_and_media(query: dict, root: Path, frames: Callable[[Path, int, bool], list[Path]] | None = None,
                      budget: tuple[int, int] = (0, 0)) -> tuple[str, list[Path], list[Path], list[int]]:
    """The official prompt text (task description, demonstration, query; <image>/<video> mark the media), the
    resolved image and video paths, in order, and the number of frames fed per video. Demonstration images beyond
    the 4th are dropped, as the official models do. Without `frames` a video stays a <video> marker; with it,
    `frames(video, n, is_demo)` gives its frame files, which go into the images (n from `budget`: frames per
    demonstration video, per query video), marked "<video frames start><image>...<video frames end>" as the
    official models send them."""
    parts, images, videos, counts = [], [], [], []
    for text, media, is_demo in ((query["description"], query["global_media"], False),
                                 (query["example_text"], query["example_media"], True),
                                 (query["query_text"], query["query_media"], False)):
        chunks, demo_images, media = re.split(r"(<image>|<video>)", text), 0, list(media)
        if sum(chunk in ("<image>", "<video>") for chunk in chunks) != len(media):
            raise ValueError(f"{query['task']}/{query['query_idx']}: {len(media)} media files for the placeholders "
                             f"in {text[:80]!r}")
        kept = []
        for chunk in chunks:
            if chunk not in ("<image>", "<video>"):
                kept.append(chunk)
                continue
            path = root / str(media.pop(0)).removeprefix("./")
            if _is_video(path):
                videos.append(path)
                if frames is None:
                    kept.append("<video>")
                    continue
                files = frames(path, budget[0] if is_demo else budget[1], is_demo)
                images += files
                counts.append(len(files))
                kept.append(VIDEO_START + "<image>" * len(files) + VIDEO_END)
            elif not is_demo or demo_images < _MAX_DEMO_IMAGES:
                images.append(path)
                kept.append("<image>")
                demo_images += is_demo
        # Our eval template adds its own reasoning instruction, so the official one is dropped.
        parts.append(_THINK.sub("", "".join(kept)).strip())
    return "\n\n".join(part for part in parts if part), images, videos, counts


def _is_video(path: Path | str) -> bool:
    """The official test (utils.is_video_file): the file name's MIME type is video/*."""
    return (mimetypes.guess_type(Path(path).name)[0] or "").startswith("video")


def _frame_budget(query: dict, max_images: int, demo_video_frames: int) -> tuple[int, int]:
    """(frames per demonstration video, frames per query video) for this query, by the official rule
    (video.frame_budget); task-global media count as the query's."""
    shown = [_is_video(m) for m in query["global_media"] + query["query_media"]]
    demo = [_is_video(m) for m in query["example_media"]]
    try:
        return frame_budget(max_images, demo_video_frames, query_images=shown.count(False),
                            query_videos=shown.count(True), demo_images=min(demo.count(False), _MAX_DEMO_IMAGES),
                            demo_videos=demo.count(True))
    except ValueError as e:
        raise ValueError(f"MEGA-Bench {query['task']}/{query['query_idx']}: {e}") from e


def _row(query: dict, root: Path, frames: Callable[[Path, int, bool], list[Path]] | None = None,
         max_images: int = 0, demo_video_frames: int = 0, run_code: bool = False) -> BenchRow:
    info = query["metric_info"]
    budget = _frame_budget(query, max_images, demo_video_frames) if frames is not None else (0, 0)
    problem, images, videos, counts = _prompt_and_media(query, root, frames, budget)
    metrics = set(info["field_score_function"].values())
    needs_judge = bool(metrics & JUDGE_METRICS)
    unsupported = _unscorable_metrics(query, run_code)
    answer = query["answer"]
    meta = {"task": query["task"], "query_idx": query["query_idx"], "global_idx": query["global_idx"],
            "subset": query["subset"] or ("open" if needs_judge else "core"),
            "eval_type": "llm" if needs_judge else "rule",  # the official rule: any judged field makes it "llm"
            "answer": answer, "field_score_function": info["field_score_function"],
            "aggregation": info["aggregation"], "response_parse_function": info["response_parse_function"],
            "global_aux_metrics": info.get("global_aux_metrics", {}), "eval_context": query["eval_context"],
            "needs_judge": needs_judge, "unsupported_metrics": unsupported,
            "scorable": not needs_judge and not unsupported, "videos": [str(v) for v in videos]}
    if videos and frames is not None:
        meta["video_frames"] = counts  # frames fed per video, in order: the videos are in `images`
    return BenchRow(
        id=f"{query['task']}/{query['query_idx']}", problem=problem, images=images,
        answer=next(iter(answer.values())) if len(answer) == 1 else json.dumps(answer, ensure_ascii=False),
        category=query["task"], meta=meta,
    )


def frame_cache_dir(root: Path) -> Path:
    """Where the video frames of a release at `root` are written: `<root>/_frames`, or for a read-only `root` (a
    shared dataset mount) $XDG_CACHE_HOME (or ~/.cache)/specs-engine/megabench/<key>, one folder per release path."""
    return media_dir(root, "_frames", NAME)


def load(path: str | Path, max_images: int = 0, demo_video_frames: int = 2, run_code: bool = False) -> list[BenchRow]:
    """All queries under `path` (see the module docstring for the layout), one BenchRow each.

    With `max_images` > 0, videos are fed as frames, as the official models do for image models (engine/benchmarks/
    video.py): `max_images` is the official max_num_image (the model's image budget per prompt, from which the
    frames per query video follow) and `demo_video_frames` the official total_demo_video_frames (the frames shared
    by the demonstration's videos). The frames are extracted once into `frame_cache_dir(path)` and reused. With
    `max_images` = 0 a video stays a <video> marker and its row cannot be fed to an image model.

    `run_code` lets program_judge run each response's program on its test cases (megabench_code.py: a subprocess
    with resource limits, not a sandbox against hostile code); without it those 8 tasks are unscorable."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"MEGA-Bench directory {root} does not exist; {_DOWNLOAD}")
    hf_rows = _hf_rows(root)
    skip = {_METRIC_TABLE, "all_task_meta.json"}
    task_files = [p for p in sorted(root.glob("*.json")) if p.name not in skip]
    if hf_rows:
        queries = _queries_from_hf(hf_rows)
    elif task_files:
        queries = _queries_from_task_files(root, task_files)
    else:
        raise FileNotFoundError(f"{root}: no MEGA-Bench annotations (expected core/*.parquet, open/*.parquet, "
                                f"core.jsonl or open.jsonl, or evaluator task files *.json); {_DOWNLOAD}")
    rows = [_row(query, root, run_code=run_code) for query in queries]
    missing = [p for row in rows for p in row.images + [Path(v) for v in row.meta["videos"]] if not p.is_file()]
    if missing:
        raise ValueError(f"{root}: {len(missing)} media files are missing (first: {[str(p) for p in missing[:5]]}); "
                         f"unzip the release's data.zip into {root} ({_DOWNLOAD})")
    if max_images > 0 and any(row.meta["videos"] for row in rows):
        cache = frame_cache_dir(root)

        def frames(video: Path, n: int, is_demo: bool) -> list[Path]:
            folder = cache / video.resolve().relative_to(root.resolve()) if video.resolve().is_relative_to(
                root.resolve()) else cache / hashlib.sha1(str(video.resolve()).encode()).hexdigest()[:12]
            return cached_frames(video, n, is_demo, folder)

        rows = [_row(query, root, frames, max_images, demo_video_frames, run_code) if row.meta["videos"] else row
                for query, row in zip(queries, rows, strict=True)]
    return rows


# ------------------------------------------------------------------ response parsing


def _answer_content(text: str, ascii_art: bool, strip_ws: bool) -> str:
    """The text after the last "Answer:" ("answer:" counts; "**Answer: X**" gives X), or the whole text."""
    text = text.replace("answer:", "Answer:")
    last = text.rfind("Answer:")
    if last != -1:  # earlier "Answer:" markers are deleted, so the search below finds the last one
        text = text[:last].replace("Answer:", "") + text[last:]
    space = "" if ascii_art else r"\s*"
    match = re.search(rf"\*\*?Answer:{space}(.*?)\*\*?|\bAnswer:{space}(.*)", text, re.DOTALL)
    if match:
        # Official quirk: "**Answer:** B" matches the first branch with an empty group, so it parses to "".
        text = match.group(1) or match.group(2) or ""
    if not ascii_art:
        return text.strip()
    text = re.sub(r"^\s*$(\n^\s*$)+", "", text, flags=re.MULTILINE)
    text = text.rstrip() if strip_ws else re.sub(r"(\n\s*)+$", "", text)
    return re.sub(r"^(\s*\n)+", "", text)


def _is_multiline(text: str) -> bool:
    """Official heuristic: the answer is multi-line unless its first non-blank line is followed by a blank line."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip():
            return not (i + 1 < len(lines) and not lines[i + 1].strip())
    return False


def _drop_additional_text(text: str) -> str:
    """Keep only the first paragraph when it looks like a short answer (a token, a comma list, "X." or "(X)")."""
    first = text.split("\n\n")[0].strip()
    short = re.search(r"^(?:[a-zA-Z0-9_-]+(?:,\s*[a-zA-Z0-9_-]+)*|[a-zA-Z0-9_-]+\.|\([a-zA-Z0-9_-]+\)$)", first)
    return first if short and first and not _is_multiline(text) else text


def parse_answer_string(text: str, single_line_gold: bool, parser: str = "answer_string") -> str:
    """The official single-field parse of a response: the answer after "Answer:", a code block's content, the
    first paragraph of a short answer (single-line gold only), JSON re-serialised, one level of quotes removed."""
    ascii_art, strip_ws = _SINGLE_FIELD_PARSERS[parser]
    content = _answer_content(text, ascii_art, strip_ws)
    content, is_code = code_block(content, ascii_art=ascii_art, strip_ws=strip_ws)
    if not is_code and single_line_gold and not ascii_art:
        content = _drop_additional_text(content)
    if content.startswith(("{", "[")):
        parsed = parse_json(content)
        if (parsed == {} and "{}" not in content) or (parsed == [] and "[]" not in content):
            return content
        return str(parsed)  # the metrics always get a string: the Python repr of the parsed value
    return unquote(content)


def parse_response(row: BenchRow, response: str) -> dict | str:
    """The parsed response, field -> value, as the official evaluator hands it to the metrics."""
    narrowed = answer_text(response)
    # Without an <answer> block the official parsers see the raw response (the JSON fallback keeps its whitespace).
    text = narrowed if narrowed != (response or "").strip() else (response or "")
    parser, gold = row.meta["response_parse_function"], row.meta["answer"]
    if parser in _SINGLE_FIELD_PARSERS:
        key = next(field for field in gold if not field.startswith("##"))
        return {key: parse_answer_string(text, "\n" not in gold[key], parser)}
    if parser == "json":
        parsed = parse_json(text)
        if isinstance(parsed, dict) and parsed:
            return {key: unquote(value) for key, value in parsed.items()}
        return {field: text for field in gold}  # the official fallback: the raw response for every field
    if parser == "dummy":
        return text.strip()
    raise ValueError(f"{row.id}: unknown response_parse_function {parser!r}")


# ------------------------------------------------------------------ scoring


def field_scores(row: BenchRow, response: str) -> dict[str, float | None]:
    """Each answer field's official score; None for a field a GPT-4o judge scores. Raises for metrics we lack."""
    parsed = parse_response(row, response)
    targets = dict(row.meta["answer"])
    for field in row.meta["global_aux_metrics"]:  # an auxiliary metric sees the whole parsed response and answer
        targets[field] = dict(row.meta["answer"])
        if isinstance(parsed, dict):
            parsed = {**parsed, field: dict(parsed)}
    metrics = {**row.meta["field_score_function"], **row.meta["global_aux_metrics"]}
    out: dict[str, float | None] = {}
    for field, gold in targets.items():
        metric = metrics.get(field)
        if metric is None:
            continue  # the official evaluator records no score for a field without a metric
        value = parsed.get(field) if isinstance(parsed, dict) else parsed
        if metric in JUDGE_METRICS:
            out[field] = None
        elif metric in RULE_METRICS:
            out[field] = field_score(metric, value, unquote(gold), RULE_METRICS)
        elif metric in ALL_CONTEXT_METRICS and not row.meta["unsupported_metrics"]:
            try:
                out[field] = ALL_CONTEXT_METRICS[metric](value, row.meta["eval_context"])
            except Exception:
                out[field] = 0
        elif _why_not(metric):
            raise ValueError(f"{row.id}: metric {_why_not(metric)}")
        else:
            raise ValueError(f"{row.id}: metric {metric!r} is not implemented "
                             f"({UNSUPPORTED_METRICS.get(metric, 'needs the per-query eval_context')})")
    return out


def aggregate(scores: dict[str, float], aggregation: dict) -> float:
    """The official query score: weighted mean (or min) of the field scores >= 0; -1 when none is left."""
    kept = {field: score for field, score in scores.items() if score >= 0}
    if not kept:
        return -1.0
    if aggregation["function"] == "min":
        return float(min(kept.values()))
    weights = [aggregation["field_weights"][field] for field in kept]
    return float(np.average(list(kept.values()), weights=weights))


def score(row: BenchRow, response: str) -> float:
    """The official query score in [0, 1]. A query whose every field is ignored (-1) scores 0: the official task
    mean skips it in the sum but still divides by the number of queries. Raises for rows with meta["scorable"]
    False (a judged field, or a metric we did not re-implement)."""
    if row.meta["needs_judge"]:
        raise ValueError(f"{row.id}: task {row.category!r} is scored by a GPT-4o judge ({JUDGE_NOTE})")
    reasons = [why for why in map(_why_not, row.meta["unsupported_metrics"]) if why]
    if reasons:
        raise ValueError(f"{row.id}: task {row.category!r} is scored by " + "; ".join(reasons))
    if row.meta["unsupported_metrics"]:
        raise ValueError(f"{row.id}: task {row.category!r} uses metrics we do not implement: "
                         f"{row.meta['unsupported_metrics']}")
    return max(0.0, aggregate(field_scores(row, response), row.meta["aggregation"]))


def is_correct(row: BenchRow, response: str) -> bool:
    """Whether the query scores 1.0. MEGA-Bench reports mean scores, not accuracy: use `score` and `summarize`."""
    return score(row, response) == 1.0


def macro_scores(task_means: dict[str, float], eval_types: dict[str, str]) -> dict[str, Any]:
    """The official summary from per-task mean scores: the macro mean over core ("rule") tasks, over open ("llm")
    tasks, and over all tasks (= the task-count-weighted mean of the two)."""
    groups = {"core": [m for t, m in task_means.items() if eval_types[t] == "rule"],
              "open": [m for t, m in task_means.items() if eval_types[t] == "llm"],
              "overall": list(task_means.values())}
    out: dict[str, Any] = {name: sum(means) / len(means) if means else 0.0 for name, means in groups.items()}
    out.update({f"num_{name}_tasks": len(means) for name, means in groups.items()})
    return out


def summarize(rows: list[BenchRow], scores: list[float | None]) -> dict[str, Any]:
    """The official MEGA-Bench numbers from per-query scores (None = not scored): per-task means, then macro
    means. Tasks with an unscored query are left out and listed in "skipped_tasks"."""
    per_task: dict[str, list[float | None]] = {}
    for row, value in zip(rows, scores, strict=True):
        per_task.setdefault(row.category, []).append(value)
    means = {task: sum(values) / len(values) for task, values in per_task.items() if None not in values}
    out = macro_scores(means, {row.category: row.meta["eval_type"] for row in rows})
    out["task_means"] = means
    out["skipped_tasks"] = sorted(set(per_task) - set(means))
    return out


__all__ = ["JUDGE_NOTE", "NAME", "aggregate", "field_scores", "is_correct", "load", "macro_scores",
           "parse_answer_string", "parse_response", "score", "summarize"]

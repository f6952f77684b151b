"""Data: read problem/answer/images rows, encode them for Qwen2.5-VL, batch them.

Rows come from parquet / jsonl / arrow files (columns `problem`, `answer`, `images`, optional `choices`, `id`,
and for SFT a response column). `Processor` composes the tokenizer and the PIL `Qwen2VLImageProcessor` (the
torchvision-based `Qwen2_5_VLProcessor` cannot be built on our CPU machines) and turns one row into a `Sample`:
token ids with every `<|image_pad|>` expanded to t*h*w / merge**2 copies, labels, M-RoPE token types and pixels.
`encode_rows` does that for a whole file and never drops a row silently: each bad row is skipped and counted or
raises `BadRow`. `collate` right-pads samples into a batch the HF model accepts; `plan_micro_batches` groups
samples under a padded-token budget; `epoch_order` gives a resumable shuffle.

Letters in shapes: B batch, T tokens, P vision patches (all images of the batch), D = C*temporal*patch*patch.
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer

from engine.dist import gather_object, rank_world
from engine.sections import COLUMNS

try:  # the lent GPU machine has no `datasets`: Processor, collate and the planners still work there
    import datasets
except ImportError:
    datasets = None

try:  # newer transformers name the PIL image processor explicitly
    from transformers import Qwen2VLImageProcessorPil as _ImageProcessor
except ImportError:  # older: the plain name is the PIL one without torchvision
    from transformers import Qwen2VLImageProcessor as _ImageProcessor

logger = logging.getLogger("engine.data")

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN = "<|image_pad|>"
END_OF_TURN = "<|im_end|>"
_EXTENSIONS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}
# Names other datasets give our columns: the first one present is suggested when ours is missing.
_LIKELY = {"problem": ("question", "query", "prompt", "instruction", "input", "text"),
           "answer": ("solution", "ground_truth", "gt_answer", "final_answer", "label", "target", "output"),
           "images": ("image", "image_path", "img", "picture", "decoded_image")}

# Used only when neither the tokenizer nor the model dir has a template that renders images. This is the
# Qwen2-VL / Qwen2.5-VL processor template (chat_template.json of Qwen2.5-VL-7B-Instruct) minus video, add_vision_id.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class BadRow(ValueError):  # noqa: N818 - the name is the API the stages catch
    """A row that cannot be trained on. `reason` is a short key (counted in `BadRowReport.by_reason`)."""

    def __init__(self, row_id: str, reason: str, detail: str = "", source: str = ""):
        self.row_id, self.reason, self.detail, self.source = row_id, reason, detail, source
        where = f"{source}: " if source else ""
        super().__init__(
            f"{where}row {row_id!r}: {reason}"
            + (f" ({detail})" if detail else "")
            + "; fix the row, or set data.on_bad_row = 'skip' to skip such rows"
        )


@dataclass(slots=True)
class Sample:
    """One encoded row. Token lists are plain ints (cheap to keep and pickle); `collate` makes tensors."""

    input_ids: list[int]
    labels: list[int] | None  # same length as input_ids; IGNORE_INDEX on the prompt; None for prompt-only rows
    mm_token_type_ids: list[int]  # 1 at <|image_pad|>, 0 elsewhere (M-RoPE positions come from this)
    pixel_values: torch.Tensor | None  # [P, D] float32, all images of the row in order
    image_grid_thw: torch.Tensor | None  # [num_images, 3] int64
    num_prompt_tokens: int
    row_id: str
    answer: str = ""
    choices: list[str] | None = None
    pixel_loader: PixelLoader | None = None  # re-encodes pixel_values on demand when they are not kept in memory

    def pixels(self) -> torch.Tensor | None:
        """pixel_values [P, D], from memory or re-encoded from the row's images; None for a text-only sample."""
        if self.pixel_values is not None or self.pixel_loader is None:
            return self.pixel_values
        return self.pixel_loader()


class PixelLoader:
    """Re-encodes one row's images: samples of a large data set drop their pixel_values after the first pass
    (a 448x448 image is ~4.8 MB of float32 patches; 40K of them would not fit in host memory on every rank).
    Deterministic: the same decode and image processor as the first pass, so training does not change."""

    _cache: dict = {}  # (id(rows), row index) -> pixel_values, the most recently used few, shared by all loaders
    CACHE_SIZE = 512

    def __init__(self, rows, index: int, base_dir: Path, image_processor):
        self.rows, self.index, self.base_dir, self.image_processor = rows, index, base_dir, image_processor

    def __call__(self) -> torch.Tensor:
        key = (id(self.rows), self.index)
        hit = PixelLoader._cache.pop(key, None)
        if hit is None:
            entries = row_images(self.rows.with_format("arrow")[self.index:self.index + 1].to_pylist()[0])
            images = [_open_image(e, self.base_dir) for e in entries]
            hit = self.image_processor(images=images, return_tensors="pt")["pixel_values"].float()
        PixelLoader._cache[key] = hit  # most recent last
        while len(PixelLoader._cache) > PixelLoader.CACHE_SIZE:
            PixelLoader._cache.pop(next(iter(PixelLoader._cache)))
        return hit


@dataclass(slots=True)
class BadRowReport:
    num_rows: int = 0
    num_skipped: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    row_ids: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- loading


def load_rows(
    path: str | os.PathLike, *, split_name: str = "train", response_column: str | None = None,
    cache_dir: str | None = None, columns: dict[str, str] | None = None,
) -> datasets.Dataset:  # fmt: skip
    """Read a parquet / jsonl / json / arrow file, a directory of such files, or a `save_to_disk` directory.

    Args:
        path: file or directory.
        split_name: split name handed to `datasets` (only a label here).
        response_column: if set, this column is required too (SFT).
        cache_dir: `datasets` cache directory (None = the HF default).
        columns: our column name -> the data's (`{"images": "image"}`), applied before the checks.

    Returns:
        The rows, with image columns as `datasets` stores them (decoded later by `encode_rows`). A column `image`
        (one image a row) becomes `images` when there is no `images` column.
    """
    if datasets is None:
        raise RuntimeError("reading data files needs `datasets`: pip install datasets (see requirements/)")
    p = Path(path)
    if not p.exists():
        raise ValueError(f"data path {str(p)!r} does not exist")
    if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):  # save_to_disk
        ds = datasets.load_from_disk(str(p))
    else:
        files = sorted(f for f in p.iterdir() if f.suffix in _EXTENSIONS) if p.is_dir() else [p]
        kinds = {_EXTENSIONS.get(f.suffix) for f in files}
        if not files or None in kinds or len(kinds) > 1:
            raise ValueError(
                f"data path {str(p)!r}: need one file or a directory of files of one type among "
                f"{sorted(_EXTENSIONS)}, got {[f.name for f in files] or 'no such files'}"
            )
        kind = kinds.pop()
        empty = [f for f in files if _is_empty(f, kind)]
        files = [f for f in files if f not in empty]  # datasets fails on a 0-row file with an unrelated error
        if empty and files:
            logger.warning("%s: %d file(s) with 0 rows left out: %s", p, len(empty), ", ".join(f.name for f in empty))
        if not files:
            raise ValueError(f"data path {str(p)!r}: 0 rows (empty: {', '.join(f.name for f in empty)}); point "
                             f"data.train at a file with rows")
        try:
            ds = datasets.load_dataset(kind, data_files={split_name: [str(f) for f in files]}, split=split_name,
                                       cache_dir=cache_dir)
        except (datasets.exceptions.DatasetGenerationError, ValueError) as e:  # pyarrow's ArrowInvalid is one
            cause = e.__cause__ or e  # DatasetGenerationError's own message does not say what failed
            raise ValueError(f"data path {str(p)!r}: not readable as {kind} ({type(cause).__name__}: {cause})") from e
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"data path {str(p)!r} holds splits {list(ds)}; point at one split's directory")
    if len(ds) == 0:
        raise ValueError(f"data path {str(p)!r}: 0 rows; point data.train at data with rows")
    ds = map_columns(ds, columns or {}, str(p))
    required = ["problem", "answer"] + ([response_column] if response_column else [])
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise ValueError(f"data path {str(p)!r}: missing required column(s) {missing} (found: "
                         f"{', '.join(ds.column_names)}){_mapping_hint(missing, ds.column_names)}")
    return ds


def _is_empty(file: Path, kind: str) -> bool:
    """True when `file` certainly holds no rows (a 0-row parquet, a json/jsonl of whitespace only)."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(file).metadata.num_rows == 0
        except Exception:  # not readable as parquet: load_dataset reports it with the reason
            return False
    if kind == "json":
        with open(file, "rb") as f:
            return not f.read(1 << 16).strip() and f.read(1) == b""
    return False


def cell_text(value: Any) -> str | None:
    """A text cell as a string, or None when it is missing: None, NaN (pandas' missing value) or blank."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def row_ids(data: datasets.Dataset) -> list[str]:
    """Each row's id as `encode_rows` assigns it: the `id` column, or `row-<index>` where it is absent or empty."""
    if "id" not in data.column_names:
        return [f"row-{i}" for i in range(len(data))]
    return [str(x) if x not in (None, "") else f"row-{i}" for i, x in enumerate(data["id"])]


def check_unique_ids(ids: list[str], source: str | os.PathLike) -> None:
    """Raise ValueError naming the duplicated ids and their rows (up to five of each)."""
    rows_of: dict[str, list[int]] = {}
    for i, row_id in enumerate(ids):
        rows_of.setdefault(row_id, []).append(i)
    dups = {row_id: rows for row_id, rows in rows_of.items() if len(rows) > 1}
    if dups:
        shown = "; ".join(f"{row_id!r} at rows {rows[:5]}" for row_id, rows in list(dups.items())[:5])
        raise ValueError(f"{source}: {len(dups)} ids are not unique ({shown}); samples, rewards, judge questions "
                         "and pairs are matched to their row by id: give every row its own id, or drop the id column "
                         "to number the rows")


def _mapping_hint(missing: list[str], found: list[str]) -> str:
    """`; map yours with data.columns = {problem = "question"}` for the missing columns a likely name exists for."""
    pairs = []
    for ours in missing:
        likely = [c for c in _LIKELY.get(ours, ()) if c in found] or difflib.get_close_matches(ours, found, n=1)
        if likely:
            pairs.append(f'{ours} = "{likely[0]}"')
    if not pairs:
        return f"; name the data's columns in the recipe with data.columns = {{{missing[0]} = \"...\"}}"
    return f"; if those are yours, map them in the recipe: data.columns = {{{', '.join(pairs)}}}"


def map_columns(ds: datasets.Dataset, columns: dict[str, str], source: str) -> datasets.Dataset:
    """Rename the data's columns to ours (`columns`: ours -> theirs); read a lone `image` column as `images`."""
    unknown = [k for k in columns if k not in COLUMNS]
    absent = [v for v in columns.values() if v not in ds.column_names]
    if unknown or absent:
        raise ValueError(f"{source}: data.columns = {columns}: " + "; ".join(
            ([f"{unknown} are not our columns ({', '.join(COLUMNS)})"] if unknown else [])
            + ([f"the data has no column(s) {absent} (found: {', '.join(ds.column_names)})"] if absent else [])))
    renames = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    shadowed = [ours for ours in renames.values() if ours in ds.column_names and ours not in renames]
    ds = ds.remove_columns(shadowed).rename_columns(renames) if renames else ds  # the mapped column wins
    if "images" not in ds.column_names and "image" in ds.column_names:
        logger.info("%s: reading column 'image' as the images (one a row)", source)
        ds = ds.rename_column("image", "images")
    return ds


def row_images(row: dict) -> list:
    """A row's `images` entries as a list: the column holds a list of images, or one image (an Image column)."""
    entries = row.get("images")
    return [] if entries is None else entries if isinstance(entries, list) else [entries]


def _open_image(entry: Any, base_dir: Path) -> Image.Image:
    """Decode one `images` entry (PIL image, {"bytes", "path"} dict or path string) to RGB. Raises BadRow
    with an empty row id (the caller fills it in)."""
    data, path = (entry.get("bytes"), entry.get("path")) if isinstance(entry, dict) else (None, entry)
    if isinstance(entry, Image.Image):
        data = path = None
    elif not data and not path:
        raise BadRow("", "missing image", f"entry is {entry!r}")
    elif not data:
        full = Path(path) if os.path.isabs(path) else base_dir / path
        if not full.is_file():
            raise BadRow("", "image not found", f"{full} does not exist")
        data = full.read_bytes()
    try:
        img = entry if data is None else Image.open(io.BytesIO(data))
        img.load()  # Image.open is lazy: force the decode here so truncated files fail inside the try
        return img if img.mode == "RGB" else img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRow("", "corrupt image", f"{type(e).__name__}: {e}") from None


# -------------------------------------------------------------------------------------------------- processor


class Processor:
    """Tokenizer + Qwen2-VL image processor from one model directory.

    Args:
        tokenizer: a HF tokenizer with the Qwen special tokens.
        image_processor: a `Qwen2VLImageProcessor(Pil)`.
        chat_template: jinja template that renders `{"type": "image"}` items as one `<|image_pad|>` each.
    """

    def __init__(self, tokenizer, image_processor, chat_template: str):
        self.tokenizer, self.image_processor, self.chat_template = tokenizer, image_processor, chat_template
        self.image_token_id = self._token_id(IMAGE_TOKEN)
        self.end_of_turn_id = self._token_id(END_OF_TURN)
        self.merge_size = int(image_processor.merge_size)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self._token_id("<|endoftext|>"))

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token!r} token: not a Qwen2-VL tokenizer?")
        return int(tid)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | os.PathLike, *, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> Processor:
        """Load from a HF model directory; `min_pixels` / `max_pixels` (None = the saved values) bound the
        resized image area in pixels."""
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels={min_pixels} > max_pixels={max_pixels}")
        sizes = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        image_processor = _ImageProcessor.from_pretrained(str(model_dir), **sizes)
        return cls(tokenizer, image_processor, _pick_chat_template(tokenizer, Path(model_dir)))

    def build_messages(
        self, problem: str, num_images: int, template: str = "{problem}", system: str | None = None
    ) -> list[dict]:
        """Chat messages for one row.

        Rule: `template` is applied to the whole problem first (only `{problem}` is substituted, other braces
        stay literal), then the text is split at `<image>` placeholders. With k placeholders k must equal
        `num_images` and image i goes where placeholder i was; with none, all images go first, then the text.
        Empty text pieces are dropped. Raises BadRow (empty row id) on a count mismatch or empty problem.
        """
        if "{problem}" not in template or IMAGE_PLACEHOLDER in template:
            raise ValueError(f"template must contain '{{problem}}' and no {IMAGE_PLACEHOLDER!r}, got {template!r}")
        num_placeholders = problem.count(IMAGE_PLACEHOLDER)
        if not problem.replace(IMAGE_PLACEHOLDER, "").strip():
            raise BadRow("", "empty problem", "no text besides image placeholders")
        if num_placeholders and num_placeholders != num_images:
            raise BadRow("", "placeholder mismatch", f"{num_placeholders} {IMAGE_PLACEHOLDER} for {num_images} images")
        pieces = template.replace("{problem}", problem).split(IMAGE_PLACEHOLDER)
        content = [{"type": "image"} for _ in range(num_images if not num_placeholders else 0)]
        for i, text in enumerate(pieces):
            content += ([{"type": "image"}] if i > 0 else []) + ([{"type": "text", "text": text}] if text else [])
        system_msg = [{"role": "system", "content": system}] if system is not None else []
        return system_msg + [{"role": "user", "content": content}]

    def encode(
        self, problem: str, images: list[Image.Image], *, template: str = "{problem}", response: str | None = None,
        system: str | None = None, row_id: str = "",
    ) -> Sample:  # fmt: skip
        """Encode one row (the prompt ends with the assistant header; `response` + `<|im_end|>` follow it).

        Returns:
            Sample with T = prompt + response tokens; pixel_values [P, D], image_grid_thw [num_images, 3].
        """
        try:
            messages = self.build_messages(problem, len(images), template, system)
        except BadRow as e:
            raise BadRow(row_id, e.reason, e.detail) from None
        if response is not None and not response.strip():
            raise BadRow(row_id, "empty response")
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        pixel_values = image_grid_thw = None
        counts: list[int] = []
        if images:
            rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
            try:
                out = self.image_processor(images=rgb, return_tensors="pt")
            except ValueError as e:  # smart_resize rejects aspect ratios > 200
                raise BadRow(row_id, "bad image size", str(e)) from None
            pixel_values, image_grid_thw = out["pixel_values"].float(), out["image_grid_thw"].long()
            counts = (image_grid_thw.prod(-1) // self.merge_size**2).tolist()
        if ids.count(self.image_token_id) != len(images):
            # Either the template lost the images or the text itself spells a literal <|image_pad|>.
            detail = (
                f"{ids.count(self.image_token_id)} {IMAGE_TOKEN} for {len(images)} images (special tokens in text?)"
            )
            raise BadRow(row_id, "placeholder mismatch", detail)
        input_ids: list[int] = []
        it = iter(counts)
        for tid in ids:  # expand each pad at the id level: cheaper than re-tokenizing thousands of pad strings
            input_ids.extend([tid] * next(it) if tid == self.image_token_id else (tid,))
        num_prompt = len(input_ids)
        labels = None
        if response is not None:
            resp = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.end_of_turn_id]
            input_ids += resp
            labels = [IGNORE_INDEX] * num_prompt + resp
        mm = [int(t == self.image_token_id) for t in input_ids]
        return Sample(input_ids, labels, mm, pixel_values, image_grid_thw, num_prompt, row_id)


def _pick_chat_template(tokenizer, model_dir: Path) -> str:
    """The first template that renders one image as one `<|image_pad|>`: the tokenizer's, the model dir's
    processor template (chat_template.json / .jinja), then FALLBACK_CHAT_TEMPLATE. A text-only Qwen2 template
    would print the content list verbatim, hence the probe."""
    own = tokenizer.chat_template
    candidates = [("tokenizer", own.get("default") if isinstance(own, dict) else own)]
    if (path := model_dir / "chat_template.json").is_file():
        candidates.append(("chat_template.json", json.loads(path.read_text()).get("chat_template")))
    if (model_dir / "chat_template.jinja").is_file():
        candidates.append(("chat_template.jinja", (model_dir / "chat_template.jinja").read_text()))
    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    for name, template in candidates:
        try:
            text = template and tokenizer.apply_chat_template(
                probe, chat_template=template, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # any template error only disqualifies this candidate
            logger.debug("chat template %s does not render: %s", name, e)
            continue
        if text and text.count(IMAGE_TOKEN) == 1:
            logger.info("chat template: %s (from %s)", name, model_dir)
            return template
    logger.warning("no chat template in %s renders images; using the built-in Qwen2-VL template", model_dir)
    return FALLBACK_CHAT_TEMPLATE


# ---------------------------------------------------------------------------------------------------- rows


def encode_rows(
    data: datasets.Dataset | str | os.PathLike, processor: Processor, *, template: str = "{problem}",
    response_column: str | None = None, system: str | None = None, on_bad_row: str = "skip",
    max_tokens: int | None = None, source: str | None = None, max_pixel_bytes: int | None = None,
    shard: bool = True, need_answer: bool | None = None,
) -> tuple[list[Sample], BadRowReport]:  # fmt: skip
    """Encode every row; skip (and count, and log) or raise on bad rows. Never drops a row silently.

    A bad row: a missing (None, NaN or blank) problem, response or, where answers are needed, answer; a
    missing/corrupt image; a placeholder/image count mismatch; more than `max_tokens` tokens. Prompt rows (where
    answers are needed) must have unique ids: a duplicate raises ValueError naming them, whatever `on_bad_row`.

    Args:
        data: a Dataset, or a path for `load_rows`.
        response_column: SFT response column; None for prompt-only rows (labels None).
        need_answer: rows without an answer are bad; default: for prompt-only rows (their answer is the reward's
            or the filter's target), not for rows with a response (SFT, DPO: the answer is unused).
        on_bad_row: "skip" or "error" (raise BadRow naming file, row id, reason and fix).
        max_tokens: rows with more tokens (prompt + response) are bad ("too long").
        source: file the Dataset came from: relative image paths resolve against its directory and messages
            name it. Defaults to `data` when it is a path, else the current directory.
        max_pixel_bytes: keep the samples' pixel_values in memory while they total at most this; past it, every
            sample gets a `PixelLoader` instead and `Sample.pixels()` re-encodes its images on demand. None: keep.
        shard: under a process group of several ranks, rank r encodes rows r, r + world, ... and the ranks
            exchange the token ids (`_exchange`): the images are decoded and processed once in all, not once per
            rank. A sample another rank encoded has no pixel_values but a PixelLoader, like a sample past
            `max_pixel_bytes`. Every collective is entered by every rank (this is a collective call), and a bad
            row under "error" is raised on every rank alike. Must be called by all ranks together.

    Returns:
        (samples in row order, report), the same on every rank.
    """
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    need_answer = response_column is None if need_answer is None else need_answer
    if isinstance(data, (str, os.PathLike)):
        source = source or str(data)
        data = load_rows(data, response_column=response_column)
    source = source or "<in-memory dataset>"
    base_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    if response_column and response_column not in data.column_names:
        raise ValueError(f"{source}: response column {response_column!r} not in {data.column_names}")
    if need_answer:  # prompt rows: samples, rewards, judge questions and pairs are matched to their row by id
        check_unique_ids(row_ids(data), source)  # the same on every rank: each reads every id
    rank, world = rank_world() if shard else (0, 1)
    no_images_hint = "" if "images" in data.column_names else (
        f"; the data has no images column (found: {', '.join(data.column_names)}): if one holds the images, map it "
        f'with data.columns = {{images = "..."}}')
    mine: list[tuple[int, Sample]] = []
    bad: list[tuple[int, BadRow]] = []
    pixel_bytes, lazy, dropped = 0, False, 0
    failure: Exception | None = None  # under several ranks, an unexpected error must not leave the others waiting
    try:
        # Arrow format hands the images column over undecoded ({"bytes", "path"} structs or strings): datasets'
        # own decode would raise on the first corrupt image and take the whole read down with it.
        rows = (r for batch in data.with_format("arrow").iter(batch_size=256) for r in batch.to_pylist())
        for i, row in enumerate(rows):
            if i % world != rank:
                continue
            row_id = str(row["id"]) if row.get("id") not in (None, "") else f"row-{i}"
            entries = []
            try:
                answer = cell_text(row["answer"])
                if need_answer and answer is None:  # str() would make None the gold answer "None"
                    raise BadRow(row_id, "missing answer", f"answer is {row['answer']!r}")
                entries = row_images(row)
                images = [_open_image(e, base_dir) for e in entries]
                response = (cell_text(row[response_column]) or "") if response_column else None  # encode rejects ""
                sample = processor.encode(
                    cell_text(row["problem"]) or "", images, template=template, response=response, system=system,
                    row_id=row_id,
                )
                if max_tokens is not None and len(sample.input_ids) > max_tokens:
                    raise BadRow(row_id, "too long", f"{len(sample.input_ids)} tokens > max_tokens={max_tokens}")
            except BadRow as e:
                hint = no_images_hint if e.reason == "placeholder mismatch" and not entries else ""
                bad.append((i, BadRow(row_id, e.reason, e.detail + hint, source)))
                if on_bad_row == "error" and world == 1:
                    raise bad[-1][1] from None
                continue
            sample.answer, sample.choices = answer or "", row.get("choices")
            if sample.pixel_values is not None:
                pixel_bytes += sample.pixel_values.numel() * 4
                sample.pixel_loader = PixelLoader(data, i, base_dir, processor.image_processor)
            if max_pixel_bytes is not None and pixel_bytes > max_pixel_bytes and not lazy:
                lazy = True
                logger.info("%s: images past %.1f GiB of pixels are re-encoded when used instead of kept in memory",
                            source, max_pixel_bytes / 2**30)
            if lazy:
                for _, s in mine[dropped:] + [(i, sample)]:
                    s.pixel_values = None
                dropped = len(mine) + 1
            mine.append((i, sample))
    except Exception as e:
        if world == 1:
            raise
        failure = e
    if world > 1:
        mine, bad = _exchange(mine, bad, data, base_dir, processor, source, failure)
    if on_bad_row == "error" and bad:
        raise bad[0][1] from None  # the first bad row, on every rank
    report, reasons = BadRowReport(num_rows=len(data)), Counter()
    for _, e in bad:
        level = logging.DEBUG if reasons[e.reason] else logging.WARNING  # first per reason loud, rest quiet
        logger.log(level, "%s: skipping row %r: %s%s", source, e.row_id, e.reason, f" ({e.detail})" if e.detail else "")
        reasons[e.reason] += 1
        report.row_ids.append(e.row_id)
    samples = [s for _, s in mine]
    report.num_skipped, report.by_reason = len(report.row_ids), dict(reasons)
    if report.num_skipped:
        by = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        logger.warning("skipped %d of %d rows in %s: %s", report.num_skipped, report.num_rows, source, by)
    if not samples:
        raise ValueError(
            f"{source}: no usable rows ({report.num_rows} rows, {report.num_skipped} bad: {report.by_reason})"
        )
    return samples, report


def _exchange(mine, bad, data, base_dir: Path, processor: Processor, source: str, failure: Exception | None = None):
    """All ranks' (row index, sample) and (row index, BadRow), merged in row order on every rank. A rank whose
    encoding failed (`failure`) still takes part, then every rank raises: the failed one its own error, the others
    a RuntimeError naming that rank and error.

    Only what cannot be rebuilt cheaply travels: int32 token ids, the prompt length, whether there are labels,
    the image grids, the row's id, answer and choices. Labels and mm_token_type_ids follow from the ids exactly
    as `Processor.encode` builds them; pixels are re-encoded on use through a PixelLoader.
    """
    light = [(i, np.asarray(s.input_ids, dtype=np.int32), s.num_prompt_tokens, s.labels is not None,
              None if s.image_grid_thw is None else s.image_grid_thw.numpy(), s.row_id, s.answer, s.choices)
             for i, s in mine]
    parts = gather_object((light, [(i, e.row_id, e.reason, e.detail) for i, e in bad],
                           None if failure is None else f"{type(failure).__name__}: {failure}"))
    if failure is not None:
        raise failure
    failed = [(r, msg) for r, (_, _, msg) in enumerate(parts) if msg is not None]
    if failed:
        raise RuntimeError(f"{source}: encoding failed on rank {failed[0][0]}: {failed[0][1]}")
    own = {i for i, _ in mine}
    merged, all_bad = dict(mine), []
    for part_light, part_bad, _ in parts:
        for i, ids, num_prompt, has_labels, grid, row_id, answer, choices in part_light:
            if i in own:
                continue
            ids = ids.tolist()
            merged[i] = Sample(
                ids, [IGNORE_INDEX] * num_prompt + ids[num_prompt:] if has_labels else None,
                [int(t == processor.image_token_id) for t in ids], None,
                None if grid is None else torch.from_numpy(grid), num_prompt, row_id, answer=answer,
                choices=choices,
                pixel_loader=None if grid is None else PixelLoader(data, i, base_dir, processor.image_processor),
            )
        all_bad += [(i, BadRow(row_id, reason, detail, source)) for i, row_id, reason, detail in part_bad]
    return sorted(merged.items(), key=lambda x: x[0]), sorted(all_bad, key=lambda x: x[0])


# --------------------------------------------------------------------------------------------------- batching


def num_tokens(sample: Sample) -> int:
    """Sequence length T of one sample (prompt + response)."""
    return len(sample.input_ids)


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples into one batch for `model(**batch)`.

    Returns:
        input_ids / attention_mask / labels / mm_token_type_ids: [B, T] int64 (labels IGNORE_INDEX on padding
        and everywhere for prompt-only samples); pixel_values [P, D] float32 and image_grid_thw [num_images, 3]
        int64, concatenated in sample order, present only if some sample has images.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    b, t = len(samples), max(num_tokens(s) for s in samples)
    batch = {
        "input_ids": torch.full((b, t), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(b, t, dtype=torch.long),
        "labels": torch.full((b, t), IGNORE_INDEX, dtype=torch.long),
        "mm_token_type_ids": torch.zeros(b, t, dtype=torch.long),
    }
    for i, s in enumerate(samples):
        n = num_tokens(s)
        batch["input_ids"][i, :n] = torch.tensor(s.input_ids)
        batch["attention_mask"][i, :n] = 1
        batch["mm_token_type_ids"][i, :n] = torch.tensor(s.mm_token_type_ids)
        if s.labels is not None:
            batch["labels"][i, :n] = torch.tensor(s.labels)
    with_images = [s for s in samples if s.image_grid_thw is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([s.pixels() for s in with_images])
        batch["image_grid_thw"] = torch.cat([s.image_grid_thw for s in with_images])
    return batch


def plan_micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group sample indices so each group's padded size, len(group) * max length in group, is <= max_tokens.

    Deterministic: sort by length descending (ties by index), then fill greedily; a sample longer than
    max_tokens gets a group of its own. Every index appears exactly once; no group is empty.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        # Descending order: a group's first member is its longest, so its padded size is len * that length.
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """Permutation of range(num_samples) for one epoch, a pure function of (seed, epoch) so a resumed run
    can skip to its saved position."""
    # Not seed + epoch: (seed 0, epoch 1) and (seed 1, epoch 0) would then share an order.
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(num_samples, generator=gen).tolist()

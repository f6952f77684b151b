"""Recipe files that include other TOML files: read a recipe and the files it includes into one raw table.

A recipe (or an included file) may start with a top-level `include` list, before its first table:

    include = ["../include/five_benchmarks.toml"]   # paths relative to the file that names them

The included files are read first, in order, each with its own includes; the including file's own keys go on
top. Merging, for two values under the same key:
  - tables merge key by key, recursively (the later value of a key wins);
  - the top-level `[[stages]]` list merges by stage `name`: a stage the file defines under a name an included file
    also uses is merged onto the included one, table by table, and takes the file's position; included stages the
    file does not name come first, in include order;
  - everything else (numbers, strings, any other list, `[[stages.benchmarks]]` among them) is replaced whole.
So a recipe overrides one setting of an included stage with one key, and replaces a list (models, benchmarks) by
writing it out. The resolved config (`python -m engine.config RECIPE`) shows the merged result.

A leaf module: standard library only, so reading a recipe stays cheap. Errors name the file: a missing file, a
file that is not UTF-8 or not TOML, an include cycle (with the chain), an `include` that is not a list of paths.
"""

from __future__ import annotations

import tomllib
from pathlib import Path


class RecipeFileError(ValueError):
    """A recipe or included file that cannot be read; `path` is the file to fix, `message` says why."""

    def __init__(self, path: Path, message: str):
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}")


def _read_toml(path: Path, named_by: Path | None, as_written: str = "") -> dict:
    if not path.is_file():
        if named_by is None:
            raise RecipeFileError(path, f"recipe file not found (cwd: {Path.cwd()})")
        raise RecipeFileError(named_by, f"include {as_written!r}: file not found (looked for {path}; paths are "
                                        f"relative to the file that names them)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeFileError(path, f"not a text file (not UTF-8: byte {data[e.start]:#04x} at offset {e.start}); a "
                                    f"recipe is a TOML file such as recipes/tiny.toml") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeFileError(path, f"not valid TOML: {e}") from None


def _merge_tables(base: dict, top: dict) -> dict:
    """`top` over `base`: tables merge recursively, anything else in `top` replaces `base`'s value."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_tables(out[key], value)
        else:
            out[key] = value
    return out


def _stage_name(stage) -> str | None:
    return stage.get("name") if isinstance(stage, dict) and isinstance(stage.get("name"), str) else None


def _merge_stages(base: list, top: list) -> list:
    """`top`'s stages over `base`'s, matched by name (see the module docstring)."""
    by_name = {_stage_name(s): s for s in base if _stage_name(s) is not None}
    named_in_top = {_stage_name(s) for s in top} - {None}
    kept = [s for s in base if _stage_name(s) not in named_in_top or _stage_name(s) is None]
    merged = [_merge_tables(by_name[_stage_name(s)], s) if _stage_name(s) in by_name and isinstance(s, dict) else s
              for s in top]
    return kept + merged


def merge_recipes(base: dict, top: dict) -> dict:
    """The raw recipe `top` over `base` (module docstring: tables by key, `stages` by name, the rest replaced)."""
    out = _merge_tables({k: v for k, v in base.items() if k != "stages"},
                        {k: v for k, v in top.items() if k != "stages"})
    base_stages, top_stages = base.get("stages", []), top.get("stages", [])
    if isinstance(base_stages, list) and isinstance(top_stages, list):
        stages = _merge_stages(base_stages, top_stages)
    else:  # a malformed `stages` value: keep the file's own, the loader names the problem
        stages = top_stages if "stages" in top else base_stages
    if "stages" in base or "stages" in top:
        out["stages"] = stages
    return out


def _include_paths(raw: dict, path: Path) -> list[tuple[str, Path]]:
    value = raw.pop("include", [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RecipeFileError(path, f"include = {value!r}: expected a list of TOML file paths relative to this file, "
                                    f"e.g. include = [\"../include/five_benchmarks.toml\"]")
    return [(v, path.parent / v) for v in value]


def _read(path: Path, chain: list[Path], named_by: Path | None, files: list[Path], as_written: str = "") -> dict:
    resolved = path.resolve()
    if resolved in chain:
        loop = " -> ".join(str(p) for p in [*chain[chain.index(resolved):], resolved])
        raise RecipeFileError(named_by or path, f"include cycle: {loop}")
    raw = _read_toml(path, named_by, as_written)
    files.append(path)
    merged: dict = {}
    for text, inc in _include_paths(raw, path):
        merged = merge_recipes(merged, _read(inc, [*chain, resolved], path, files, text))
    return merge_recipes(merged, raw)


def read_recipe(path: str | Path) -> tuple[dict, list[Path]]:
    """The raw table of recipe `path` with its includes merged in, and the files read (the recipe first).
    Raises RecipeFileError naming the file at fault."""
    files: list[Path] = []
    raw = _read(Path(path), [], None, files)
    return raw, files

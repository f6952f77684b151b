"""Recipes: TOML files -> typed, validated dataclasses.

A recipe is `[run]`, `[model]` and a list of `[[stages]]`; each stage has a `name`, a `kind` and the tables
its kind needs (`[stages.optim]`, `[stages.train]`, ...). A recipe may include shared TOML files (`include = [...]`,
engine/config_include.py: tables merge by key, stages by name, the recipe's own keys win). Loading collects every
problem (unknown keys with a did-you-mean, wrong types, bad values, cross-stage references) and raises one
`ConfigError` before any work.

    python -m engine.config recipes/tiny.toml [--stages.pretrain.optim.lr=1e-3]   # print the resolved config
                                                  # (files that do not exist yet are listed as warnings)
"""

import dataclasses
import difflib
import math
import re
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from engine.config_include import RecipeFileError, read_recipe
from engine.stages.config import STAGE_KINDS, StageConfig


class ConfigError(ValueError):
    """All problems of one recipe, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}\n" + "\n".join(f"  {p}" for p in problems))


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    name: str
    """Run name; used in logs and in the default output directory."""
    out_dir: str = ""
    """Output directory; each stage writes `<out_dir>/<stage name>/`. Empty: `runs/<name>`."""
    seed: int = 0
    """Seed for data order, initialisation and sampling."""
    deterministic: bool = False
    """Use deterministic torch algorithms (slower on GPU; the CPU paths are deterministic anyway)."""
    log_every: int = 1
    """Print one progress line every this many optimizer steps."""
    progress_every_s: float = 30.0
    """Long loops (rollouts, eval and distill chunks) print a progress line at most this often, in seconds."""
    trackers: list[Literal["tensorboard", "wandb"]] = dataclasses.field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides `<stage>/metrics.jsonl` (engine/tracking.py): TensorBoard event files in
    `<out_dir>/tensorboard/`, Weights & Biases, both, or [] for none. A tracker not installed is skipped with a note."""
    wandb_project: str = "specs-engine"
    """Weights & Biases project (with "wandb" in trackers); the W&B run is named after `run.name`."""
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    """auto: online when a W&B API key is configured (WANDB_API_KEY or `wandb login`), offline otherwise."""

    def check(self) -> list[str]:
        problems = [] if self.name.strip() else ["run.name must not be empty"]
        if self.log_every < 1:
            problems.append(f"run.log_every must be >= 1, got {self.log_every}")
        if self.progress_every_s <= 0:
            problems.append(f"run.progress_every_s must be > 0, got {self.progress_every_s}")
        return problems


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    path: str = ""
    """Hugging Face checkpoint directory of the base model; stages refer to it as "model"."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype of parameters under FSDP2 mixed precision. auto: bfloat16 on CUDA, float32 on CPU.
    Master weights, gradients reduction and optimizer state stay float32."""
    attn_implementation: Literal["varlen", "sdpa", "eager"] = "varlen"
    """Attention: "varlen" (ours, engine/attention.py: attends within each packed sample; varlen_attn on CUDA,
    sdpa per sample on CPU) or transformers' "sdpa" / "eager" (a dense block-diagonal mask for packed rows)."""
    freeze_vision: bool = True
    """Keep the vision tower (and its merger) frozen."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (saves memory, costs ~30% time)."""
    logprob_chunk_tokens: int = 1024
    """Tokens per chunk when computing log-probs from hidden states (bounds the logits memory)."""

    def check(self) -> list[str]:
        if self.logprob_chunk_tokens < 1:
            return [f"model.logprob_chunk_tokens must be >= 1, got {self.logprob_chunk_tokens}"]
        return []


@dataclasses.dataclass(kw_only=True)
class Config:
    run: RunConfig
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    stages: list[StageConfig] = dataclasses.field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out_dir or f"runs/{self.run.name}")


# ----------------------------------------------------------------------------------------------------------
# Loading: parse -> unknown keys / types -> overrides -> checks. Problems are collected, never raised early.


_INVALID = object()  # a value that failed its type check (already reported)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of {" + ", ".join(map(str, typing.get_args(tp))) + "}"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the converted value (or the raw one on error)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # `X | None`: TOML has no null, so only X can arrive
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], where, problems)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}: {value!r} not in {{{', '.join(map(str, args))}}}{hint}")
            return _INVALID
        return value
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a table, e.g. {{a = \"b\"}}, got {type(value).__name__} {value!r}")
            return _INVALID
        items = {k: _convert(v, args[1], f"{where}.{k}", problems) for k, v in value.items()}
        return _INVALID if any(v is _INVALID for v in items.values()) else items
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return _INVALID
        items = [_convert(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in items) else items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a table, got {type(value).__name__} {value!r}")
            return _INVALID
        built = _build(tp, value, where, problems)
        return _INVALID if built is None else built
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # int widens to float; never the reverse
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        # TOML spells nan and inf; no setting means them, and nan passes every `<=` check of a check() method.
        problems.append(f"{where}: must be a finite number, got {value}")
        return _INVALID
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    if not ok:
        problems.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return _INVALID
    return value


def _build(cls: type, table: dict, where: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a TOML table, recording unknown keys, wrong types and missing fields."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in table.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(fields)})"
            problems.append(f"{path}: unknown key{hint}")
            continue
        kwargs[key] = _convert(value, hints[key], path, problems)
    # An invalid value falls back to the field's default, so the remaining checks of this table still run and
    # report their problems too; the recipe is rejected anyway because the problem list is not empty.
    buildable = True
    for name, f in fields.items():
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if kwargs.get(name, None) is _INVALID:
            del kwargs[name]
            buildable &= has_default
        elif name not in kwargs and not has_default:
            problems.append(f"{where + '.' if where else ''}{name}: required key is missing")
            buildable = False
    return cls(**kwargs) if buildable else None


def _parse_value(text: str) -> Any:
    """A command-line value: TOML syntax when it parses (1e-5, true, [1, 2], "x"), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str], problems: list[str]) -> None:
    """Apply `--section.key=value` overrides to the raw TOML dict in place.

    Stages are addressed by name: `--stages.pretrain.optim.lr=1e-4`.
    """
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            problems.append(f"override {item!r}: expected --section.key=value")
            continue
        dotted, value = text.split("=", 1)
        parts = dotted.split(".")
        node: Any = raw
        if parts[0] == "stages":
            stages = {s.get("name"): s for s in raw.get("stages", []) if isinstance(s, dict)}
            if len(parts) < 3 or parts[1] not in stages:
                problems.append(f"override {item!r}: no stage named {parts[1] if len(parts) > 1 else ''!r} "
                                f"(stages: {', '.join(map(str, stages))})")
                continue
            node, parts = stages[parts[1]], parts[2:]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {part!r} is not a table")
                break
        else:
            node[parts[-1]] = _parse_value(value)


def _check_tree(obj: Any, where: str, problems: list[str]) -> None:
    """Run `check()` on every dataclass in the tree, prefixing messages with the stage path."""
    if not dataclasses.is_dataclass(obj):
        return
    if hasattr(obj, "check"):
        problems.extend(f"{where}{p}" if where else p for p in obj.check())
    for f in dataclasses.fields(obj):
        _check_tree(getattr(obj, f.name), where, problems)


def _stage_problem(stage: StageConfig, problem: str) -> str:
    """`stages.<name>.<key>...` when a stage's check names one of its keys first, else `stages.<name>: ...`."""
    first = problem.split(" ", 1)[0].split(".", 1)[0].split("[", 1)[0]
    named_key = first in {f.name for f in dataclasses.fields(stage)}
    return f"stages.{stage.name}.{problem}" if named_key else f"stages.{stage.name}: {problem}"


def parse_config(raw: dict, overrides: list[str] = (), source: str = "<recipe>",
                 file_warnings: list[str] | None = None) -> Config:
    """Validate a raw TOML dict (plus overrides) into a `Config`, or raise one `ConfigError` with everything.

    `file_warnings`: when a list, problems with files that do not exist (yet) go there instead of failing, so a
    recipe can be printed before its data and models are in place."""
    problems: list[str] = []
    apply_overrides(raw, list(overrides), problems)
    stages_raw = raw.pop("stages", [])
    cfg = _build(Config, raw, "", problems)
    stages: list[StageConfig] = []
    if not isinstance(stages_raw, list) or not stages_raw:
        problems.append("stages: a recipe needs at least one [[stages]] table")
        stages_raw = []
    for i, table in enumerate(stages_raw):
        name = table.get("name", f"#{i}") if isinstance(table, dict) else f"#{i}"
        kind = table.get("kind") if isinstance(table, dict) else None
        if kind not in STAGE_KINDS:
            close = difflib.get_close_matches(str(kind), list(STAGE_KINDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"stages.{name}.kind: {kind!r} not in {{{', '.join(STAGE_KINDS)}}}{hint}")
            continue
        stage = _build(STAGE_KINDS[kind], table, f"stages.{name}", problems)
        if stage is not None:
            stages.append(stage)
    if cfg is not None:
        cfg.stages = stages
        _check_tree(cfg.run, "", problems)
        _check_tree(cfg.model, "", problems)
        for stage in stages:
            problems.extend(_stage_problem(stage, p) for p in stage.check())
        files: list[str] = []
        problems.extend(_cross_checks(cfg, files))
        if file_warnings is None:
            problems.extend(files)
        else:
            file_warnings.extend(dict.fromkeys(files))
    if problems:
        raise ConfigError(source, list(dict.fromkeys(problems)))  # once each (a bad model.path, for one)
    return cfg


def parse_stage(table: dict, overrides: list[str] = (), source: str = "<stage>") -> StageConfig:
    """One `[[stages]]` table, validated like a recipe's stage but without the checks that need other stages.
    `overrides` are `--key=value` relative to the stage (`--max_new_tokens=2048`, `--judge.enabled=true`)."""
    problems: list[str] = []
    table = dict(table)
    apply_overrides(table, list(overrides), problems)
    name, kind = table.get("name", "stage"), table.get("kind")
    if kind not in STAGE_KINDS:
        raise ConfigError(source, [f"kind: {kind!r} not in {{{', '.join(STAGE_KINDS)}}}"])
    stage = _build(STAGE_KINDS[kind], table, name, problems)
    if stage is not None:
        problems.extend(_stage_problem(stage, p).removeprefix("stages.") for p in stage.check())
    if problems:
        raise ConfigError(source, list(dict.fromkeys(problems)))
    return stage


def _cross_checks(cfg: Config, files: list[str]) -> list[str]:
    """Problems that need more than one table: stage names, references to earlier stages. Problems with files
    (missing paths, a model directory without weights, an uncached hub id offline) go to `files`."""
    from engine.hub import model_path_problems

    problems = []
    seen: dict[str, StageConfig] = {}
    for stage in cfg.stages:
        where = f"stages.{stage.name}"
        if stage.name in seen:
            problems.append(f"{where}.name: duplicate stage name {stage.name!r}")
        if stage.name == "model":
            problems.append(f"{where}.name: 'model' is reserved for the base model ([model].path)")
        for key, ref in stage.model_inputs().items():
            if ref == "model":
                if not cfg.model.path:
                    problems.append(f"{where}.{key} = 'model' but [model].path is empty (set it to a Hugging Face "
                                    f"model directory or id)")
                else:
                    files.extend(model_path_problems(cfg.model.path, "model.path"))
            elif ref not in seen:
                known = ", ".join(["model", *seen])
                problems.append(f"{where}.{key} = {ref!r}: not the base model or an earlier stage (known: {known})")
            elif not seen[ref].produces_model:
                problems.append(f"{where}.{key} = {ref!r}: stage {ref!r} (kind {seen[ref].kind}) has no model output")
        for key, text in stage.model_paths().items():
            files.extend(model_path_problems(text, f"{where}.{key}"))
        for key, path in stage.path_inputs().items():
            stage_ref, sep, _ = path.partition(":")
            if sep and stage_ref not in seen:
                problems.append(f"{where}.{key} = {path!r}: {stage_ref!r} is not an earlier stage "
                                f"(use '<stage>:relative/path' for a stage's output, or a plain path)")
            elif not sep and not Path(path).exists():
                files.append(f"{where}.{key}: {path!r} does not exist")
        seen[stage.name] = stage
    return problems


def load_config(path: str | Path, overrides: list[str] = (), file_warnings: list[str] | None = None) -> Config:
    """Read and validate a recipe file and the files it includes (engine/config_include.py; `file_warnings`: see
    `parse_config`)."""
    try:
        raw, _ = read_recipe(path)
    except RecipeFileError as e:
        raise ConfigError(str(e.path), [e.message]) from None
    return parse_config(raw, overrides, source=str(path), file_warnings=file_warnings)


# ----------------------------------------------------------------------------------------------------------
# Writing the resolved config back as TOML (tomllib only reads).


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table; keys quoted unless bare
        return "{" + ", ".join(f"{k if _BARE_KEY.fullmatch(k) else _toml_value(k)} = {_toml_value(x)}"
                               for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_table(obj: Any, header: str, lines: list[str]) -> None:
    scalars, tables, arrays = [], [], []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None:
            continue  # an unset optional value: TOML has no null
        if dataclasses.is_dataclass(v):
            tables.append((f.name, v))
        elif isinstance(v, list) and v and all(dataclasses.is_dataclass(x) for x in v):
            arrays.append((f.name, v))  # a list of tables: [[a.b]] blocks
        else:
            scalars.append((f.name, v))
    lines.append(header)
    lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars)
    lines.append("")
    sub = header.strip("[]")
    for k, v in tables:
        _toml_table(v, f"[{sub}.{k}]", lines)
    for k, items in arrays:
        for item in items:
            _toml_table(item, f"[[{sub}.{k}]]", lines)


def to_toml(cfg: Config) -> str:
    """The fully resolved config (every default filled in) as TOML that `load_config` reads back."""
    lines: list[str] = []
    _toml_table(cfg.run, "[run]", lines)
    _toml_table(cfg.model, "[model]", lines)
    for stage in cfg.stages:
        _toml_table(stage, "[[stages]]", lines)
    # Sub-tables of an array-of-tables element are written as [stages.x] right after their [[stages]].
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        sys.stderr.write("usage: python -m engine.config RECIPE.toml [--section.key=value ...]\n")
        return 2
    missing: list[str] = []
    try:
        cfg = load_config(argv[0], argv[1:], file_warnings=missing)
    except ConfigError as e:
        sys.stderr.write(f"{e}\n")
        return 2
    included = [str(p) for p in read_recipe(argv[0])[1][1:]]
    if included:  # a TOML comment: the output still loads as a recipe
        sys.stdout.write(f"# {argv[0]} with {', '.join(included)} merged in (engine/config_include.py)\n")
    sys.stdout.write(to_toml(cfg))
    for problem in missing:  # after the config, so they are the last thing on the screen
        sys.stderr.write(f"warning: {problem} (engine/train.py needs it before it starts)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

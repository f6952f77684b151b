"""What each stage ran with, and the check that a rerun asks for the same thing.

Before a stage runs, `<stage dir>/config.toml` gets the settings that decide its output (its own table, `[model]`,
`run.seed`, `run.deterministic`) and `<stage dir>/config.sha256` their hash. On a rerun `plan_stages` compares
every stage that has a directory with the recipe as it is now:
- same settings: a finished stage is skipped, an unfinished one resumes;
- different settings: the run stops before any work, listing the differing keys and the ways forward: a new
  `run.out_dir`, or `--rerun STAGE` / `--force`, which move that stage's directory and every later one aside to
  `<out_dir>/replaced/<time>/` (nothing is deleted) and run them again.
Settings that do not change a stage's output (`run.name`, `run.log_every`, `run.trackers`) are not recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
import tomllib
from pathlib import Path

from engine.stages import DONE_MARKER

RECORD = "config.toml"
HASH = "config.sha256"


def record_text(cfg, stage) -> str:
    """The record of `stage` (a StageConfig of `cfg`) as TOML, with a header saying what it is."""
    from engine.config import _toml_table  # the resolved-config writer; imported here to avoid a cycle

    lines = [f"# The settings stage {stage.name!r} ran with (engine/train.py compares them on every rerun).",
             "[run]", f"seed = {cfg.run.seed}", f"deterministic = {str(cfg.run.deterministic).lower()}", ""]
    _toml_table(cfg.model, "[model]", lines)
    _toml_table(stage, "[stage]", lines)
    return "\n".join(lines).rstrip() + "\n"


def record_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_record(cfg, stage, stage_dir: Path) -> None:
    """Write the record of a stage about to run (rank 0)."""
    text = record_text(cfg, stage)
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / RECORD).write_text(text)
    (stage_dir / HASH).write_text(record_hash(text) + "\n")


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        path = f"{prefix}[{key}]" if isinstance(key, int) else (f"{prefix}.{key}" if prefix else key)
        if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


_UNSET = object()


def _show(value) -> str:
    return "(not set)" if value is _UNSET else repr(value)


def field_default(cfg, stage, key: str):
    """The dataclass default of a record key ("stage.eval.samples", "model.dtype", "stage.benchmarks[0].limit"),
    or _UNSET when the key names no field with a default."""
    head, _, rest = key.partition(".")
    obj = {"stage": stage, "model": cfg.model, "run": cfg.run}.get(head)
    parts = rest.replace("[", ".[").split(".") if rest else []
    for part in parts[:-1]:
        try:
            obj = obj[int(part[1:-1])] if part.startswith("[") else getattr(obj, part)
        except (AttributeError, IndexError, TypeError, ValueError):
            return _UNSET
    if obj is None or not parts or not dataclasses.is_dataclass(obj):
        return _UNSET
    for f in dataclasses.fields(obj):
        if f.name == parts[-1]:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return _UNSET


def _comparable(value):
    """TOML has no None and writes tuples as lists: compare defaults the way they read back from a record."""
    if isinstance(value, tuple):
        return [_comparable(v) for v in value]
    if dataclasses.is_dataclass(value):
        return _UNSET  # a whole table missing from the record: compared key by key, never equal as a unit
    return value


def differing_keys(old_text: str, new_text: str, stage_name: str, default=None) -> list[str]:
    """`key: ran with X, now Y` for every key that differs, keys named as on the command line. `default(key)`: the
    value a key missing from the old record had (a field added to the engine after the stage ran, at its default,
    is not a difference); None: every missing key differs."""
    old, new = _flatten(tomllib.loads(old_text)), _flatten(tomllib.loads(new_text))
    out = []
    for key in [*new, *(k for k in old if k not in new)]:  # in the record's order
        if key not in old and default is not None and _comparable(default(key)) == new[key]:
            continue
        if old.get(key, _UNSET) != new.get(key, _UNSET):
            shown = f"stages.{stage_name}{key[len('stage'):]}" if key.startswith("stage.") else key
            out.append(f"{shown}: ran with {_show(old.get(key, _UNSET))}, now {_show(new.get(key, _UNSET))}")
    return out


@dataclasses.dataclass
class Plan:
    """What a run does with each stage: "skip" (finished with these settings), "resume" or "run"."""

    actions: dict[str, str]
    move_aside: list[str]
    """Stage directories to move to `<out_dir>/replaced/<time>/` before running (from --rerun / --force)."""
    notes: list[str]
    """Warnings for the log (e.g. a stage finished before records existed: cannot be checked)."""


class RerunError(ValueError):
    """The recipe asks a finished or started stage for settings it did not run with."""


def plan_stages(cfg, out_dir: Path, *, rerun: str | None = None, force: bool = False) -> Plan:
    """Compare each stage's record with the recipe; raise RerunError listing the differences and the ways forward.

    Args:
        rerun: a stage name: run it and every later stage again, whatever their records say.
        force: run again from the first stage whose settings differ.
    """
    names = [s.name for s in cfg.stages]
    if rerun is not None and rerun not in names:
        raise RerunError(f"--rerun {rerun}: no such stage (stages: {', '.join(names)})")
    actions, notes, first_redo = {}, [], names.index(rerun) if rerun else None
    problems: list[str] = []
    for i, stage in enumerate(cfg.stages):
        stage_dir = out_dir / stage.name
        if first_redo is not None and i >= first_redo:
            actions[stage.name] = "run"
            continue
        done = (stage_dir / DONE_MARKER).is_file()
        started = stage_dir.is_dir() and any(stage_dir.iterdir())
        if not started:
            actions[stage.name] = "run"
            continue
        record = stage_dir / RECORD
        if not record.is_file():
            notes.append(f"stage {stage.name}: {stage_dir} has no {RECORD} (written by an older version of the "
                         f"engine): its settings cannot be checked against the recipe")
            actions[stage.name] = "skip" if done else "resume"
            continue
        diff = differing_keys(record.read_text(), record_text(cfg, stage), stage.name,
                              default=lambda key, stage=stage: field_default(cfg, stage, key))
        if not diff:
            actions[stage.name] = "skip" if done else "resume"
            continue
        if force:
            first_redo = i
            actions[stage.name] = "run"
            continue
        state = "finished" if done else "started (not finished)"
        problems.append(f"stage {stage.name} {state} in {stage_dir} with other settings:\n    " + "\n    ".join(diff))
        break  # later stages depend on this one: their differences would only repeat it
    if problems:
        name = problems[0].split()[1]
        raise RerunError(
            "\n".join(problems) + "\nNothing was run and nothing was changed. Either:\n"
            f"  - write to a new directory: --run.out_dir={out_dir}-2\n"
            f"  - or run {name} and every later stage again with these settings: --rerun {name} (or --force); "
            f"their current directories move to {out_dir / 'replaced'}/<time>/, nothing is deleted")
    if first_redo is not None:
        for stage in cfg.stages[first_redo:]:
            actions[stage.name] = "run"
    move = [n for n in names[first_redo:] if (out_dir / n).exists()] if first_redo is not None else []
    _check_order(cfg, out_dir, actions, move)
    return Plan(actions, move, notes)


def _check_order(cfg, out_dir: Path, actions: dict, move: list[str]) -> None:
    """A stage that will run from scratch must not have a finished stage after it whose output came from its old
    output (someone deleted a stage directory): that later stage would be skipped although its input changes."""
    for i, stage in enumerate(cfg.stages):
        if actions[stage.name] == "skip" or stage.name in move:
            continue
        later = [s.name for s in cfg.stages[i + 1:] if actions[s.name] == "skip" and s.name not in move]
        if later:
            raise RerunError(
                f"stage {stage.name} is not finished in {out_dir / stage.name} and will run, but later stage(s) "
                f"{', '.join(later)} finished earlier from its old output. Either write to a new directory "
                f"(--run.out_dir=...) or run them again too: --rerun {stage.name}")


def move_aside(out_dir: Path, names: list[str]) -> Path | None:
    """Move the named stage directories to `<out_dir>/replaced/<time>/` (rank 0); returns that folder."""
    if not names:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, i = out_dir / "replaced" / stamp, 2
    while dest.exists():  # two reruns within a second
        dest, i = out_dir / "replaced" / f"{stamp}-{i}", i + 1
    dest.mkdir(parents=True)
    for name in names:
        shutil.move(str(out_dir / name), str(dest / name))
    return dest

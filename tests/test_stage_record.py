"""Reruns never lie: each stage records the settings it ran with, a rerun with other settings stops before any work
and says which keys differ, `--rerun` / `--force` move the old directories aside, config.resolved.toml is only
written for settings that run."""

import tomllib

import pytest

from engine import train
from engine.config import parse_config
from engine.stage_record import RECORD, RerunError, differing_keys, plan_stages, record_text, write_record

RECIPE = """
[run]
name = "r"
[[stages]]
name = "a"
kind = "toy"
num_train = 16
num_test = 8
vocab_size = 400
[[stages]]
name = "b"
kind = "toy"
num_train = 16
num_test = 8
vocab_size = 400
[[stages]]
name = "c"
kind = "toy"
num_train = 16
num_test = 8
vocab_size = 400
"""


def _cfg(tmp_path, *overrides):
    return parse_config(tomllib.loads(RECIPE), [f"--run.out_dir={tmp_path}", *overrides])


def _finish(cfg, tmp_path, names):
    """Fake finished stages: their record and DONE marker, as train.py leaves them."""
    for stage in cfg.stages:
        if stage.name in names:
            write_record(cfg, stage, tmp_path / stage.name)
            (tmp_path / stage.name / "DONE").write_text("{}\n")


def test_same_settings_skip_finished_and_resume_started(tmp_path):
    cfg = _cfg(tmp_path)
    _finish(cfg, tmp_path, ["a"])
    write_record(cfg, cfg.stages[1], tmp_path / "b")  # b started, not finished
    plan = plan_stages(_cfg(tmp_path, "--run.log_every=5"), tmp_path)  # log_every does not change an output
    assert plan.actions == {"a": "skip", "b": "resume", "c": "run"} and plan.move_aside == []


def test_changed_setting_stops_with_the_keys_and_both_ways_forward(tmp_path):
    cfg = _cfg(tmp_path)
    _finish(cfg, tmp_path, ["a", "b", "c"])
    with pytest.raises(RerunError) as e:
        plan_stages(_cfg(tmp_path, "--stages.b.seed=3", "--stages.c.num_train=32"), tmp_path)
    msg = str(e.value)
    assert "stage b finished" in msg and "stages.b.seed: ran with 0, now 3" in msg
    assert "stages.c" not in msg  # the first differing stage only: later ones depend on it anyway
    assert f"--run.out_dir={tmp_path}-2" in msg and "--rerun b" in msg and "--force" in msg
    with pytest.raises(RerunError, match="model.dtype: ran with 'auto', now 'float32'"):
        plan_stages(_cfg(tmp_path, "--model.dtype=float32"), tmp_path)
    with pytest.raises(RerunError, match="run.seed: ran with 0, now 1"):
        plan_stages(_cfg(tmp_path, "--run.seed=1"), tmp_path)


def test_a_started_stage_with_other_settings_stops_too(tmp_path):
    cfg = _cfg(tmp_path)
    write_record(cfg, cfg.stages[0], tmp_path / "a")
    with pytest.raises(RerunError, match="stage a started"):
        plan_stages(_cfg(tmp_path, "--stages.a.vocab_size=512"), tmp_path)


def test_rerun_and_force_redo_that_stage_and_every_later_one(tmp_path):
    cfg = _cfg(tmp_path)
    _finish(cfg, tmp_path, ["a", "b", "c"])
    plan = plan_stages(cfg, tmp_path, rerun="b")
    assert plan.actions == {"a": "skip", "b": "run", "c": "run"} and plan.move_aside == ["b", "c"]
    plan = plan_stages(_cfg(tmp_path, "--stages.b.seed=3"), tmp_path, force=True)
    assert plan.actions == {"a": "skip", "b": "run", "c": "run"} and plan.move_aside == ["b", "c"]
    with pytest.raises(RerunError, match="no such stage"):
        plan_stages(cfg, tmp_path, rerun="nope")


def test_a_missing_stage_before_a_finished_one_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    _finish(cfg, tmp_path, ["a", "c"])  # b's directory was deleted by hand
    with pytest.raises(RerunError, match="later stage.s. c finished earlier"):
        plan_stages(cfg, tmp_path)


def test_a_stage_without_a_record_is_skipped_with_a_warning(tmp_path):
    cfg = _cfg(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "DONE").write_text("{}\n")
    plan = plan_stages(cfg, tmp_path)
    assert plan.actions["a"] == "skip" and "cannot be checked" in plan.notes[0]


def test_differing_keys_name_list_items_and_unset_keys():
    cfg = parse_config(tomllib.loads(RECIPE), [])
    old = record_text(cfg, cfg.stages[0])
    new = old.replace("num_train = 16", "num_train = 17") + "extra = 1\n"
    assert differing_keys(old, new, "a") == ["stages.a.num_train: ran with 16, now 17",
                                             "stages.a.extra: ran with (not set), now 1"]


def test_train_main_refuses_then_reruns(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    assert train.main([str(recipe), f"--run.out_dir={out}"]) == 0
    resolved = (out / "config.resolved.toml").read_text()
    assert "vocab_size = 400" in (out / "b" / RECORD).read_text()
    assert "[run]" not in capsys.readouterr().out  # the resolved config goes to its file, not the console

    # A changed setting for a finished stage: exit 2, nothing run, nothing rewritten.
    assert train.main([str(recipe), f"--run.out_dir={out}", "--stages.b.vocab_size=512"]) == 2
    assert "stages.b.vocab_size: ran with 400, now 512" in capsys.readouterr().out
    assert (out / "config.resolved.toml").read_text() == resolved
    assert "vocab_size = 400" in (out / "b" / RECORD).read_text()

    # --rerun b: b and c run again with the new setting; their old directories are kept aside.
    assert train.main([str(recipe), f"--run.out_dir={out}", "--stages.b.vocab_size=512", "--rerun", "b"]) == 0
    assert "vocab_size = 512" in (out / "b" / RECORD).read_text()
    assert "vocab_size = 512" in (out / "config.resolved.toml").read_text()
    (old,) = (out / "replaced").iterdir()
    assert sorted(p.name for p in old.iterdir()) == ["b", "c"] and (old / "b" / "DONE").is_file()
    assert (out / "c" / "DONE").is_file() and (out / "a" / "DONE").is_file()


def test_move_aside_twice_in_a_second_keeps_both(tmp_path):
    from engine.stage_record import move_aside

    for _ in range(2):
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "DONE").write_text("{}\n")
        move_aside(tmp_path, ["b"])
    assert len(list((tmp_path / "replaced").glob("*/b/DONE"))) == 2 and not (tmp_path / "b").exists()


def test_a_field_added_after_the_run_at_its_default_is_not_a_difference(tmp_path):
    """A record written before the engine had a field (simulated: the key removed) still matches when the recipe
    leaves the field at its default, and still differs when the recipe sets another value."""
    cfg = _cfg(tmp_path)
    _finish(cfg, tmp_path, ["a", "b", "c"])
    for name in ("a", "b", "c"):
        record = tmp_path / name / RECORD
        kept, section = [], ""
        for line in record.read_text().splitlines():
            section = line if line.startswith("[") else section
            if not (section == "[stage]" and line.startswith("seed = ")):  # the stage's seed; run.seed stays
                kept.append(line)
        record.write_text("\n".join(kept) + "\n")
    assert (tmp_path / "a" / RECORD).read_text().count("seed = ") == 1
    assert plan_stages(_cfg(tmp_path), tmp_path).actions == {"a": "skip", "b": "skip", "c": "skip"}
    with pytest.raises(RerunError, match=r"stages.a.seed: ran with \(not set\), now 3"):
        plan_stages(_cfg(tmp_path, "--stages.a.seed=3"), tmp_path)

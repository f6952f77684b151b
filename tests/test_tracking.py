"""Experiment tracking: every metrics.jsonl value reaches the trackers as `<stage>/<key>` at its step, eval scores
and plots at the end; TensorBoard event files read back; W&B through a stand-in module (the real one is a 20 MB
download with a service binary, and needs an account to mean anything)."""

import importlib.machinery
import importlib.util
import json
import struct
import sys
import types
from pathlib import Path

import pytest
import torch

from engine import tracking
from engine.config import RunConfig
from engine.metrics import Metrics

VALUES = {"train/loss": 1.5, "train/grad_norm": 0.25, "train/lr": 1e-3, "train/num_tokens": 100.0,
          "train/skipped": False, "rollout/reward": 0.75, "rollout/format_acc": 0.5, "rollout/accuracy": 0.25}


class Recorder:
    """A tracker that keeps what it is given."""

    def __init__(self, *args):
        self.scalars, self.texts, self.images, self.closed = [], [], [], False

    def log(self, values, step):
        self.scalars += [(k, v, step) for k, v in values.items()]

    def text(self, tag, text):
        self.texts.append(tag)

    def image(self, tag, path):
        self.images.append(tag)

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture(autouse=True)
def _no_trackers_left():
    yield
    tracking.finish()


def _log_steps(tmp_path, name="grpo_zero"):
    m = Metrics(tmp_path / "metrics.jsonl", is_main=True, total_steps=2, name=name, device=torch.device("cpu"))
    m.log(1, VALUES, step_s=0.5)
    m.log(2, {**VALUES, "train/loss": 1.25}, step_s=0.5)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def _sampled(scores_per_row: list[list[float]]) -> dict:
    """scores.json's `sampled` entry of one model on one benchmark, from 4 samples a prompt, as the report makes it."""
    from engine.report_analyses import sampled_benchmark

    preds = {f"r{i}": {"id": f"r{i}", "category": "c", "n": 4, "scores": s, "format": [True] * 4,
                       "finish_reasons": ["stop"] * 4, "error": ""} for i, s in enumerate(scores_per_row)}
    return sampled_benchmark(preds, list(preds), 4, [1, 4], macro=False, where="test")[0]


def _eval_outputs(tmp_path):
    from PIL import Image

    # specs: row 0 right in 1 of 4 samples, row 1 in 3 of 4 -> accuracy 50%, pass@4 100%; base: 1 of 8 -> 12.5%, 50%.
    scores = {"models": {
        "base": {"benchmarks": {"toy_id": {"score": 40.0, "sampled": _sampled([[1, 0, 0, 0], [0, 0, 0, 0]])}},
                 "gf": None, "sampled": {"gf": None}},
        "specs": {"benchmarks": {"toy_id": {"score": 55.0, "sampled": _sampled([[0, 0, 1, 0], [1, 1, 0, 1]])}},
                  "gf": 3.5, "sampled": {"gf": 7.25}}}}
    report = tmp_path / "report.md"
    report.write_text("# Evaluation report\n")
    Image.new("RGB", (8, 6), "red").save(tmp_path / "gf.png")
    return scores, report


def test_every_metrics_key_reaches_the_trackers_with_the_stage_prefix(tmp_path, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(tracking, "_active", [rec])
    rows = _log_steps(tmp_path)
    numeric = {k for k, v in rows[0].items() if k != "step" and isinstance(v, (int, float))}
    assert {k for k, _, s in rec.scalars if s == 1} == {f"grpo_zero/{k}" for k in numeric}
    assert "grpo_zero/perf/tok_per_s" in {k for k, _, _ in rec.scalars}  # what Metrics adds goes too
    assert ("grpo_zero/train/loss", 1.25, 2) in rec.scalars
    scores, report = _eval_outputs(tmp_path)
    tracking.log_eval(scores, report)
    assert ("eval/toy_id/specs", 55.0, 0) in rec.scalars and ("eval/gf/specs", 3.5, 0) in rec.scalars
    assert "eval/gf/base" not in {k for k, _, _ in rec.scalars}
    assert {("eval/sampled/toy_id/specs", 50.0, 0), ("eval/sampled/toy_id/base", 12.5, 0),
            ("eval/pass_at_1/toy_id/specs", 50.0, 0), ("eval/pass_at_4/toy_id/specs", 100.0, 0),
            ("eval/pass_at_4/toy_id/base", 50.0, 0), ("eval/sampled/gf/specs", 7.25, 0)} <= set(rec.scalars)
    assert "eval/sampled/gf/base" not in {k for k, _, _ in rec.scalars}
    assert rec.texts == ["eval/report"] and rec.images == ["eval/gf"]
    tracking.finish()
    assert rec.closed and not tracking._active


def test_a_missing_package_is_a_note_not_a_failure(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    tracking.start(RunConfig(name="t", trackers=["tensorboard", "wandb"]), tmp_path, "", is_main=True)
    assert not tracking._active
    tracking.start(RunConfig(name="t"), tmp_path, "", is_main=False)  # other ranks never track
    assert not tracking._active


def _read_events(log_dir: Path):
    """(tag, value, step) of every scalar in TensorBoard's event files (TFRecord: length, crc, event, crc)."""
    try:
        from tensorboard.compat.proto import event_pb2
    except ImportError:
        from tensorboardX.proto import event_pb2
    out = []
    for f in sorted(log_dir.glob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                kind = v.WhichOneof("value")
                if kind == "simple_value":
                    out.append((v.tag, v.simple_value, event.step))
                elif kind == "tensor" and v.tensor.float_val:
                    out.append((v.tag, v.tensor.float_val[0], event.step))
                else:
                    out.append((v.tag, kind, event.step))
    return out


def test_tensorboard_event_files_read_back(tmp_path):
    if not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
        pytest.skip("needs tensorboard or tensorboardX (pip install tensorboardX); "
                    "test_every_metrics_key_reaches_the_trackers_with_the_stage_prefix checks the same here")
    tracking.start(RunConfig(name="t"), tmp_path, "", is_main=True)  # tensorboard is the default
    rows = _log_steps(tmp_path)
    scores, report = _eval_outputs(tmp_path)
    tracking.log_eval(scores, report)
    tracking.finish()
    events = _read_events(tmp_path / "tensorboard")
    scalars = {(tag, step): value for tag, value, step in events if isinstance(value, float)}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                assert scalars[(f"grpo_zero/{key}", row["step"])] == pytest.approx(float(value), rel=1e-6), key
    assert scalars[("eval/toy_id/specs", 0)] == 55.0 and scalars[("eval/gf/specs", 0)] == 3.5
    assert scalars[("eval/sampled/toy_id/specs", 0)] == 50.0 and scalars[("eval/pass_at_4/toy_id/specs", 0)] == 100.0
    tags = {tag for tag, _, _ in events}
    assert any(t.startswith("eval/report") for t in tags) and "eval/gf" in tags


def _stand_in_wandb(monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, values):
            calls["log"].append(values)

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    wandb.init, wandb.Image, wandb.Html = init, (lambda p: ("image", p)), (lambda t: ("html", t))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    return calls


def test_wandb_offline_without_a_key_online_with_one(tmp_path, monkeypatch):
    calls = _stand_in_wandb(monkeypatch)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run = RunConfig(name="t", trackers=["wandb"], wandb_project="p")
    tracking.start(run, tmp_path, '[run]\nname = "t"\n', is_main=True)
    assert calls["init"][-1]["mode"] == "offline" and calls["init"][-1]["project"] == "p"
    assert calls["init"][-1]["config"] == {"run": {"name": "t"}}
    _log_steps(tmp_path, name="sft")
    assert calls["log"][0]["sft/train/loss"] == 1.5 and calls["log"][1]["sft/step"] == 2
    tracking.finish()
    assert calls["finish"] == 1
    monkeypatch.setenv("WANDB_API_KEY", "k")
    tracking.start(run, tmp_path, "", is_main=True)
    assert calls["init"][-1]["mode"] == "online"


def test_a_training_run_sends_its_steps(tmp_path, monkeypatch):
    """engine/train.py opens the trackers and a training stage's steps reach them (here a recorder stands in
    for the TensorBoard writer, so this runs without the package)."""
    from engine import train

    made = []
    monkeypatch.setattr(tracking, "TensorBoard", lambda log_dir: made.append(Recorder()) or made[-1])
    monkeypatch.setitem(tracking._PACKAGES, "tensorboard", ("json",))
    recipe = tmp_path / "r.toml"
    recipe.write_text("""
[run]
name = "t"
[model]
dtype = "float32"
[[stages]]
name = "world"
kind = "toy"
num_train = 16
num_test = 8
[[stages]]
name = "sft"
kind = "sft"
init = "world"
[stages.data]
train = "world:data/sft.parquet"
[stages.train]
steps = 2
batch_size = 2
""")
    assert train.main([str(recipe), f"--run.out_dir={tmp_path / 'out'}"]) == 0
    (rec,) = made
    assert rec.closed and ("sft/train/loss", 2) in {(k, s) for k, _, s in rec.scalars}

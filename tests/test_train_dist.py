"""End-to-end runs of engine/train.py: two processes under torchrun (gloo, FSDP2) against one plain process,
a run killed with SIGKILL and resumed, and a finished stage skipped on rerun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
RECIPE = """
[run]
name = "t"
seed = 3
[model]
path = "{hf}"
dtype = "float32"
[[stages]]
name = "sft"
kind = "sft"
init = "model"
[stages.data]
train = "{data}"
[stages.optim]
lr = 3e-3
warmup_steps = 1
[stages.train]
steps = {steps}
batch_size = 8
micro_batch_tokens = 400
[stages.checkpoint]
every = 2
keep = 3
"""


def _recipe(tmp_path: Path, toy_world: Path, steps: int) -> Path:
    path = tmp_path / f"recipe{steps}.toml"
    path.write_text(RECIPE.format(hf=toy_world / "hf", data=toy_world / "data" / "sft.parquet", steps=steps))
    return path


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _train(recipe: Path, out: Path, *, nproc: int) -> subprocess.CompletedProcess:
    launcher = TORCHRUN if nproc == 2 else [sys.executable]
    cmd = [*launcher, str(REPO / "engine" / "train.py"), str(recipe), f"--run.out_dir={out}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (torchrun starts its workers in their own process groups)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_proc_run(toy_world, tmp_path_factory):
    """An uninterrupted 2-process run of 8 steps; other tests compare against it."""
    tmp = tmp_path_factory.mktemp("dist")
    recipe = _recipe(tmp, toy_world, steps=8)
    result = _train(recipe, tmp / "two", nproc=2)
    return recipe, tmp / "two", result


def test_two_processes_learn_and_match_one_process(two_proc_run, tmp_path):
    recipe, two, _ = two_proc_run
    metrics = _metrics(two)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    losses = [m["train/loss"] for m in metrics]
    assert losses[-1] < losses[0] - 0.3, losses  # it learns
    for key in ("train/loss", "train/grad_norm", "train/lr", "perf/tok_per_s", "train/num_tokens", "time/step_s"):
        assert all(key in m for m in metrics), key

    one = tmp_path / "one"
    _train(recipe, one, nproc=1)
    single = _metrics(one)
    # Same global batch, split over two ranks or not: FSDP2's averaged gradients equal the single-process ones
    # up to summation order, so every step's loss and gradient norm (which depend on all earlier updates) agree.
    for a, b in zip(metrics, single, strict=True):
        assert a["train/num_tokens"] == b["train/num_tokens"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5), (a, b)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4), (a, b)
    w2, w1 = load_file(two / "sft" / "hf" / "model.safetensors"), load_file(one / "sft" / "hf" / "model.safetensors")
    assert w2.keys() == w1.keys()
    for k in w2:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    assert (two / "config.resolved.toml").is_file() and (two / "sft" / "DONE").is_file()


def test_sigkill_then_resume_matches_uninterrupted_run(two_proc_run, tmp_path):
    recipe, two, _ = two_proc_run
    out = tmp_path / "killed"
    cmd = [*TORCHRUN, str(REPO / "engine" / "train.py"), str(recipe), f"--run.out_dir={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO,
                            start_new_session=True)
    metrics_file = out / "sft" / "metrics.jsonl"
    deadline = time.time() + 300
    # Kill the launcher and both ranks at once when step 3 is logged: the checkpoint of step 2 exists by then.
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 3:
            for pid in [proc.pid, *_descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # exited between listing and killing
                    pass
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    time.sleep(1)
    assert not (out / "sft" / "DONE").exists()
    assert len(metrics_file.read_text().splitlines()) < 8

    result = _train(recipe, out, nproc=2)
    assert "resume: from step" in result.stdout
    expected, got = _metrics(two), _metrics(out)
    assert [m["step"] for m in got] == list(range(1, 9))
    for a, b in zip(expected, got, strict=True):
        for key in ("train/loss", "train/grad_norm", "train/lr", "train/num_tokens"):
            assert a[key] == b[key], (key, a, b)

    # Rerunning a finished run skips the stage and leaves its outputs alone.
    before = metrics_file.read_text()
    again = _train(recipe, out, nproc=1)
    assert "finished earlier with these settings, skipped" in again.stdout
    assert metrics_file.read_text() == before

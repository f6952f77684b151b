"""Preemption: SIGTERM stops a run after the current optimizer step with a checkpoint, says where and how to resume,
exits 143; the rerun resumes there and finishes. In one process (the signal handler itself), and under torchrun
with two ranks (the launcher forwards the scheduler's signal; both ranks must stop after the same step)."""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from engine import train

from ._launch import TRAIN, kill_tree, python, start
from ._launch import train as train_run
from .test_eval_stage import scripted  # noqa: F401, F811 - a fixture

RECIPE = """
[run]
name = "p"
[model]
path = "{hf}"
dtype = "float32"
[[stages]]
name = "sft"
kind = "sft"
init = "model"
[stages.data]
train = "{data}"
[stages.train]
steps = {steps}
batch_size = 4
micro_batch_tokens = 400
[stages.checkpoint]
every = 1000
"""


def _recipe(tmp_path: Path, toy_world: Path, steps: int) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(hf=toy_world / "hf", data=toy_world / "data" / "sft.parquet", steps=steps))
    return path


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _when(predicate, timeout_s=300.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_grpo_stop_waits_for_the_end_of_its_rollout_batch(tmp_path, toy_world, monkeypatch):
    """With 3 optimizer steps a rollout batch (stop_every = 3), a request during step 1 stops after step 3."""
    from engine import preempt
    from engine.dist import init_distributed

    from .test_trainer import _make, _sft_loss

    policy, _, trainer = _make(toy_world, init_distributed(), tmp_path)
    trainer.stop_every = 3
    loss_fn = _sft_loss(policy)
    processor_batches = _batches(toy_world)
    monkeypatch.setattr(preempt, "_requested", signal.SIGTERM)
    trainer.run_step([processor_batches[0]], loss_fn)
    trainer.run_step([processor_batches[1]], loss_fn)
    with pytest.raises(preempt.Preempted, match="after step 3/4"):
        trainer.run_step([processor_batches[2]], loss_fn)
    assert trainer.checkpointer.steps()[-1] == 3


def _batches(toy_world):
    from engine.data import Processor, collate, encode_rows

    processor = Processor.from_pretrained(toy_world / "hf")
    samples, _ = encode_rows(toy_world / "data" / "sft.parquet", processor, response_column="response")
    return [collate(samples[i:i + 4], processor.pad_id) for i in range(0, 12, 4)]


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path, toy_world):
    recipe, out = _recipe(tmp_path, toy_world, steps=12), tmp_path / "out"
    metrics = out / "sft" / "metrics.jsonl"
    pid = os.getpid()

    def signal_at_step_2():
        if _when(lambda: _lines(metrics) >= 2):
            os.kill(pid, signal.SIGTERM)

    thread = threading.Thread(target=signal_at_step_2, daemon=True)
    thread.start()
    assert train.main([str(recipe), f"--run.out_dir={out}"]) == 128 + signal.SIGTERM
    thread.join()
    stopped = _lines(metrics)
    assert 2 <= stopped < 12 and not (out / "sft" / "DONE").exists()
    assert (out / "sft" / "checkpoints" / f"step-{stopped:06d}").is_dir()  # every = 1000: only the signal saved
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # main() leaves the handlers as it found them

    assert train.main([str(recipe), f"--run.out_dir={out}"]) == 0
    assert (out / "sft" / "DONE").is_file()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 13))


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_after_the_same_step(tmp_path, toy_world):
    recipe, out = _recipe(tmp_path, toy_world, steps=40), tmp_path / "out"
    metrics = out / "sft" / "metrics.jsonl"
    proc = start(python(TRAIN, recipe, f"--run.out_dir={out}", nproc=2), stdout=subprocess.PIPE)
    try:
        assert _when(lambda: _lines(metrics) >= 2 or proc.poll() is not None), "no step logged"
        proc.send_signal(signal.SIGTERM)  # what a scheduler sends the job's launcher before preemption
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode != 0, output[-3000:]
    stopped = _lines(metrics)
    assert "stopped by SIGTERM: stage sft after step" in output, output[-3000:]
    assert f"after step {stopped}/40" in output and (out / "sft" / "checkpoints" / f"step-{stopped:06d}").is_dir()

    result = train_run(recipe, out, nproc=2)
    assert f"resume: from step {stopped}/40" in result.stdout and (out / "sft" / "DONE").is_file()
    assert _lines(metrics) == 40


def test_eval_stops_after_the_chunk_it_is_writing(tmp_path, toy_world, scripted, monkeypatch):  # noqa: F811
    from engine import preempt
    from engine.stages import eval as eval_stage

    from .test_eval_stage import _setup

    cfg, ctx = _setup(tmp_path, toy_world)
    monkeypatch.setattr(preempt, "_requested", signal.SIGTERM)  # as if the signal came during the first chunk
    with pytest.raises(preempt.Preempted, match="eval: model on toy_id after 4 of 16 prompts"):
        eval_stage.run(cfg, ctx)
    assert _lines(ctx.stage_dir / "predictions" / "model" / "toy_id.jsonl") == 4  # the chunk is written
    monkeypatch.setattr(preempt, "_requested", 0)
    eval_stage.run(cfg, ctx)
    assert (ctx.stage_dir / "report.md").is_file()
    assert len(scripted.calls) == 2 * 32 - 2  # every row once; row 0 of toy_id cannot be encoded


def test_a_signal_between_stages_stops_before_the_next(tmp_path, monkeypatch):
    """A stage without safe points (the toy world) finishes; the run stops before the next stage starts."""
    from engine import preempt, stages

    recipe = tmp_path / "r.toml"
    recipe.write_text('[run]\nname = "p"\n' + "".join(
        f'[[stages]]\nname = "{n}"\nkind = "toy"\nnum_train = 16\nnum_test = 8\nvocab_size = 400\n' for n in "ab"))
    run_stage = stages.run_stage

    def run_then_signal(cfg, ctx):
        run_stage(cfg, ctx)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives as stage a ends

    monkeypatch.setattr(train, "run_stage", run_then_signal)
    assert train.main([str(recipe), f"--run.out_dir={tmp_path / 'out'}"]) == 128 + signal.SIGTERM
    assert (tmp_path / "out" / "a" / "DONE").is_file() and not (tmp_path / "out" / "b").exists()
    assert preempt.requested() is False  # main() left the process as it found it

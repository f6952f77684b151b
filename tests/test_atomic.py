"""Writes that survive a crash or a full disk (engine/atomic.py) at each writer: metrics.jsonl, whole files
(ref_logps.pt, DONE, reports), prediction chunks, the judge cache and checkpoints."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import atomic
from engine.metrics import Metrics
from engine.predictions import append_predictions, read_predictions

REPO = Path(__file__).resolve().parents[1]


def test_torn_last_metrics_line_is_trimmed_on_resume(tmp_path, caplog):
    """A crash (or full disk) mid-append left a cut-off last line: resuming used to fail with JSONDecodeError."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "x": 1.5}) + "\n" + json.dumps({"step": 2, "x": 2.5}) + "\n"
                    + '{"step": 3, "x"')
    with caplog.at_level(logging.WARNING, logger="engine"):
        Metrics(path, is_main=True, total_steps=5).truncate(2)
    assert "trimming an incomplete last line" in caplog.text
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    path.write_text(json.dumps({"step": 1}) + "\nnot json\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        Metrics(path, is_main=True, total_steps=5).truncate(2)


def _fail_fsync(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(atomic.os, "fsync", fsync)


def test_faked_enospc_leaves_whole_files_and_lines(tmp_path, monkeypatch):
    """ENOSPC at the write calls (faked: this runs everywhere; the real full disk is the next test)."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n')
    done = tmp_path / "DONE"
    done.write_text("old\n")
    _fail_fsync(monkeypatch)
    with pytest.raises(atomic.DiskFullError, match=r"disk full: .* MiB needed under .* MiB free"):
        Metrics(metrics, is_main=True, total_steps=5).log(2, {"train/loss": 1.0, "train/grad_norm": 1.0,
                                                              "train/lr": 1.0}, step_s=1.0)
    assert metrics.read_text() == '{"step": 1}\n'  # the failed append was cut back
    with pytest.raises(atomic.DiskFullError):
        atomic.write_text(done, "new\n")
    with pytest.raises(atomic.DiskFullError), atomic.replacing(tmp_path / "ref_logps.pt") as tmp:
        torch.save(torch.zeros(4), tmp)
    assert done.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["DONE", "metrics.jsonl"]


# Run in a private mount namespace over a 4 MiB tmpfs: fill it, try every writer, free the space, rerun them.
_SMALL_DISK = r'''
import json, os, sys
from pathlib import Path
import torch
from torch import nn
from engine import atomic
from engine.checkpoint import Checkpointer
from engine.dist import init_distributed
from engine.metrics import Metrics
from engine.predictions import append_predictions, read_predictions
from engine.sections import CheckpointConfig

disk = Path(sys.argv[1])
filler = disk / "filler"
filler.write_bytes(b"x" * (atomic.free_bytes(disk) - (64 << 10)))  # leaves 64 KiB
out = {}

def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"

metrics = Metrics(disk / "metrics.jsonl", is_main=True, total_steps=9)
row = {"train/loss": 1.0, "train/grad_norm": 1.0, "train/lr": 1.0, "pad": "x" * 2000}
dist = init_distributed()
model = nn.Linear(64, 256)
optimizer = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 64)).sum().backward()
optimizer.step()
ckpt = Checkpointer(disk / "checkpoints", CheckpointConfig(), dist)

def save_ref(t, path):  # as engine/stages/dpo.py writes ref_logps.pt
    with atomic.replacing(path, t.numel() * t.element_size()) as tmp:
        torch.save(t, tmp)

def writers(tag):
    attempt(f"metrics_{tag}", lambda: [metrics.log(step, row, step_s=1.0) for step in range(1, 60)])
    attempt(f"ref_logps_{tag}", lambda: save_ref(torch.zeros(64 << 10), disk / "ref_logps.pt"))
    attempt(f"predictions_{tag}", lambda: append_predictions(disk / "p.jsonl", [{"id": str(i), "response": "y" * 3000}
                                                                              for i in range(40)]))
    attempt(f"checkpoint_{tag}", lambda: ckpt.save(1, model, optimizer, {"step": 1}))
    out[f"files_{tag}"] = sorted(p.name for p in disk.iterdir())
    out[f"checkpoint_dir_{tag}"] = sorted(p.name for p in (disk / "checkpoints").iterdir())

writers("full")
out["metrics_lines_full"] = [json.loads(line)["step"] for line in (disk / "metrics.jsonl").read_text().splitlines()]
out["prediction_rows_full"] = len(read_predictions(disk / "p.jsonl"))
filler.unlink()
metrics.truncate(0)
(disk / "p.jsonl").unlink(missing_ok=True)
writers("freed")
out["ref_logps_freed_shape"] = list(torch.load(disk / "ref_logps.pt", weights_only=True).shape)
print("RESULT" + json.dumps(out))
'''


def _private_tmpfs_argv() -> list[str] | None:
    """A command prefix giving a private mount namespace where a tmpfs can be mounted, or None."""
    if shutil.which("unshare") is None:
        return None
    base = ["unshare", "--mount", "--propagation", "private"] if os.geteuid() == 0 else ["unshare", "-Urm"]
    probe = subprocess.run(base + ["sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
                                   "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
    return base if probe.returncode == 0 else None


@pytest.mark.skipif(_private_tmpfs_argv() is None,
                    reason="needs `unshare` with a mount namespace (root, or user namespaces) to mount a small tmpfs")
def test_full_disk_at_each_writer_then_rerun(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "small_disk.py"
    script.write_text(_SMALL_DISK)
    cmd = f"mount -t tmpfs -o size=4m tmpfs {disk} && exec {sys.executable} {script} {disk}"
    r = subprocess.run(_private_tmpfs_argv() + ["sh", "-c", cmd], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "RESULT" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    for writer in ("metrics", "ref_logps", "predictions", "checkpoint"):
        assert out[f"{writer}_full"].startswith("DiskFullError: disk full: "), (writer, out[f"{writer}_full"])
        assert "MiB needed under" in out[f"{writer}_full"]
        assert out[f"{writer}_freed"] == "ok", (writer, out[f"{writer}_freed"])
    # Nothing half-written: whole metrics lines and prediction rows only, no temporary files, no partial checkpoint.
    assert out["metrics_lines_full"] == list(range(1, len(out["metrics_lines_full"]) + 1))
    assert out["files_full"] == ["checkpoints", "filler", "metrics.jsonl", "p.jsonl"]
    assert out["checkpoint_dir_full"] == []
    assert out["prediction_rows_full"] == 0  # the 40-row chunk did not fit: cut back whole
    assert out["checkpoint_dir_freed"] == ["step-000001"]
    assert out["ref_logps_freed_shape"] == [64 << 10]


def test_predictions_and_done_marker_survive_damage(tmp_path, caplog):
    from engine.report import _finished

    path = tmp_path / "p.jsonl"
    append_predictions(path, [{"id": "a", "score": 1.0}])
    with path.open("a") as f:
        f.write('{"id": "b", "sco')  # a crash mid-row
    assert list(read_predictions(path)) == ["a"]
    done = tmp_path / "DONE"
    done.write_bytes(b"\x00garbage")  # used to break the report with an unnamed JSONDecodeError
    with caplog.at_level(logging.WARNING, logger="engine"):
        assert _finished(done) == "~"
    assert "unreadable stage marker" in caplog.text


def test_empty_ref_logps_from_a_crash_is_recomputed(tmp_path, toy_world):
    """A 0-byte ref_logps.pt (left by a crash when it was written in place) used to fail every rerun with
    EOFError; now it is computed again, and written atomically."""
    import math

    from .test_dpo_stage import _run

    stage_dir = tmp_path / "out" / "cold_start"
    stage_dir.mkdir(parents=True)
    (stage_dir / "ref_logps.pt").write_bytes(b"")
    _, out, metrics = _run(tmp_path, toy_world, "model")
    assert metrics[0]["train/dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)  # the reference is the start again
    assert torch.load(stage_dir / "ref_logps.pt", weights_only=True).ndim == 2

"""One writer per run directory (engine/runlock.py): a second run is refused, a dead run's lock is taken over."""

import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import runlock

REPO = Path(__file__).resolve().parents[1]
_HOLD = ("import sys, time\nfrom pathlib import Path\nfrom engine import runlock\n"
         "runlock.acquire(Path(sys.argv[1]))\nprint('held', flush=True)\ntime.sleep(60)")


def _holder(out_dir: Path) -> subprocess.Popen:
    """Another process holding `out_dir`'s lock (it prints 'held' once it does)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, caplog):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(runlock.RunDirBusyError, match=f"in use by another run .PID {proc.pid} on host"):
            runlock.acquire(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)  # dies without releasing: the file still names it
        proc.wait()
    assert json.loads((tmp_path / runlock.LOCK_NAME).read_text())["pid"] == proc.pid
    with caplog.at_level(logging.WARNING, logger="engine"):
        lock = runlock.acquire(tmp_path)
    assert f"taking over the lock of a run that is no longer alive (PID {proc.pid}" in caplog.text
    lock.release()
    assert (tmp_path / runlock.LOCK_NAME).read_text() == ""  # released: emptied
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine"):
        runlock.acquire(tmp_path).release()
    assert caplog.text == ""


def test_lock_of_another_host_is_not_taken(tmp_path):
    holder = {"host": socket.gethostname() + "-other", "pid": 1, "start_ticks": 1, "started": time.time()}
    (tmp_path / runlock.LOCK_NAME).write_text(json.dumps(holder))
    with pytest.raises(runlock.RunDirBusyError, match="another host's run .* delete .*run.lock and rerun"):
        runlock.acquire(tmp_path)


def test_a_reused_pid_is_not_the_holder(tmp_path):
    """A file naming a live PID whose start time differs (the PID was reused) is stale."""
    holder = {"host": socket.gethostname(), "pid": 1, "start_ticks": -5, "started": 0}
    (tmp_path / runlock.LOCK_NAME).write_text(json.dumps(holder))
    runlock.acquire(tmp_path).release()


def test_train_refuses_a_busy_out_dir(tmp_path):
    """A second `engine/train.py` into the same out_dir stops before writing anything (it used to run alongside)."""
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        r = subprocess.run([sys.executable, str(REPO / "engine" / "train.py"), str(REPO / "recipes" / "tiny.toml"),
                            f"--run.out_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert r.returncode == 1
    assert "is in use by another run" in r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == [runlock.LOCK_NAME]  # no config, no stage folder

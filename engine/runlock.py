"""One writer per run directory: an advisory lock file, `<out_dir>/run.lock`, taken by rank 0 before anything is
written and held until the run ends.

The file holds the holder's host, PID and process start time (JSON) while it is held and is emptied on release.
Held means: its content names a live process. On the same host that is checked (the PID exists and started at the
recorded time, so a reused PID does not count) and, as a second guard, the holder keeps an exclusive flock on it
(released by the kernel when the holder dies, however it dies). A lock left by a dead process on this host is
taken over with a warning. A lock naming another host cannot be checked from here: the run refuses, and the message
says how to clear it once that run is known to be over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from engine.log import logger

LOCK_NAME = "run.lock"


class RunDirBusyError(ValueError):
    """Another run holds (or may hold) the run directory."""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"PID {holder.get('pid')} on host {holder.get('host')!r}, started {when}"


@dataclass
class RunLock:
    """A held lock on a run directory; `release()` (idempotent) frees it."""
    path: Path
    fd: int | None

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # emptied, not removed: a removed file could be locked twice by racing runs
        os.close(self.fd)  # drops the flock
        self.fd = None


def acquire(out_dir: Path) -> RunLock:
    """Take `out_dir`'s lock (creating `out_dir`), or raise RunDirBusyError naming the holder and the fix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        holder = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _describe(holder) if holder else "starting"
            raise RunDirBusyError(f"{out_dir} is in use by another run ({who}): wait for it to end, or give this run "
                                  "another run.out_dir") from None
        holder = _read_holder(fd)  # read again under the flock: the previous holder may have just released it
        if holder:
            _check_stale(path, holder)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
              "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return RunLock(path, fd)


def _read_holder(fd: int) -> dict | None:
    data = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not data:
        return None
    try:
        holder = json.loads(data)
    except json.JSONDecodeError:
        holder = None
    return holder if isinstance(holder, dict) else {"host": "?", "pid": "?", "unreadable": data[:100]}


def _check_stale(path: Path, holder: dict) -> None:
    """Return if `holder` is gone (warning that its lock is taken over); raise RunDirBusyError if it may be alive."""
    if holder.get("host") != socket.gethostname():
        raise RunDirBusyError(f"{path} names another host's run ({_describe(holder)}), which cannot be checked from "
                              f"here: if that run is over (e.g. its node died), delete {path} and rerun")
    pid = holder.get("pid")
    ticks = _start_ticks(pid) if isinstance(pid, int) else None
    if ticks is not None and ticks == holder.get("start_ticks") and pid != os.getpid():
        # Alive yet no flock: it runs on a file system whose flock does not reach us. Trust the content.
        raise RunDirBusyError(f"{path.parent} is in use by another run ({_describe(holder)}): wait for it to end, or "
                              "give this run another run.out_dir")
    logger.warning(f"{path}: taking over the lock of a run that is no longer alive ({_describe(holder)})")


def acquire_on_main(out_dir: Path, is_main: bool) -> RunLock | None:
    """Rank 0 takes the lock; every rank raises the same RunDirBusyError if it could not (no rank left waiting)."""
    from engine.dist import broadcast_object

    lock, error = None, None
    if is_main:
        try:
            lock = acquire(out_dir)
        except RunDirBusyError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise RunDirBusyError(error)
    return lock

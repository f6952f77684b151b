"""Run untrusted Python (model-written programs) in a bubblewrap sandbox, and say clearly when none can be made.

What a sandboxed program gets (checked by tests/test_sandbox.py with a program trying each escape):
- its own user, PID, network, IPC, UTS and cgroup namespaces (bwrap --unshare-all --unshare-user): it sees only its
  own processes (no /proc/<our pid>/environ), has no network (not even loopback to us), and no capabilities
  (--cap-drop ALL, no_new_privs, no further user namespaces);
- a read-only view of the system folders (/usr, /etc, ...) and this Python installation only (our data, home
  folders, checkpoints and the benchmark's expected outputs are not there), a fresh /tmp (a tmpfs of
  `Limits.tmp_bytes`) holding its working folder, a private /dev and /proc; nothing it writes outlives it;
- an environment of PATH alone (our own environment, API keys included, never reaches bwrap or the program);
- a seccomp filter (engine/seccomp.py): it cannot start processes (so no fork bomb, no fork + setsid escape) nor
  reach the kernel interfaces a judged program has no use for;
- limits: address space, file size (its stdout is a file, so this bounds it too), CPU time, and a wall-clock
  limit enforced from outside, from the moment the caller's script says it starts the program (`started()` in
  the script), so interpreter start-up is not counted and the program cannot stop the clock.
What it does not get: the result channel. Whatever the program can see, it can write; the caller therefore
decides from outside, from the exit status (bwrap's own, which the program sets only by exiting) and the
output, never from a message the program could forge. It can still read the system folders and the Python
installation (but has no channel to send anything anywhere) and use one core up to the CPU time limit. Memory is
bounded per sandbox (one process: its address space plus the two tmpfs), not by a cgroup.

Needs `bwrap` (Debian/Ubuntu package bubblewrap; .ci/run installs it) and user namespaces. Where they are missing
`problem()` says why and `run_python` raises: model-written code is never run unsandboxed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO

from engine import seccomp

BWRAP_FIX = ("install bubblewrap (`apt-get install -y bubblewrap`; .ci/run does this) and allow user namespaces "
             "(`sysctl user.max_user_namespaces=10000`; on Ubuntu >= 23.10 also "
             "`sysctl kernel.apparmor_restrict_unprivileged_userns=0`)")
WORKDIR = "/tmp/sandbox"
"""The program's working folder inside the sandbox (on its private /tmp)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""
    memory_bytes: int = 4 << 30
    """Address space (RLIMIT_AS) of the one process."""
    file_bytes: int = 16 << 20
    """Largest file it may write, stdout and stderr included (RLIMIT_FSIZE)."""
    tmp_bytes: int = 64 << 20
    """Size of its private /tmp and /dev/shm (tmpfs, i.e. memory)."""
    cpu_s: int = 10
    """CPU time (RLIMIT_CPU), a backstop behind the wall-clock limit."""


@dataclass
class Result:
    """How a sandboxed run ended."""
    exit_code: int | None
    """The program's exit status as bwrap reports it (128 + signal for a signal); None if it was killed by us."""
    stdout: bytes
    timed_out: bool
    """Killed at the wall-clock limit."""
    started: bool = True
    """The script reported its start; when False the untrusted code never ran (`stderr` says why)."""
    stderr: str = ""
    """The start of its standard error (bwrap's own messages come there)."""


_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")


def _view() -> list[str]:
    """bwrap arguments for a read-only view of the system folders and this Python installation (with its venv and
    site-packages), and nothing else: not our data, checkpoints, home folders or the benchmark's answer files.
    A symlinked path is bound at both its own path and its target."""
    paths = [p for p in _SYSTEM_DIRS if os.path.exists(p)]
    paths += [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable)]
    args, bound = [], {}  # destination -> source
    for path in paths:
        src = os.path.realpath(path)
        for dest in (src, os.path.abspath(path)):
            covered = any(dest.startswith(d + "/") and os.path.join(s, os.path.relpath(dest, d)) == src
                          for d, s in bound.items())
            if dest not in bound and not covered and os.path.isdir(src):
                bound[dest] = src
                args += ["--ro-bind", src, dest]
    return args


def _bwrap_argv(limits: Limits, seccomp_fd: int) -> list[str]:
    return ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
            "--die-with-parent", "--new-session", "--clearenv", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
            "--uid", "65534", "--gid", "65534",
            # The private /tmp first, then the read-only view: a Python or venv that lives under /tmp (a CI
            # checkout, say) is bound on top of the tmpfs instead of being hidden by it.
            "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp",
            *_view(), "--dev", "/dev", "--proc", "/proc",
            "--size", str(limits.tmp_bytes), "--tmpfs", "/dev/shm",
            "--dir", WORKDIR, "--chdir", WORKDIR, "--seccomp", str(seccomp_fd), "--"]


def _prelude(limits: Limits, start_fd: int) -> str:
    """Python run first in the sandbox: the limits, no inherited descriptors but the start pipe, and `started()`
    for the caller's script (it reports the start on that pipe and closes it)."""
    return (f"import os as _os, resource as _r\n"
            f"for _k, _v in ((_r.RLIMIT_AS, {limits.memory_bytes}), (_r.RLIMIT_FSIZE, {limits.file_bytes}),\n"
            f"               (_r.RLIMIT_CORE, 0), (_r.RLIMIT_CPU, {limits.cpu_s})):\n"
            f"    _r.setrlimit(_k, (_v, _v))\n"
            f"_os.closerange(3, {start_fd})\n"
            f"_os.closerange({start_fd + 1}, 65536)\n"
            f"def started():\n"
            f"    _os.write({start_fd}, b's')\n"
            f"    _os.close({start_fd})\n")


def _seccomp_file() -> IO[bytes]:
    f = tempfile.TemporaryFile()
    f.write(seccomp.build())
    f.seek(0)
    return f


def run_python(script: str, stdin: bytes, timeout_s: float, startup_s: float = 10.0,
               limits: Limits = Limits()) -> Result:
    """Run `script` with this interpreter in the sandbox, `stdin` as its standard input (a file).

    The script must call `started()` (defined for it) right before it runs untrusted code: the wall-clock limit
    `timeout_s` counts from then. Raises RuntimeError naming the fix when no sandbox can be made here (see
    `problem()`), and when the script did not start within `startup_s` (the untrusted code never ran: a problem of
    this machine, not a verdict on the code)."""
    if why := problem():
        raise RuntimeError(f"cannot run model-written code: no sandbox here ({why}); {BWRAP_FIX}")
    result = _run(script, stdin, timeout_s, startup_s, limits)
    if not result.started:
        raise RuntimeError(f"the sandbox did not start the program within {startup_s:g} s (exit code "
                           f"{result.exit_code}{': ' + result.stderr.strip() if result.stderr.strip() else ''})")
    return result


def _run(script: str, stdin: bytes, timeout_s: float, startup_s: float, limits: Limits) -> Result:
    start_r, start_w = os.pipe()
    with (tempfile.TemporaryFile() as job, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err,
          _seccomp_file() as bpf):
        job.write(stdin)
        job.seek(0)
        argv = _bwrap_argv(limits, bpf.fileno()) + [sys.executable, "-I", "-c", _prelude(limits, start_w) + script]
        # stdout and stderr are files (bounded by the file-size limit, unlike pipes). env={} keeps our environment
        # (API keys) out of bwrap itself too; bwrap's --clearenv then gives the program PATH only.
        try:
            proc = subprocess.Popen(argv, stdin=job, stdout=out, stderr=err, env={}, start_new_session=True,
                                    pass_fds=(bpf.fileno(), start_w))
        finally:
            os.close(start_w)
        timed_out = False
        try:
            started = _wait_start(start_r, startup_s, proc)
            if not started:  # it ended (or closed the pipe) before the start: let it exit, for its exit code
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2)
            else:
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            # Killing bwrap kills the sandbox: its PID namespace's init dies with it (--die-with-parent), and
            # with that init every process in the namespace.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            os.close(start_r)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read(2000).decode(errors="replace")
    # bwrap exits with the program's status: a channel the program has only through its own exit.
    return Result(exit_code=None if timed_out else proc.returncode, stdout=stdout, timed_out=timed_out,
                  started=started, stderr=stderr)


def _wait_start(fd: int, timeout_s: float, proc: subprocess.Popen) -> bool:
    """True once the script reports its start on `fd`; False when `timeout_s` passes or the process ends first."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            return os.read(fd, 1) == b"s"
        if proc.poll() is not None:
            return False
    return False


@functools.cache
def problem() -> str | None:
    """None when the sandbox works on this machine, else why not (checked once per process by running it)."""
    if shutil.which("bwrap") is None:
        return "bwrap (bubblewrap) is not installed"
    if why := seccomp.supported():
        return why
    try:
        result = _run("started()\nprint('ok')", b"", timeout_s=30, startup_s=30, limits=Limits())
    except OSError as e:
        return f"bwrap failed to start: {e}"
    if result.exit_code != 0 or result.stdout.strip() != b"ok":
        last = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.exit_code}"]
        return f"bwrap could not create the sandbox ({last[0]})"
    return None

"""Starting processes from tests: engine/train.py (one process or torchrun) and other Python scripts.

    result = train(recipe, out_dir, "--stages.sft.train.steps=4", nproc=2)   # CompletedProcess, rc 0
    result = launch(python("-c", code), env=child_env(PYTHONHASHSEED="1"))

`launch` runs a command to its end with its output captured. A non-zero exit (unless `check=False`) or a timeout
fails the test with the command and the tail of its output; on a timeout the whole process tree is killed first
(torchrun gives each worker a session of its own, so killing the launcher alone would leave the ranks running).
`start` and `kill_tree` are for tests that stop a run part way. Every child gets `child_env()`.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "engine" / "train.py"
TAIL_CHARS = 6000
"""How much of the end of stdout and of stderr a failure shows."""


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child, plus `extra`: the hub offline (a lookup hangs for minutes here), one
    OpenMP thread per process (two ranks share two cores) and the repository importable from any working dir."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def python(*args, nproc: int = 1) -> list[str]:
    """The command `python ARGS`, or with `nproc` > 1 the same under torchrun (standalone rendezvous, gloo on CPU)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*launcher, *map(str, args)]


def launch(cmd: list[str], *, timeout_s: float = 600, env: dict[str, str] | None = None, cwd: Path = REPO,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run `cmd` to its end and return its exit code and output (text); see the module docstring for failures."""
    proc = start(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)}\ntimed out after {timeout_s:.0f} s\n{_tail(out, err)}", pytrace=False)
    except BaseException:  # Ctrl-C or a failing fixture: leave no run behind (it has a session of its own)
        kill_tree(proc)
        proc.wait()
        raise
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)}\nexited with {proc.returncode}\n{_tail(out, err)}", pytrace=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train(recipe: Path, out_dir: Path, *overrides: str, nproc: int = 1, timeout_s: float = 600,
          check: bool = True) -> subprocess.CompletedProcess:
    """`engine/train.py RECIPE --run.out_dir=OUT_DIR OVERRIDES` in `nproc` processes (see `launch`)."""
    return launch(python(TRAIN, recipe, f"--run.out_dir={out_dir}", *overrides, nproc=nproc), timeout_s=timeout_s,
                  check=check)


def start(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path = REPO, stdout=subprocess.DEVNULL,
          stderr=subprocess.STDOUT) -> subprocess.Popen:
    """Start `cmd` in a session of its own (so `kill_tree` can stop it) and return at once."""
    return subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, env=child_env() if env is None else env,
                            cwd=cwd, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every live descendant at once (a crash of the whole run, launcher and ranks)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # exited between listing and killing
            pass


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, from /proc (torchrun's workers are in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while listing
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _tail(out: str | None, err: str | None) -> str:
    return f"--- stdout (end) ---\n{(out or '')[-TAIL_CHARS:]}\n--- stderr (end) ---\n{(err or '')[-TAIL_CHARS:]}"

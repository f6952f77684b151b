"""MEGA-Bench's `program_judge` metric (8 core tasks: code_programming_*, code_translation_*): run the response's
program on the query's test cases and score the fraction it passes.

The rule is re-stated from the official evaluator (TIGER-AI-Lab/MEGA-Bench, `megabench/metrics/scoring/
program_judge.py`, commit ee324ab, Apache-2.0); the code is ours. Per test case (`eval_context["test_case"]`, a
dict or a list of dicts with "input", a list of lines, and "expected", a string), the program runs with `input()`
returning those lines one by one (the prompt is not echoed; reading past the last line is an error) and its printed
output, right-stripped, must equal `expected` right-stripped. Behaviours that change scores and that we keep:
- Code containing `if __name__ == "__main__":` (exactly so) runs as a fresh `__main__` module. Any other code is
  executed the way `exec(code)` inside a function executes it: top-level names land in a separate locals mapping,
  so a function that calls another top-level function or uses a top-level import fails with NameError. Which
  comprehensions fail that way depends on the Python version (3.12 inlines them); ours is the one running it.
- An exception fails the case; so does `sys.exit()` or any other exit (the official child process then produces
  no output); so does a run longer than 2 s.
- sys.stdin is empty (the official child process reads /dev/null); sys.stdout is captured, sys.stderr is not.

Unlike the official code, which runs the program in a fork of the evaluator, each case runs in a fresh
`python -I` subprocess (its own session) in a temporary folder, with limits on memory (4 GiB address space), file
size (16 MiB, which also bounds what it writes to its stdout, a file) and CPU time, and no environment variables;
the whole session is killed when the case ends. That contains accidents, not a hostile program: it is the
model's code running with your user's rights. The eval stage therefore runs it only when the benchmark's
`run_code` is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from typing import Any

TIMEOUT_S = 2.0  # the official per-case limit
_MEMORY_BYTES = 4 << 30
_STARTUP_S = 5.0  # interpreter start-up allowance on top of TIMEOUT_S; the limit itself is kept inside the child

# Runs in the child. It reads {"code", "lines"} from stdin and writes one JSON line to the real stdout:
# the job's random token, then {"output": ...} or {"error": ...}; an exit without that line (sys.exit, os._exit, a
# kill) is a failed case, and the token keeps a program from forging the line.
_CHILD = r"""
import builtins, io, json, resource, signal, sys
job = json.loads(sys.stdin.read())
sys.stdin = io.StringIO("")
real_stdout = sys.stdout
for limit, value in ((resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_FSIZE, 1 << 24),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, int(job["timeout"]) + 2)):
    resource.setrlimit(limit, (value, value))
lines = iter(job["lines"])

class _TimeLimit(BaseException):
    pass

def _expire(signum, frame):
    raise _TimeLimit

def _input(prompt=None):
    return next(lines)  # StopIteration past the last line, as the official mock raises

builtins.input = _input
signal.signal(signal.SIGALRM, _expire)
signal.setitimer(signal.ITIMER_REAL, job["timeout"])
captured = io.StringIO()
sys.stdout = captured
try:
    if job["main"]:
        exec(job["code"], {"__name__": "__main__", "__builtins__": builtins})
    else:
        import io as _io, json as _json, multiprocessing as _mp, pathlib as _pathlib
        module = {"__name__": "metrics.scoring.program_judge", "__builtins__": builtins, "io": _io, "json": _json,
                  "multiprocessing": _mp, "pathlib": _pathlib}
        exec(job["code"], module, {})
except _TimeLimit:
    result = {"error": "time limit"}
except Exception as e:
    result = {"error": f"{type(e).__name__}: {e}"}
else:
    result = {"output": captured.getvalue().rstrip()}
signal.setitimer(signal.ITIMER_REAL, 0)
real_stdout.write("\n" + job["token"] + json.dumps(result) + "\n")
real_stdout.flush()
"""


def run_case(code: str, input_lines: Any, timeout: float | None = None) -> tuple[bool, str]:
    """(ran to the end, its output or the error) for one run of `code` with `input_lines` fed to input()."""
    # The official feed is "\n".join(input) + "\n" split into lines: a string input becomes one line per character.
    lines = ("\n".join(input_lines) + "\n").splitlines()
    timeout = TIMEOUT_S if timeout is None else timeout
    token = secrets.token_hex(16)
    job = {"code": code, "lines": lines, "main": 'if __name__ == "__main__":' in code, "timeout": timeout,
           "memory": _MEMORY_BYTES, "token": token}
    # stdout goes to an unnamed file, where the file-size limit bounds what a runaway program can write (a pipe
    # would fill the parent's memory); stderr is dropped, as the official evaluator never reads it.
    with tempfile.TemporaryDirectory(prefix="megabench-code-") as cwd, tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([sys.executable, "-I", "-c", _CHILD], stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.DEVNULL, cwd=cwd, env={}, start_new_session=True)
        try:
            proc.communicate(json.dumps(job).encode(), timeout=timeout + _STARTUP_S)
        except subprocess.TimeoutExpired:
            return False, "time limit"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the child, and whatever processes the program started
            proc.wait()
        out.seek(0)
        last = out.read().decode(errors="replace").rstrip("\n").rpartition("\n")[2]
    if not last.startswith(token):
        return False, f"no result (exit code {proc.returncode})"
    try:
        result = json.loads(last[len(token):])
    except json.JSONDecodeError:  # cut short by the file-size limit
        return False, "no result"
    return ("output" in result), result.get("output", result.get("error"))


def program_judge(response: Any, eval_context: dict) -> float:
    """Fraction of the query's test cases the response's program passes (0 without test cases)."""
    cases = eval_context["test_case"]
    if isinstance(cases, dict):
        cases = [cases]
    if not cases:
        return 0
    if not isinstance(response, str):
        raise TypeError(f"program_judge needs the program as a string, got {type(response).__name__}")
    passed = 0
    for case in cases:
        ok, output = run_case(response, case["input"])
        passed += ok and output == case["expected"].rstrip()
    return passed / len(cases)


CONTEXT_METRICS = {"program_judge": program_judge}

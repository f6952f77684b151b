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
- An output whose pickle does not fit the 64 KiB pipe of the official result queue (about 65,500 characters of
  ASCII) fails as a time limit: the official child blocks flushing it until the parent, which reads only after
  the 2 s join, kills it (checked against the official CodeTester at the boundary: 65,510 characters pass,
  65,515 fail).

Unlike the official code, which runs the program in a fork of the evaluator, each case runs in a fresh `python -I`
in a bubblewrap sandbox (engine/sandbox.py: no network, its own PID namespace, a read-only file system but its own
temporary folder, no new processes, no environment but PATH, memory, file-size and CPU limits). The verdict is
decided outside it, from its exit status and output: the harness below exits 0 after writing the captured output,
and 1 for an exception or any exit; the wall-clock limit is enforced from outside too. Consequences: a program
cannot forge a pass except by printing the expected output and exiting with status 0 (`os.write` to its standard
output then `os._exit(0)` passes here, fails officially), and a program that starts processes (subprocess,
multiprocessing) fails here, works officially. Where no sandbox can be made, `run_case` raises and the eval stage
leaves the program tasks out, saying why. The eval stage runs any of it only when the benchmark's `run_code` is set.
"""

from __future__ import annotations

import json
from multiprocessing.reduction import ForkingPickler
from typing import Any

from engine import sandbox

TIMEOUT_S = 2.0  # the official per-case limit
_PIPE_BYTES = 65536  # Linux's default pipe capacity: the official result queue's message must fit it
_STARTUP_S = 10.0  # allowance for the sandbox and interpreter start, before the program's clock starts

# Runs in the sandbox after its prelude (limits, `started()`). It reads {"code", "lines", "main"} from stdin, runs
# the program with its stdout captured and writes that output to a private copy of the real stdout, exiting 0; an
# exception or any exit (sys.exit, a signal) exits non-zero. The program's own writes to fds 1 and 2 go to
# /dev/null, as the official child's go to streams nobody reads (and no amount of them can fail the case).
_CHILD = r"""
import builtins, io, json, os, sys
job = json.loads(sys.stdin.read())
sys.stdin = io.StringIO("")
result_fd = os.dup(1)
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)
os.dup2(devnull, 2)
lines = iter(job["lines"])

def _input(prompt=None):
    return next(lines)  # StopIteration past the last line, as the official mock raises

def _finish(text, status):
    os.write(result_fd, text.encode("utf-8", "surrogatepass"))
    os._exit(status)

builtins.input = _input
captured = io.StringIO()
sys.stdout = captured
started()
try:
    if job["main"]:
        exec(job["code"], {"__name__": "__main__", "__builtins__": builtins})
    else:
        import io as _io, json as _json, multiprocessing as _mp, pathlib as _pathlib
        module = {"__name__": "metrics.scoring.program_judge", "__builtins__": builtins, "io": _io, "json": _json,
                  "multiprocessing": _mp, "pathlib": _pathlib}
        exec(job["code"], module, {})
except BaseException as e:  # SystemExit too: any exit fails the case, as the official child then reports nothing
    _finish(f"{type(e).__name__}: {e}", 1)
_finish(captured.getvalue(), 0)
"""


def run_case(code: str, input_lines: Any, timeout: float | None = None) -> tuple[bool, str]:
    """(ran to the end, its output or why not) for one run of `code` with `input_lines` fed to input().

    Raises RuntimeError (naming the fix) where no sandbox can be made: the code is never run unsandboxed."""
    # The official feed is "\n".join(input) + "\n" split into lines: a string input becomes one line per character.
    lines = ("\n".join(input_lines) + "\n").splitlines()
    job = {"code": code, "lines": lines, "main": 'if __name__ == "__main__":' in code}
    result = sandbox.run_python(_CHILD, json.dumps(job).encode(), TIMEOUT_S if timeout is None else timeout,
                                startup_s=_STARTUP_S, limits=sandbox.Limits(cpu_s=int(TIMEOUT_S) + 2))
    if result.timed_out:
        return False, "time limit"
    try:
        text = result.stdout.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        text = result.stdout.decode("utf-8", "replace")
    if result.exit_code != 0:
        return False, text[:500] or f"no result (exit code {result.exit_code})"
    output = text.rstrip()
    if 4 + len(ForkingPickler.dumps(output)) > _PIPE_BYTES:  # 4: the queue's length header
        return False, "time limit (the official evaluator's result queue blocks on an output this long)"
    return True, output


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

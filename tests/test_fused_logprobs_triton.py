"""Runs the Triton kernel tests (tests/_interp_fused_logprobs.py, tests/_interp_onepass.py) in Triton's CPU
interpreter, each in a fresh process.

Why a subprocess: `triton.jit` decides interpreted vs compiled when a function is decorated, and triton.language's
own helpers (tl.sum, tl.max) are decorated when triton is first imported. Any earlier import of triton in this
pytest process (another test module, torch, transformers) would leave them compiled and the interpreter failing.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["tests/_interp_fused_logprobs.py", "tests/_interp_onepass.py"])
def test_triton_kernels_in_interpreter(module):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-8000:]}\n{r.stderr[-2000:]}"
    assert " passed" in r.stdout and " skipped" not in r.stdout.splitlines()[-1]
    print(r.stdout.strip().splitlines()[-1])  # e.g. "32 passed in 8.1s", visible with -s

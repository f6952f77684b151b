"""Runs every Triton kernel test module (tests/_interp_*.py) in Triton's CPU interpreter, in one fresh process.

Why a subprocess: `triton.jit` decides interpreted vs compiled when a function is decorated, and triton.language's
own helpers (tl.sum, tl.max) are decorated when triton is first imported. Any earlier import of triton in this
pytest process (another test module, torch, transformers) would leave them compiled and the interpreter failing.
The _interp_ modules skip themselves unless TRITON_INTERPRET=1; on a GPU machine run them directly
(`python -m pytest tests/_interp_fused_logprobs.py`) to test the compiled kernels on CUDA tensors.
"""

import pytest

from ._launch import REPO, child_env, launch, python

MODULES = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("_interp_*.py"))


@pytest.mark.subprocess
def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    assert len(MODULES) >= 3, MODULES
    r = launch(python("-m", "pytest", "-q", "-p", "no:cacheprovider", *MODULES), env=child_env(TRITON_INTERPRET="1"),
               timeout_s=900)
    last = r.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last, last
    print(last)  # e.g. "80 passed in 95s", visible with -s

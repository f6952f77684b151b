"""engine.dist.exit_process: a torchrun worker leaves with its code and flushed output, skipping the interpreter's
teardown (where a C++ thread of the distributed runtime sometimes aborted a finished run); elsewhere a plain exit."""

import subprocess
import sys

import pytest

from ._launch import REPO, child_env

CODE = """
import atexit, logging, sys
from engine.dist import exit_process
atexit.register(lambda: print("teardown ran", flush=True))
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
logging.getLogger("x").info("logged")
sys.stdout.write("unflushed")
exit_process(3)
"""


@pytest.mark.parametrize("world,teardown", [("2", False), ("1", True)])
def test_exit_code_output_and_teardown(world, teardown):
    out = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, env=child_env(WORLD_SIZE=world),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3
    assert out.stdout.startswith("unflushed") and "logged" in out.stderr  # nothing lost on the way out
    assert ("teardown ran" in out.stdout) == teardown

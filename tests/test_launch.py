"""The test helpers themselves: tests/_launch.py (failures show the output; a timeout leaves no process behind) and
the `requires_cuda` collection hook of tests/conftest.py."""

import time
from pathlib import Path

import pytest
import torch

from . import conftest
from ._launch import child_env, launch, python


def test_failure_shows_command_and_output():
    code = "import os, sys; print('out', os.environ['HF_HUB_OFFLINE'], os.environ['OMP_NUM_THREADS']); " \
           "sys.exit('err text')"
    with pytest.raises(pytest.fail.Exception) as e:
        launch(python("-c", code), timeout_s=60)
    text = str(e.value)
    assert "exited with 1" in text and "out 1 1" in text and "err text" in text and "-c" in text
    assert launch(python("-c", code), timeout_s=60, check=False).returncode == 1


def test_timeout_kills_the_whole_tree(tmp_path):
    """A parent that starts a child and waits, as torchrun does with its ranks: after the timeout both are gone."""
    started = tmp_path / "started"
    child = f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(60)"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    start_s = time.perf_counter()
    with pytest.raises(pytest.fail.Exception, match="timed out after 2 s"):
        launch(python("-c", code), timeout_s=2)
    assert started.is_file(), "the child never started: nothing was tested"
    assert _running(str(started)) == []
    assert time.perf_counter() - start_s < 30  # a live child would hold the output pipes open for its 60 s


def _running(token: str) -> list[int]:
    """Live processes whose command line holds `token` (a killed, unreaped one has an empty command line)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if token.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:  # exited while listing
            pass
    return found


def test_child_env_overrides():
    env = child_env(PYTHONHASHSEED="7")
    assert env["PYTHONHASHSEED"] == "7" and env["HF_HUB_OFFLINE"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert str(conftest.REPO) in env["PYTHONPATH"].split(":")


class _Item:
    def __init__(self, *marks: str):
        self.keywords = dict.fromkeys(marks)
        self.added = []

    def add_marker(self, mark):
        self.added.append(mark)


@pytest.mark.parametrize("has_cuda", [False, True])
def test_requires_cuda_skipped_only_without_cuda(monkeypatch, has_cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    gpu, cpu = _Item("requires_cuda", "test_x"), _Item("slow")
    conftest.pytest_collection_modifyitems(None, [gpu, cpu])
    assert cpu.added == []
    if has_cuda:
        assert gpu.added == []
    else:
        (mark,) = gpu.added
        assert mark.name == "skip" and mark.kwargs["reason"] == "needs a CUDA device"

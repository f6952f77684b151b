"""Shared test setup: offline hub, seeded RNGs, and a session-wide toy world built once."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup without it hangs for minutes on our machines
os.environ.setdefault("OMP_NUM_THREADS", "1")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> Path:
    """The toy world at its default settings, built once per test session (data/ and hf/)."""
    from engine.toy import ToySpec, build_toy_world

    out = tmp_path_factory.mktemp("toy_world")
    build_toy_world(out, ToySpec(seed=0, num_train=64, num_test=16))
    return out


@pytest.fixture(scope="session")
def toy_hf(tmp_path_factory) -> Path:
    """Only the toy world's hf/ directory (no parquet, so no `datasets`): for the GPU tests, whose machine has
    torch, triton and transformers only. Same files as toy_world's hf/."""
    from engine.toy import ToySpec, build_toy_model

    out = tmp_path_factory.mktemp("toy_hf") / "hf"
    build_toy_model(out, ToySpec(seed=0, num_train=64, num_test=16))
    return out

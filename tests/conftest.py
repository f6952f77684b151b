"""Shared test setup: offline hub, seeded RNGs, CUDA-only tests skipped without a GPU, and the toy world and a
trained toy base, each built once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup without it hangs for minutes on our machines
os.environ.setdefault("OMP_NUM_THREADS", "1")

import random  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TOY_BASE_STAGE = """
[[stages]]
name = "base"
kind = "sft"
init = "model"
[stages.data]
train = "{world}/data/sft.parquet"
[stages.optim]
lr = 3e-3
warmup_steps = 5
min_lr_ratio = 0.1
[stages.train]
steps = 250
batch_size = 16
micro_batch_tokens = 1024
"""
"""The first stage of a recipe that starts from the trained toy base (`toy_base`; the recipe begins with
`toy_recipe_head`): SFT of the toy model on the toy world's SFT split. About 17% of the base's sampled answers are
well formatted, which leaves GRPO room to improve."""


def pytest_collection_modifyitems(config, items):
    """Tests marked `requires_cuda` are skipped on a machine without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


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


def toy_recipe_head(world: Path, name: str) -> str:
    """`[run]` and `[model]` of a recipe on the toy world that starts with TOY_BASE_STAGE."""
    return f'[run]\nname = "{name}"\nseed = 0\n[model]\npath = "{world}/hf"\ndtype = "float32"\n'


@pytest.fixture(scope="session")
def toy_base(toy_world, tmp_path_factory) -> Path:
    """The finished `base` stage directory (DONE, hf/, metrics.jsonl) of TOY_BASE_STAGE, trained once per test
    session with 2 gloo ranks (250 steps, about a minute on 2 cores). Put it into a run with `add_toy_base`."""
    from ._launch import train

    run = tmp_path_factory.mktemp("toy_base")
    recipe = run / "base.toml"
    recipe.write_text(toy_recipe_head(toy_world, "base") + TOY_BASE_STAGE.format(world=toy_world))
    train(recipe, run / "out", nproc=2, timeout_s=900)
    return run / "out" / "base"


def add_toy_base(toy_base: Path, out_dir: Path) -> None:
    """Copy the finished base stage into run directory `out_dir`: engine/train.py then skips the recipe's `base`
    stage (its DONE marker is there) and later stages start from `out_dir/base/hf`. Stages are seeded by their index
    in the recipe, so the later stages run exactly as if the base had been trained in this run."""
    shutil.copytree(toy_base, out_dir / "base", ignore=shutil.ignore_patterns("checkpoints"))

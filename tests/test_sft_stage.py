"""The SFT stage's loss through kernels.fused_nll: both implementations train the same model."""

import json
from pathlib import Path

import pytest

from ._launch import train
from .test_train_dist import _recipe


def _losses(tmp_path: Path, toy_world: Path, impl: str) -> list[float]:
    out = tmp_path / impl
    train(_recipe(tmp_path, toy_world, steps=3), out, f"--stages.sft.loss_impl={impl}")
    rows = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.subprocess
def test_onepass_and_recompute_train_alike(toy_world, tmp_path):
    """Same data, seed and steps: the per-step losses agree to fp32 round-off (the first step exactly the same
    model), so the loss_impl switch changes speed and memory, not the training."""
    recompute, onepass = _losses(tmp_path, toy_world, "recompute"), _losses(tmp_path, toy_world, "onepass")
    assert len(recompute) == len(onepass) == 3
    for a, b in zip(recompute, onepass, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (recompute, onepass)
    assert recompute[-1] < recompute[0]  # it trains

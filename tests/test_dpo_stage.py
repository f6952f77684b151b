"""The DPO cold-start stage on the toy: it learns the preference, and its stored reference log-probs are exactly
what the reference model gives on the fly."""

import json
import math
import tomllib

import pytest
import torch

from engine.config import ConfigError, parse_config
from engine.data import Processor
from engine.model import Policy, load_hf_model
from engine.stages.dpo import encode_pairs, pair_batch

from ._launch import train

RECIPE = """
[run]
name = "dpo"
seed = 1
[model]
path = "{hf}"
dtype = "float32"
[[stages]]
name = "warm"
kind = "sft"
init = "model"
[stages.data]
train = "{data}/sft.parquet"
[stages.train]
steps = 2
batch_size = 4
[[stages]]
name = "cold_start"
kind = "dpo"
init = "model"
ref = "{ref}"
[stages.data]
train = "{data}/pairs.parquet"
[stages.optim]
lr = 3e-3
schedule = "constant"
[stages.train]
steps = 12
batch_size = 8
micro_batch_tokens = 800
"""


def _run(tmp_path, toy_world, ref, *overrides):
    recipe = tmp_path / "dpo.toml"
    recipe.write_text(RECIPE.format(hf=toy_world / "hf", data=toy_world / "data", ref=ref))
    out = tmp_path / "out"
    train(recipe, out, *overrides)
    metrics = [json.loads(line) for line in (out / "cold_start" / "metrics.jsonl").read_text().splitlines()]
    return recipe, out, metrics


@pytest.mark.subprocess
def test_dpo_learns_with_the_start_as_reference(tmp_path, toy_world):
    # the one-pass loss here (whole pairs per chunk); the other tests and the tiny recipe use the default
    _, out, metrics = _run(tmp_path, toy_world, "model", "--stages.cold_start.dpo.loss_impl=onepass")
    first, last = metrics[0], metrics[-1]
    # Reference = the starting weights: before the first update policy and reference agree exactly.
    assert first["train/dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first["dpo/reward_margin"]) < 1e-5
    assert last["train/dpo_loss"] < first["train/dpo_loss"] - 0.2
    assert last["dpo/reward_accuracy"] > 0.9 > first["dpo/reward_accuracy"]
    assert first["train/loss"] == pytest.approx(first["train/dpo_loss"] + first["train/sft_loss"], rel=1e-5)
    assert (out / "cold_start" / "hf" / "model.safetensors").is_file()


@pytest.mark.subprocess
def test_stored_reference_logps_equal_on_the_fly(tmp_path, toy_world):
    recipe, out, metrics = _run(tmp_path, toy_world, ref="warm")
    stored = torch.load(out / "cold_start" / "ref_logps.pt")
    cfg = tomllib.loads(recipe.read_text())
    stage = parse_config(cfg).stages[1]
    processor = Processor.from_pretrained(toy_world / "hf")
    pairs = encode_pairs(stage, processor, toy_world / "data" / "pairs.parquet")
    assert stored.shape == (len(pairs), 2) and torch.isfinite(stored).all()
    ref_policy = Policy(load_hf_model(out / "warm" / "hf"))
    indices = [0, 3, len(pairs) - 1]
    batch = pair_batch(pairs, indices, processor.merge_size)
    with torch.no_grad():
        logp = ref_policy(batch)
    sums = torch.stack([x.sum() for x in torch.split(logp, torch.diff(batch["target_cu"].long()).tolist())])
    torch.testing.assert_close(stored[indices, 0], sums[:3], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stored[indices, 1], sums[3:], rtol=1e-5, atol=1e-4)
    assert metrics[0]["dpo/reward_margin"] != 0  # a different reference than the start


def test_dpo_config_errors():
    bad = RECIPE.format(hf=".", data=".", ref="nope").replace("steps = 12", "steps = 12\npacking = false")
    bad = bad.replace('[stages.optim]', '[stages.dpo]\nbeta = 0\nlabel_smoothing = 0.7\n[stages.optim]')
    with pytest.raises(ConfigError) as e:
        parse_config(tomllib.loads(bad))
    msg = str(e.value)
    for part in ("dpo.beta must be > 0", "label_smoothing must be in [0, 0.5]", "packing = false is not supported",
                 "ref = 'nope': not the base model or an earlier stage"):
        assert part in msg, msg

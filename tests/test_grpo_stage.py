"""GRPO pieces: group advantages, the training sample layout; short GRPO and PPO-style runs from the toy base."""

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from engine.config import parse_config
from engine.data import Sample
from engine.stages.experience import filter_groups, group_advantages, training_sample
from engine.stages.grpo import GRPOStage

from ._launch import train
from .conftest import TOY_BASE_STAGE, add_toy_base, toy_recipe_head


def test_group_advantages():
    rewards = torch.tensor([[1.5, 0.5, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards, scale_by_std=True)
    expected0 = (rewards[0] - rewards[0].mean()) / (rewards[0].std() + 1e-6)
    torch.testing.assert_close(adv[0], expected0)
    assert torch.equal(adv[1], torch.zeros(4))  # an all-equal group carries no signal
    torch.testing.assert_close(group_advantages(rewards, scale_by_std=False)[0], rewards[0] - 0.5)
    assert adv[0].sum().abs() < 1e-5


def test_filter_groups_drops_all_equal_groups_only_when_asked():
    rewards = torch.tensor([[1.5, 0.5, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.5]])
    assert filter_groups(rewards, drop_equal=True) == [0, 2]
    assert filter_groups(rewards, drop_equal=False) == [0, 1, 2]


def test_training_sample_layout():
    prompt = Sample([1, 2, 3], None, [0, 1, 0], None, None, 3, "r0", answer="4", choices=None)
    s = training_sample(prompt, [7, 8])
    assert s.input_ids == [1, 2, 3, 7, 8] and s.labels == [-100, -100, -100, 7, 8]
    assert s.mm_token_type_ids == [0, 1, 0, 0, 0] and s.num_prompt_tokens == 3 and s.answer == "4"


GRPO_STAGE = """
[[stages]]
name = "grpo_zero"
kind = "grpo"
init = "base"
[stages.data]
train = "{world}/data/train.parquet"
[stages.rollout]
n = 8
max_new_tokens = 48
[stages.optim]
lr = 5e-4
schedule = "constant"
[stages.train]
steps = 16
batch_size = 16
micro_batch_tokens = 2048
[stages.checkpoint]
every = 8
"""

PPO_STAGE = """
[[stages]]
name = "ppo"
kind = "grpo"
init = "base"
[stages.data]
train = "{world}/data/train.parquet"
[stages.rollout]
n = 8
max_new_tokens = 24
[stages.grpo]
mini_batches = 2
ppo_epochs = 2
kl_coef = 0.05
tis_cap = 2.0
filter_equal_groups = false
loss_impl = "onepass"
[stages.optim]
lr = 1e-3
schedule = "constant"
[stages.train]
steps = 8
batch_size = 8
micro_batch_tokens = 512
[stages.checkpoint]
every = 4
"""


def _recipe(world, *stages: str) -> str:
    """A recipe on the toy world: the shared toy base (tests/conftest.py), then `stages`."""
    return toy_recipe_head(world, "rl") + "".join(s.format(world=world) for s in (TOY_BASE_STAGE, *stages))


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def rl_run(toy_world, toy_base, tmp_path_factory) -> Path:
    """One run with 2 gloo ranks and the builtin backend: the toy base, then `grpo_zero` and `ppo`, each from the
    base (one launch for both stages: a launch costs ~10-25 s of imports here)."""
    out = tmp_path_factory.mktemp("rl") / "out"
    recipe = out.parent / "rl.toml"
    recipe.write_text(_recipe(toy_world, GRPO_STAGE, PPO_STAGE))
    add_toy_base(toy_base, out)
    train(recipe, out, nproc=2, timeout_s=900)
    return out


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_process_grpo_raises_format_reward(toy_world, rl_run, tmp_path):
    """GRPO from the toy base (~17% well-formatted samples): the sampled format accuracy rises (deterministic under
    the fixed seeds), and a run resumed in the middle of the stage repeats it exactly."""
    rows = _rows(rl_run / "grpo_zero" / "metrics.jsonl")
    for key in ("rollout/reward", "rollout/format_acc", "rollout/accuracy", "rollout/response_len", "policy/entropy",
                "policy/clip_frac", "policy/approx_kl", "train/grad_norm", "time/rollout_s", "perf/tok_per_s",
                "time/rollout_prefill_s", "time/rollout_decode_s", "time/rollout_tail_s", "rollout/slot_use"):
        assert all(key in r for r in rows), key
    early = sum(r["rollout/format_acc"] for r in rows[:4]) / 4
    late = sum(r["rollout/format_acc"] for r in rows[-4:]) / 4
    assert late > early + 0.08, [round(r["rollout/format_acc"], 3) for r in rows]
    # on-policy (1 x 1, no TIS): no old-log-prob forward, the ratio is exactly 1
    recipe = tmp_path / "grpo.toml"
    recipe.write_text(_recipe(toy_world, GRPO_STAGE))
    assert GRPOStage(parse_config(tomllib.loads(recipe.read_text())).stages[1]).on_policy
    assert all(r["policy/approx_kl"] == 0.0 and r["policy/clip_frac"] == 0.0 for r in rows)
    assert (rl_run / "grpo_zero" / "hf" / "model.safetensors").is_file()

    # Resume in the middle of the stage (in a copy of the run): as if it had died after step 12 (the newest
    # checkpoint is step 8). Sampling is seeded by step and rank and the backend gets the restored weights, so steps
    # 9-16 repeat exactly.
    out = tmp_path / "out"
    for name in ("base", "grpo_zero"):
        shutil.copytree(rl_run / name, out / name)
    stage = out / "grpo_zero"
    (stage / "DONE").unlink()
    shutil.rmtree(stage / "hf")
    shutil.rmtree(stage / "checkpoints" / "step-000016")
    train(recipe, out, nproc=2, timeout_s=900)
    before = (rl_run / "grpo_zero" / "metrics.jsonl").read_text().splitlines()
    after = (stage / "metrics.jsonl").read_text().splitlines()
    # Resumed from step 8: lines 1-8 (timings included) are the first run's, the rest were written again.
    assert after[:8] == before[:8] and after[8] != before[8]
    rerun = [json.loads(line) for line in after]
    assert [r["step"] for r in rerun] == list(range(1, 17))
    for a, b in zip(rows, rerun, strict=True):
        for key in ("rollout/reward", "rollout/format_acc", "rollout/response_len", "train/loss", "train/grad_norm"):
            assert a[key] == b[key], (key, a, b)


@pytest.mark.slow
@pytest.mark.subprocess
def test_ppo_minibatches_kl_and_tis(rl_run):
    """2 mini-batches x 2 epochs per rollout batch, a KL penalty to the starting model and truncated importance
    sampling: the first update of each rollout is on-policy (ratio and KL exactly 0 at the start), later ones are
    off-policy; rollout stats are logged once per rollout. With the one-pass loss (the other GRPO tests and the tiny
    recipe use the default)."""
    rows = _rows(rl_run / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert ["rollout/reward" in r for r in rows] == [True, False, False, False] * 2
    first = rows[0]
    # nothing has moved yet
    assert first["policy/approx_kl"] == 0.0 and first["policy/ref_kl"] == 0.0 and first["policy/clip_frac"] == 0.0
    assert abs(first["policy/tis_weight"] - 1.0) < 1e-3  # the builtin fp32 backend's log-probs match the trainer's
    assert all(r["policy/approx_kl"] > 0 for r in rows[1:4]) and all(r["policy/ref_kl"] > 0 for r in rows[1:])
    # A new rollout batch from the updated policy: on-policy again. To rounding only: the old log-probs come from a
    # forward over all of the rank's samples, packed differently from this mini-batch (3.9e-16 under seed 0).
    assert rows[4]["policy/approx_kl"] < 1e-12
    assert all(0 < r["policy/tis_weight"] <= 2.0 for r in rows)


def test_ppo_settings_are_validated(toy_world):
    from engine.config import ConfigError

    text = _recipe(toy_world, PPO_STAGE)
    assert not GRPOStage(parse_config(tomllib.loads(text)).stages[1]).on_policy  # 4 steps a rollout: old log-probs
    raw = tomllib.loads(text)
    raw["stages"][1]["train"]["steps"] = 6
    raw["stages"][1]["checkpoint"]["every"] = 3
    raw["stages"][1]["grpo"]["tis_cap"] = 0.5
    raw["stages"][1]["train"]["batch_size"] = 7
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    text = str(e.value)
    for want in ("train.steps = 6 must be a multiple of", "checkpoint.every = 3 must be a multiple of 4",
                 "tis_cap 0 (off) or >= 1", "batch_size = 7 prompts must divide into grpo.mini_batches = 2"):
        assert want in text, want

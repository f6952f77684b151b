"""Recipe values and files rejected at the door (engine/config.py, the check() methods): non-finite and
out-of-range numbers, binary recipes. Each case passed the config check (or crashed with a traceback) before."""

import tomllib

import pytest

from engine.config import ConfigError, load_config, parse_config

RECIPE = """
[run]
name = "t"
[[stages]]
name = "world"
kind = "toy"
[[stages]]
name = "sft"
kind = "sft"
init = "world"
[stages.data]
train = "world:data/sft.parquet"
[[stages]]
name = "dpo"
kind = "dpo"
init = "world"
[stages.data]
train = "world:data/sft.parquet"
[[stages]]
name = "grpo"
kind = "grpo"
init = "world"
[stages.data]
train = "world:data/train.parquet"
[[stages]]
name = "eval"
kind = "eval"
models = ["world"]
[[stages.benchmarks]]
name = "toy"
kind = "toy"
path = "world:data/test.parquet"
"""


def _problems(overrides) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(tomllib.loads(RECIPE), overrides, source="r.toml")
    return e.value.problems


def test_recipe_parses():
    assert [s.kind for s in parse_config(tomllib.loads(RECIPE), source="r.toml").stages] == [
        "toy", "sft", "dpo", "grpo", "eval"]


NON_FINITE_KEYS = ["stages.sft.optim.lr", "stages.sft.optim.max_grad_norm", "stages.dpo.dpo.beta",
                   "stages.dpo.dpo.sft_weight", "stages.grpo.rollout.temperature", "stages.grpo.rollout.top_p",
                   "stages.grpo.grpo.clip_low", "stages.grpo.grpo.clip_high", "stages.grpo.grpo.format_weight",
                   "stages.grpo.grpo.accuracy_weight", "stages.grpo.grpo.kl_coef", "stages.eval.gf_beta",
                   "run.progress_every_s"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_rejected_with_their_key(value):
    """`lr = nan`, `beta = inf`, `temperature = nan`, `max_grad_norm = nan` passed every check (nan <= 0 is
    False) and trained a diverged model."""
    problems = _problems([f"--{k}={value}" for k in NON_FINITE_KEYS])
    for key in NON_FINITE_KEYS:
        assert f"{key}: must be a finite number, got {float(value)}" in problems, key
    assert len(problems) == len(NON_FINITE_KEYS)  # one message each: the default stands in for the checks


def test_non_finite_inside_a_list():
    assert _problems(["--stages.sft.optim.betas=[0.9, nan]"]) == [
        "stages.sft.optim.betas[1]: must be a finite number, got nan"]


@pytest.mark.parametrize(("override", "expected"), [
    ("--stages.sft.optim.weight_decay=-0.1", "stages.sft.optim.weight_decay must be >= 0, got -0.1"),
    ("--stages.sft.optim.eps=0", "stages.sft.optim.eps must be > 0 (it keeps AdamW's division finite), got 0.0"),
    ("--stages.sft.data.min_pixels=0", "stages.sft.data.min_pixels must be >= 1 when set, got 0"),
    ("--stages.grpo.grpo.format_weight=-1", "stages.grpo.grpo.format_weight and grpo.accuracy_weight must be >= 0"),
    ("--stages.eval.gpu_memory_utilization=1.5", "stages.eval.gpu_memory_utilization must be in (0, 1]"),
    ("--stages.eval.max_pixels=-4", "stages.eval.max_pixels must be >= 1 when set, got -4"),
])
def test_out_of_range_numbers_name_the_key(override, expected):
    problems = _problems([override])
    assert any(p.startswith(expected) for p in problems), problems


def test_both_reward_weights_zero():
    problems = _problems(["--stages.grpo.grpo.format_weight=0", "--stages.grpo.grpo.accuracy_weight=0"])
    assert problems == ["stages.grpo.grpo.format_weight and grpo.accuracy_weight must be >= 0 and not both 0 (every "
                        "reward would be equal), got 0.0, 0.0"]


def test_binary_recipe_is_a_config_error(tmp_path):
    """A binary file used to raise UnicodeDecodeError with a traceback (exit 1; the documented code is 2)."""
    recipe = tmp_path / "model.bin"
    recipe.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(ConfigError) as e:
        load_config(recipe)
    assert e.value.problems == ["not a text file (not UTF-8: byte 0x89 at offset 0); a recipe is a TOML file such "
                                "as recipes/tiny.toml"]
    assert str(e.value).startswith(f"{recipe}: 1 problem")


def test_train_exits_2_on_a_binary_recipe(tmp_path, capsys):
    from engine.train import main

    recipe = tmp_path / "garbage.toml"
    recipe.write_bytes(bytes(range(256)) * 4)
    assert main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "not a text file" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()

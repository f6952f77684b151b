"""Recipes that include shared TOML files (engine/config_include.py): merge rules, errors naming the file, the
resolved config showing the merged result."""

import subprocess
import sys
import tomllib

import pytest

from engine.config import ConfigError, load_config
from engine.config_include import merge_recipes, read_recipe

from .conftest import REPO

SHARED = """
[run]
name = "shared"
seed = 7
[[stages]]
name = "world"
kind = "toy"
[[stages]]
name = "sft"
kind = "sft"
init = "world"
[stages.data]
train = "world:data/sft.parquet"
[stages.optim]
lr = 1e-3
warmup_steps = 5
"""


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_recipe_keys_win_tables_merge_and_stages_merge_by_name(tmp_path):
    _write(tmp_path / "parts" / "shared.toml", SHARED)
    recipe = _write(tmp_path / "r.toml", """include = ["parts/shared.toml"]
[run]
name = "mine"
[[stages]]
name = "sft"
[stages.optim]
lr = 2e-4
[[stages]]
name = "sft2"
kind = "sft"
init = "sft"
[stages.data]
train = "world:data/sft.parquet"
""")
    cfg = load_config(recipe)
    assert (cfg.run.name, cfg.run.seed) == ("mine", 7)  # the recipe's key wins, the included one stays
    assert [s.name for s in cfg.stages] == ["world", "sft", "sft2"]  # included-only stages first
    sft = cfg.stages[1]
    assert sft.kind == "sft" and sft.init == "world"  # from the included stage of the same name
    assert (sft.optim.lr, sft.optim.warmup_steps) == (2e-4, 5)  # one key overridden, the table merged


def test_stage_named_in_recipe_takes_its_position_and_lists_are_replaced():
    base = {"stages": [{"name": "eval", "kind": "eval", "benchmarks": [{"name": "a"}, {"name": "b"}]},
                       {"name": "x", "kind": "toy"}]}
    top = {"stages": [{"name": "y", "kind": "toy"}, {"name": "eval", "models": ["m"], "benchmarks": [{"name": "c"}]}]}
    merged = merge_recipes(base, top)
    assert [s["name"] for s in merged["stages"]] == ["x", "y", "eval"]
    assert merged["stages"][2] == {"name": "eval", "kind": "eval", "models": ["m"], "benchmarks": [{"name": "c"}]}
    assert base["stages"][0]["benchmarks"] == [{"name": "a"}, {"name": "b"}]  # inputs untouched


def test_nested_and_diamond_includes_read_each_file(tmp_path):
    _write(tmp_path / "d.toml", '[run]\nname = "d"\nseed = 1\n')
    _write(tmp_path / "b.toml", 'include = ["d.toml"]\n[run]\nseed = 2\n')
    _write(tmp_path / "c.toml", 'include = ["d.toml"]\n[run]\nlog_every = 3\n')
    recipe = _write(tmp_path / "a.toml", 'include = ["b.toml", "c.toml"]\n[[stages]]\nname = "w"\nkind = "toy"\n')
    raw, files = read_recipe(recipe)
    # c.toml's copy of d.toml (seed 1) comes after b.toml's seed 2: later includes win over earlier ones.
    assert raw["run"] == {"name": "d", "seed": 1, "log_every": 3}
    assert [f.name for f in files] == ["a.toml", "b.toml", "d.toml", "c.toml", "d.toml"]


def test_missing_include_names_the_file_that_asks_for_it(tmp_path):
    recipe = _write(tmp_path / "r.toml", 'include = ["nope.toml"]\n[run]\nname = "r"\n')
    with pytest.raises(ConfigError) as e:
        load_config(recipe)
    assert str(recipe) in str(e.value) and "include 'nope.toml': file not found" in str(e.value)


def test_include_cycle_is_named_with_its_chain(tmp_path):
    _write(tmp_path / "a.toml", 'include = ["b.toml"]\n')
    _write(tmp_path / "b.toml", 'include = ["a.toml"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "a.toml")
    text = str(e.value)
    assert "include cycle" in text and f"{tmp_path / 'a.toml'} -> {tmp_path / 'b.toml'} -> {tmp_path / 'a.toml'}" \
        in text


@pytest.mark.parametrize("value", ['"x.toml"', '[1]', '[""]', '{a = 1}'])
def test_bad_include_value_or_bad_included_file(tmp_path, value):
    _write(tmp_path / "x.toml", SHARED)
    recipe = _write(tmp_path / "r.toml", f"include = {value}\n")
    if value == '"x.toml"':  # one path as a string is accepted
        assert load_config(recipe).run.name == "shared"
        return
    with pytest.raises(ConfigError) as e:
        load_config(recipe)
    assert "expected a list of TOML file paths" in str(e.value) and str(recipe) in str(e.value)


def test_included_file_that_is_not_toml_is_named(tmp_path):
    bad = _write(tmp_path / "bad.toml", "[run\n")
    recipe = _write(tmp_path / "r.toml", 'include = ["bad.toml"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(recipe)
    assert str(e.value).startswith(f"{bad}: 1 problem") and "not valid TOML" in str(e.value)


def test_overrides_apply_to_the_merged_recipe(tmp_path):
    _write(tmp_path / "shared.toml", SHARED)
    recipe = _write(tmp_path / "r.toml", 'include = ["shared.toml"]\n')
    cfg = load_config(recipe, ["--stages.sft.optim.lr=5e-5"])
    assert cfg.stages[1].optim.lr == 5e-5 and cfg.stages[1].optim.warmup_steps == 5


def test_config_cli_shows_the_merged_result(tmp_path):
    _write(tmp_path / "shared.toml", SHARED)
    recipe = _write(tmp_path / "r.toml", 'include = ["shared.toml"]\n[run]\nname = "cli"\n')
    out = subprocess.run([sys.executable, "-m", "engine.config", str(recipe)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"# {recipe} with {tmp_path / 'shared.toml'} merged in")
    printed = tomllib.loads(out.stdout)
    assert "include" not in printed and printed["run"]["name"] == "cli"
    assert printed["stages"][1]["optim"]["warmup_steps"] == 5

"""Recipe loading: every problem reported at once, overrides, the resolved TOML round trip, the CLI exit code."""

import subprocess
import sys
import tomllib

import pytest

from engine.config import ConfigError, parse_config, to_toml

from .conftest import REPO

GOOD = """
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
[stages.optim]
lr = 1e-3
"""


def _parse(text, overrides=()):
    return parse_config(tomllib.loads(text), list(overrides), source="x.toml")


def test_good_recipe_and_defaults():
    cfg = _parse(GOOD)
    assert [s.name for s in cfg.stages] == ["world", "sft"]
    sft = cfg.stages[1]
    assert sft.optim.lr == 1e-3 and sft.optim.schedule == "cosine" and sft.train.batch_size == 8
    assert str(cfg.out_dir) == "runs/t"


def test_all_problems_reported_together():
    bad = GOOD.replace("lr = 1e-3", 'lrr = 1e-3\nschedule = "cosin"\nwarmup_steps = "5"\nmax_grad_norm = -1')
    bad = bad.replace('name = "t"', 'name = "t"\nseeed = 3')
    with pytest.raises(ConfigError) as e:
        _parse(bad)
    msg = str(e.value)
    assert "5 problems" in msg
    assert "optim.lrr: unknown key (did you mean 'lr'?)" in msg
    assert "run.seeed: unknown key (did you mean 'seed'?)" in msg
    assert "'cosin' not in {cosine, constant} (did you mean 'cosine'?)" in msg
    assert "warmup_steps: expected int, got str '5'" in msg
    assert "max_grad_norm must be >= 0" in msg


def test_cross_stage_references():
    bad = GOOD.replace('init = "world"', 'init = "pretrain"').replace('"world:data', '"nope:data')
    bad += '\n[[stages]]\nname = "world"\nkind = "toy"\n[[stages]]\nname = "x"\nkind = "sfd"\n'
    with pytest.raises(ConfigError) as e:
        _parse(bad)
    msg = str(e.value)
    assert "init = 'pretrain': not the base model or an earlier stage (known: model, world)" in msg
    assert "'nope' is not an earlier stage" in msg
    assert "duplicate stage name 'world'" in msg
    assert "'sfd' not in" in msg and "did you mean 'sft'" in msg


def test_model_reference_needs_a_path(tmp_path):
    with pytest.raises(ConfigError, match=r"\[model\].path is empty"):
        _parse(GOOD.replace('init = "world"', 'init = "model"'))
    with pytest.raises(ConfigError, match="is neither a directory nor a Hugging Face model id"):
        _parse(GOOD.replace('init = "world"', 'init = "model"') + f'\n[model]\npath = "{tmp_path}/missing"\n')


def _uses_model(path):
    return GOOD.replace('init = "world"', 'init = "model"') + f'\n[model]\npath = "{path}"\n'


def test_model_dir_without_weights_or_tokenizer_is_named_up_front(tmp_path):
    with pytest.raises(ConfigError) as e:
        _parse(_uses_model(tmp_path))
    msg = str(e.value)
    assert f"model.path: '{tmp_path}' has no config, no weights, no tokenizer" in msg
    assert "found: nothing, an empty directory" in msg
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"has no tokenizer \(expected tokenizer: tokenizer.json or"):
        _parse(_uses_model(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert _parse(_uses_model(tmp_path)).model.path == str(tmp_path)


def _fake_hub_cache(root, repo_id, files):
    """The layout huggingface_hub's cache has: refs/main names the commit, snapshots/<commit>/ holds the files."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name in files:
        (snap / name).write_text("{}")
    return snap


def test_hub_id_resolves_through_the_cache_or_names_the_download(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    from engine.hub import resolve_model_path

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so the id is no relative path that exists
    with pytest.raises(ConfigError) as e:
        _parse(_uses_model("Qwen/Qwen2.5-VL-7B-Instruct"))
    assert "not in the local cache, and the hub is offline" in str(e.value)
    assert "`hf download Qwen/Qwen2.5-VL-7B-Instruct`" in str(e.value)
    with pytest.raises(ValueError, match="hf download Qwen/Qwen2.5-VL-7B-Instruct"):
        resolve_model_path("Qwen/Qwen2.5-VL-7B-Instruct")

    snap = _fake_hub_cache(tmp_path, "Qwen/Qwen2.5-VL-7B-Instruct",
                           ["config.json", "model.safetensors.index.json", "tokenizer.json"])
    cfg = _parse(_uses_model("Qwen/Qwen2.5-VL-7B-Instruct"))
    assert cfg.model.path == "Qwen/Qwen2.5-VL-7B-Instruct"  # the recipe keeps the id; train.py resolves it
    assert resolve_model_path("Qwen/Qwen2.5-VL-7B-Instruct") == snap
    _fake_hub_cache(tmp_path, "org/empty", [])
    with pytest.raises(ConfigError, match="has no config, no weights, no tokenizer"):
        _parse(_uses_model("org/empty"))


def test_stage_problems_read_as_sentences():
    recipe = GOOD + """
[[stages]]
name = "eval"
kind = "eval"
models = ["sft"]
[[stages.benchmarks]]
name = "b"
kind = "toy"
path = "world:data/test.parquet"
group = "id"
"""
    with pytest.raises(ConfigError) as e:
        _parse(recipe)
    assert "stages.eval: the Generalization Factor needs" in str(e.value)


def test_data_columns_table(tmp_path):
    cfg = _parse(GOOD.replace("[stages.optim]", '[stages.data.columns]\nimages = "image"\nproblem = "q"\n'
                                                "[stages.optim]"))
    assert cfg.stages[1].data.columns == {"images": "image", "problem": "q"}
    assert 'columns = {images = "image", problem = "q"}' in to_toml(cfg)
    assert _parse(to_toml(cfg)) == cfg
    with pytest.raises(ConfigError, match="stages.sft.data.columns.pictures: not one of our columns"):
        _parse(GOOD, ['--stages.sft.data.columns={pictures = "image"}'])
    with pytest.raises(ConfigError, match="stages.sft.data.columns.problem: expected str, got int 3"):
        _parse(GOOD, ["--stages.sft.data.columns={problem = 3}"])


def test_missing_required_key_and_int_widening():
    with pytest.raises(ConfigError, match="stages.sft.init: required key is missing"):
        _parse(GOOD.replace('init = "world"\n', ""))
    cfg = _parse(GOOD.replace("lr = 1e-3", "lr = 1"))
    assert cfg.stages[1].optim.lr == 1.0 and isinstance(cfg.stages[1].optim.lr, float)


def test_override_precedence_and_parsing():
    cfg = _parse(GOOD, ["--stages.sft.optim.lr=5e-5", "--run.seed=7", "--stages.sft.optim.betas=[0.8, 0.9]",
                        "--run.out_dir=/tmp/somewhere", "--stages.sft.data.on_bad_row=error"])
    sft = cfg.stages[1]
    assert sft.optim.lr == 5e-5 and cfg.run.seed == 7 and sft.optim.betas == [0.8, 0.9]
    assert str(cfg.out_dir) == "/tmp/somewhere" and sft.data.on_bad_row == "error"
    # The last override of a key wins.
    assert _parse(GOOD, ["--run.seed=1", "--run.seed=2"]).run.seed == 2
    with pytest.raises(ConfigError) as e:
        _parse(GOOD, ["--stages.nope.optim.lr=1", "--run.seed=x", "--stages.sft.optim.lr=-1"])
    assert "3 problems" in str(e.value) and "no stage named 'nope'" in str(e.value)


def test_resolved_toml_round_trip():
    cfg = _parse(GOOD, ["--stages.sft.optim.lr=2e-4"])
    again = _parse(to_toml(cfg))
    assert again == cfg


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.subprocess  # engine/train.py in a fresh process: left out of make test-fast
def test_train_exits_2_without_traceback(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(GOOD.replace("lr = 1e-3", "lrr = 1e-3\nwarmup_steps = -1"))
    out = _run([str(REPO / "engine" / "train.py"), str(recipe)], cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "2 problems" in out.stderr and "did you mean 'lr'" in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_config_cli_prints_resolved(tmp_path):
    recipe = tmp_path / "good.toml"
    recipe.write_text(GOOD)
    out = _run(["-m", "engine.config", str(recipe), "--stages.sft.optim.lr=3e-4"], cwd=REPO)
    assert out.returncode == 0, out.stderr
    printed = tomllib.loads(out.stdout)
    assert printed["stages"][1]["optim"]["lr"] == 3e-4 and printed["stages"][1]["train"]["micro_batch_tokens"] > 0


def test_config_cli_prints_before_files_exist(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(GOOD.replace('"world:data/sft.parquet"', f'"{tmp_path}/data/train.parquet"'))
    out = _run(["-m", "engine.config", str(recipe)], cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert tomllib.loads(out.stdout)["stages"][1]["data"]["train"] == f"{tmp_path}/data/train.parquet"
    assert f"warning: stages.sft.data.train: '{tmp_path}/data/train.parquet' does not exist" in out.stderr

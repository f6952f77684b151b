"""The shipped recipes are valid: every table, key, type and stage reference checks out once the files they name
exist (they are the user's: a checkpoint, training prompts, benchmark directories, the main run's outputs)."""

import importlib.util
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config

from .conftest import REPO

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.toml") if p.parent.name != "include")  # include/: parts
USER_FILES = ["checkpoints/Qwen2.5-VL-7B-Instruct/", "checkpoints/Qwen2.5-VL-72B-Instruct/",
              "checkpoints/Qwen2.5-VL-32B-Instruct/", "data/specs/train.parquet",
              *(f"data/benchmarks/{b}/" for b in ("mathvista", "mathverse", "mathvision", "mmmu", "megabench")),
              "runs/specs/distill/pairs.parquet", "runs/specs/grpo_zero/hf/"]


def _make(root: Path) -> None:
    for rel in USER_FILES:
        p = root / rel
        if rel.endswith("/"):
            p.mkdir(parents=True)
            if "Instruct" in rel or rel.endswith("/hf/"):  # a model directory: what loading needs is checked
                for name in ("config.json", "model.safetensors", "tokenizer.json"):
                    (p / name).touch()
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()


@pytest.fixture(autouse=True)
def _vllm_installed(monkeypatch):
    """Recipes are checked as on the GPU machines they are sized for, where vLLM is installed (teacher.toml requires
    it; without it the loader says so: tests/test_vllm_backend.py::test_config_without_vllm)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: find_spec("json") if name == "vllm"
                        else find_spec(name, *a))


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(r.relative_to(REPO / "recipes")) for r in RECIPES])
def test_recipe_is_valid(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _make(tmp_path)
    cfg = load_config(recipe)
    assert cfg.stages and cfg.stages[-1].kind == "eval"


def test_specs_pipeline_and_paper_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _make(tmp_path)
    cfg = load_config(REPO / "recipes" / "specs.toml")
    stages = {s.name: s for s in cfg.stages}
    assert [(s.name, s.kind) for s in cfg.stages] == [("grpo_zero", "grpo"), ("distill", "distill"),
                                                      ("cold_start", "dpo"), ("specs", "grpo"), ("eval", "eval")]
    assert stages["distill"].policy == "grpo_zero" and stages["cold_start"].init == "model"
    assert stages["specs"].init == "cold_start" and stages["cold_start"].data.train == "distill:pairs.parquet"
    # The values these recipes use for the paper's settings (the recipe comments say which the paper states).
    assert stages["cold_start"].dpo.sft_weight == 1.0 and stages["cold_start"].optim.lr == 1e-6
    assert stages["cold_start"].train.batch_size == 64
    assert (stages["specs"].optim.lr, stages["specs"].train.batch_size, stages["specs"].rollout.n) == (1e-6, 128, 8)
    assert stages["specs"].rollout.max_new_tokens == 10240
    assert (stages["grpo_zero"].grpo.format_weight, stages["grpo_zero"].grpo.accuracy_weight) == (0.5, 1.0)
    assert stages["eval"].gf_beta == 2.0
    assert {b.kind for b in stages["eval"].benchmarks} == {"mathvista", "mathverse", "mathvision", "mmmu", "megabench"}


def test_missing_user_files_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "recipes" / "specs.toml")
    text = str(e.value)
    assert "checkpoints/Qwen2.5-VL-7B-Instruct' is not a directory" in text
    assert text.count("is not a directory") == 1  # reported once, not once per stage that uses it
    assert "data/benchmarks/megabench' does not exist" in text


ABLATIONS = sorted((REPO / "recipes" / "ablations").glob("*.toml"))


@pytest.mark.parametrize("recipe", ABLATIONS, ids=[r.name for r in ABLATIONS])
def test_ablations_evaluate_and_train_like_the_main_run(recipe, tmp_path, monkeypatch):
    """An ablation compares with the main run only under the same evaluation (benchmarks, their settings such as
    MEGA-Bench's run_code, decoding, the judge) and the same final-GRPO settings outside the rollout section."""
    import dataclasses

    monkeypatch.chdir(tmp_path)
    _make(tmp_path)
    main = {s.name: s for s in load_config(REPO / "recipes" / "specs.toml").stages}
    abl = {s.name: s for s in load_config(recipe).stages}
    ev, main_ev = dataclasses.asdict(abl["eval"]), dataclasses.asdict(main["eval"])
    assert ev.pop("models") != main_ev.pop("models")
    assert ev == main_ev
    if "specs" not in abl:  # an analysis of the cold starts alone (gf_curves.toml): no final GRPO to compare
        assert recipe.name == "gf_curves.toml"
        return
    for table in ("grpo", "optim", "train", "judge", "data"):
        assert getattr(abl["specs"], table) == getattr(main["specs"], table), table
    assert abl["specs"].rollout.n == main["specs"].rollout.n
    assert abl["specs"].rollout.max_new_tokens == main["specs"].rollout.max_new_tokens
    assert abl["specs"].rollout.temperature == main["specs"].rollout.temperature
    assert abl["specs"].rollout.max_batch_rows == main["specs"].rollout.max_batch_rows


SHARED_EVAL = REPO / "recipes" / "include" / "five_benchmarks.toml"


@pytest.mark.parametrize("recipe", [REPO / "recipes" / "specs.toml", REPO / "recipes" / "eval.toml", *ABLATIONS],
                         ids=lambda p: p.name)
def test_evaluation_is_defined_once(recipe, tmp_path, monkeypatch):
    """specs.toml, eval.toml and every ablation take the benchmarks and the eval settings from one included file
    and write none of their own: the eval stage each resolves to is the shared one but for the models."""
    import dataclasses
    import tomllib

    from engine.config_include import read_recipe

    own = tomllib.loads(recipe.read_text())
    raw, files = read_recipe(recipe)
    assert SHARED_EVAL.resolve() in [f.resolve() for f in files]
    own_eval = next(s for s in own["stages"] if s["name"] == "eval")
    assert set(own_eval) == {"name", "models"}, "eval settings belong in recipes/include/five_benchmarks.toml"
    monkeypatch.chdir(tmp_path)
    _make(tmp_path)
    shared = tomllib.loads(SHARED_EVAL.read_text())["stages"][0]
    ev = dataclasses.asdict(load_config(recipe).stages[-1])
    assert ev["models"] == own_eval["models"]
    assert [b["name"] for b in ev["benchmarks"]] == [b["name"] for b in shared["benchmarks"]]
    for b, want in zip(ev["benchmarks"], shared["benchmarks"], strict=True):
        assert {k: b[k] for k in want} == want
    assert {k: ev[k] for k in shared if k not in ("benchmarks", "judge")} == \
        {k: v for k, v in shared.items() if k not in ("benchmarks", "judge")}
    assert ev["judge"]["enabled"] is False and ev["judge"]["model"] == shared["judge"]["model"]


def test_paper_tags_only_on_values_the_paper_states():
    """The values the paper does not state (issue 17's reading: lambda, the DPO lr and batch, the reference model,
    no KL, 10,240 tokens) are not tagged [paper] on their recipe lines."""
    text = (REPO / "recipes" / "specs.toml").read_text()
    dpo = text[text.index('name = "cold_start"'):text.index('name = "specs"\nkind')]
    for key in ("sft_weight = 1.0", "lr = 1e-6", "batch_size = 64"):
        line = next(ln for ln in dpo.splitlines() if ln.startswith(key))
        assert "[ours]" in line and "[paper]" not in line, line
    assert "reference = the base model [paper]" not in text and "no KL," not in text


def test_gf_curves_trains_the_cold_starts_as_the_main_run_and_the_sft_ablation(tmp_path, monkeypatch):
    """recipes/ablations/gf_curves.toml: its DPO cold start is the main run's, its SFT cold start the SFT ablation's,
    but for the checkpoints they keep; the eval takes every kept checkpoint of both."""
    import dataclasses

    monkeypatch.chdir(tmp_path)
    _make(tmp_path)
    gf = {s.name: s for s in load_config(REPO / "recipes" / "ablations" / "gf_curves.toml").stages}
    main = {s.name: s for s in load_config(REPO / "recipes" / "specs.toml").stages}
    sft = {s.name: s for s in load_config(REPO / "recipes" / "ablations" / "sft_cold_start.toml").stages}
    for ours, theirs in ((gf["cold_start"], main["cold_start"]), (gf["sft_cold_start"], sft["cold_start"])):
        assert ours.kind == theirs.kind and ours.init == theirs.init == "model"
        for table in ("optim", "train") + (("dpo",) if ours.kind == "dpo" else ()):
            assert getattr(ours, table) == getattr(theirs, table), table
        assert dataclasses.replace(ours.data, train=theirs.data.train) == theirs.data
        assert ours.checkpoint.every > 0 and ours.checkpoint.keep >= 8  # the points of the curve are kept
    assert gf["eval"].models == ["model", "cold_start@*", "sft_cold_start@*"] and gf["eval"].base == "model"

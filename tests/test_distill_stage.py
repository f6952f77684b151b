"""The distill stage: filters, pair schema, corruptions, atomic resume, settings pinning, the coupled variant and
the judge (against the stub Gemini server). Sampling is replaced by a scripted backend so every count is known;
the real backend runs in the tiny recipe (test_tiny_recipe.py)."""

import dataclasses
import json
import re

import datasets
import pytest
import torch

from engine.config import ModelConfig, RunConfig
from engine.corrupt import split_response
from engine.data import Processor
from engine.dist import DistInfo
from engine.judge import JudgeConfig
from engine.rewards import format_ok, score
from engine.rollout import Completion
from engine.sections import DataConfig, RolloutConfig
from engine.stages import StageContext
from engine.stages import distill as distill_stage
from engine.stages.config import DistillConfig, DistillStageConfig
from engine.stages.dpo import encode_pairs

from .test_judge import StubGemini

NUM_PROMPTS = 10


def _tag(row_id: str) -> str:
    return re.sub(r"\W", "_", row_id)  # the stub server routes on [[\w+]] tags


def _wrong(answer: str) -> str:
    return "A" if answer != "A" else "B"


class ScriptedBackend:
    """Per prompt, four samples: formatted+correct, formatted+wrong, unformatted+correct, formatted+correct again
    (another wording). Counts every prompt it is asked about."""

    calls: list[str] = []
    fail_at_call: int | None = None

    def __init__(self, model_dir, *, device, dtype, processor, **vllm_settings):
        self.processor = processor

    def close(self):
        pass

    def generate(self, prompts, n, sampling):
        assert n == 4
        out = []
        for p in prompts:
            if ScriptedBackend.fail_at_call is not None and len(ScriptedBackend.calls) >= ScriptedBackend.fail_at_call:
                raise RuntimeError("simulated crash")
            ScriptedBackend.calls.append(p.row_id)
            a = p.answer
            texts = [f"<think>Count the shapes.\nThere are $\\frac{{4}}{{2}}$ pairs. [[{_tag(p.row_id)}]]</think>"
                     f"<answer>{a}</answer>",
                     f"<think>Guess.</think><answer>{_wrong(a)}</answer>",
                     f"The answer is {a}.",
                     f"<think>Look again: two and two.\n\nSo it is {a}.</think>\n<answer>{a}</answer>"]
            out.append([Completion(prompt_index=0, token_ids=[1], text=t, logprobs=[0.0], finish_reason="stop")
                        for t in texts])
        return out


@pytest.fixture
def scripted(monkeypatch):
    ScriptedBackend.calls, ScriptedBackend.fail_at_call = [], None
    monkeypatch.setattr(distill_stage, "make_backend", lambda kind, model_dir, **kw: ScriptedBackend(model_dir, **kw))
    return ScriptedBackend


def _ctx(tmp_path, toy_world, name="distill"):
    stage_dir = tmp_path / "out" / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(run=RunConfig(name="t", seed=3), model=ModelConfig(path=str(toy_world / "hf"), dtype="float32"),
                        dist=DistInfo(0, 1, 0, torch.device("cpu"), "gloo"), out_dir=tmp_path / "out",
                        stage_dir=stage_dir)


def _cfg(toy_world, **distill):
    return DistillStageConfig(name="distill", kind="distill", policy="model",
                              data=DataConfig(train=str(toy_world / "data" / "train.parquet")),
                              rollout=RolloutConfig(n=4, max_new_tokens=16),
                              distill=DistillConfig(num_prompts=NUM_PROMPTS, chunk_prompts=4, **distill))


def test_pairs_schema_counts_and_format_only_difference(tmp_path, toy_world, scripted):
    ctx = _ctx(tmp_path, toy_world)
    distill_stage.run(_cfg(toy_world, max_chosen_per_prompt=2), ctx)
    summary = json.loads((ctx.stage_dir / "summary.json").read_text())
    c = summary["counts"]
    assert (c["prompts"], c["samples"], c["well_formatted"], c["correct"]) == (10, 40, 30, 30)
    assert (c["candidates"], c["chosen"], c["pairs"], c["prompts_with_pairs"]) == (20, 20, 20, 10)
    pairs = datasets.Dataset.from_parquet(str(ctx.stage_dir / "pairs.parquet"))
    train = datasets.Dataset.from_parquet(str(toy_world / "data" / "train.parquet"))
    for col in [*train.column_names, "prompt_id", "chosen", "rejected", "corruption", "source_model", "judge",
                "chosen_format", "chosen_accuracy", "rejected_format", "rejected_accuracy"]:
        assert col in pairs.column_names, col
    assert len(set(pairs["id"])) == 20 and set(pairs["prompt_id"]) == set(train["id"][:NUM_PROMPTS])
    assert sorted(summary["corruptions"].values()) == [4, 4, 4, 4, 4]  # taken in turn: balanced
    by_id = {r["id"]: r for r in train.select(range(NUM_PROMPTS))}
    for row in pairs:
        src = by_id[row["prompt_id"]]
        assert row["problem"] == src["problem"] and row["answer"] == src["answer"] and len(row["images"]) == 1
        assert format_ok(row["chosen"]) and not format_ok(row["rejected"])
        assert score(row["chosen"], row["answer"], row["choices"]).accuracy == 1.0
        reasoning, answer = split_response(row["chosen"])
        assert reasoning in row["rejected"] and answer in row["rejected"]  # same reasoning, same answer text
        assert row["rejected_format"] == 0.0 and row["source_model"] == "model" and row["judge"] == ""
    # The DPO stage reads the file as it is.
    from engine.stages.config import DPOStageConfig

    dpo_cfg = DPOStageConfig(name="cs", kind="dpo", init="model", data=DataConfig(train="x"))
    got = encode_pairs(dpo_cfg, Processor.from_pretrained(toy_world / "hf"), ctx.stage_dir / "pairs.parquet")
    assert len(got) == 20


def test_resume_after_crash_skips_written_parts(tmp_path, toy_world, scripted):
    full = _ctx(tmp_path / "a", toy_world)
    distill_stage.run(_cfg(toy_world), full)
    want = datasets.Dataset.from_parquet(str(full.stage_dir / "pairs.parquet")).to_list()

    ctx = _ctx(tmp_path / "b", toy_world)
    scripted.calls, scripted.fail_at_call = [], 6  # dies inside the second part (prompts 4..7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill_stage.run(_cfg(toy_world), ctx)
    assert sorted(p.name for p in (ctx.stage_dir / "parts").iterdir()) == [
        "part-00000.json", "part-00000.parquet", "settings.json"]  # no half-written file, no tmp left
    assert not (ctx.stage_dir / "pairs.parquet").exists()
    scripted.calls, scripted.fail_at_call = [], None
    distill_stage.run(_cfg(toy_world), ctx)
    first_part = set(datasets.Dataset.from_parquet(str(full.stage_dir / "parts" / "part-00000.parquet"))["prompt_id"])
    assert not first_part & set(scripted.calls) and len(scripted.calls) == NUM_PROMPTS - 4  # part 0 not redone
    assert datasets.Dataset.from_parquet(str(ctx.stage_dir / "pairs.parquet")).to_list() == want

    with pytest.raises(ValueError, match="other settings.*max_chosen_per_prompt"):
        distill_stage.run(_cfg(toy_world, max_chosen_per_prompt=2), ctx)
    assert datasets.Dataset.from_parquet(str(ctx.stage_dir / "pairs.parquet")).to_list() == want  # untouched


def test_coupled_variant_uses_a_wrong_sample(tmp_path, toy_world, scripted):
    """The coupled ablation's rejected differs from its chosen in correctness and format both (the paper's coupled
    pairs): a sampled wrong, badly formatted answer, or a sampled wrong answer with a format corruption."""
    ctx = _ctx(tmp_path, toy_world)
    distill_stage.run(_cfg(toy_world, rejected="incorrect"), ctx)
    pairs = datasets.Dataset.from_parquet(str(ctx.stage_dir / "pairs.parquet"))
    assert len(pairs) == NUM_PROMPTS
    assert all(k == "incorrect" or k.startswith("incorrect+") for k in pairs["corruption"]), set(pairs["corruption"])
    for row in pairs:
        assert row["rejected_accuracy"] == 0.0 and row["chosen_accuracy"] == 1.0
        assert row["rejected_format"] == 0.0 and row["chosen_format"] > 0
        r = score(row["rejected"], row["answer"], row["choices"])
        assert r.accuracy == 0.0 and r.format == 0.0


def test_judge_filters_and_caches(tmp_path, toy_world, scripted, monkeypatch):
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", "test-key-123")
    stub = StubGemini()
    try:
        train = datasets.Dataset.from_parquet(str(toy_world / "data" / "train.parquet"))
        ids = train["id"][:NUM_PROMPTS]
        stub.scripts[_tag(ids[0])] = [("text", "NO")]  # first candidate of prompt 0 judged inconsistent
        stub.scripts[_tag(ids[1])] = [("status", 400)]  # prompt 1: a non-retryable error -> unjudged
        judge = JudgeConfig(enabled=True, base_url=stub.url, max_retries=1, initial_backoff_s=0.01,
                            on_unjudged="drop")
        cfg = dataclasses.replace(_cfg(toy_world), judge=judge)
        ctx = _ctx(tmp_path, toy_world)
        distill_stage.run(cfg, ctx)
        c = json.loads((ctx.stage_dir / "summary.json").read_text())["counts"]
        # Prompt 0: its 1st candidate "no", so the 2nd (untagged, "yes") is asked; prompt 1: 1st unjudged and
        # dropped, the 2nd "yes"; the other 8 prompts: their 1st candidate "yes". m = 1: one pair per prompt.
        assert (c["judged_yes"], c["judged_no"], c["unjudged"], c["pairs"]) == (10, 1, 1, 10)
        pairs = datasets.Dataset.from_parquet(str(ctx.stage_dir / "pairs.parquet"))
        assert set(pairs["judge"]) == {"yes"}
        assert "[[" not in "".join(pairs.filter(lambda r: r["prompt_id"] in ids[:2])["chosen"])
        sent = stub.num_requests
        assert (ctx.stage_dir / "judge_cache.jsonl").exists()
        again = _ctx(tmp_path / "again", toy_world)
        (again.stage_dir / "judge_cache.jsonl").write_text((ctx.stage_dir / "judge_cache.jsonl").read_text())
        distill_stage.run(cfg, again)
        assert stub.num_requests == sent + 1  # only the unjudged item is asked again; the rest come from the cache
    finally:
        stub.close()


def test_recipe_validation():
    from engine.config import ConfigError, parse_config

    raw = {"run": {"name": "x"}, "stages": [
        {"name": "d", "kind": "distill", "data": {"train": "nowhere.parquet"},
         "distill": {"corruptions": ["no_tags", "shuffle"], "max_chosen_per_prompt": 0}}]}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    text = str(e.value)
    assert "set policy" in text and "'shuffle'" in text and "max_chosen_per_prompt must be >= 1" in text
    assert "nowhere.parquet" in text


def test_duplicate_ids_are_refused(tmp_path, toy_world, scripted):
    """Duplicate ids used to pair a chosen answer with another row (49 of 99 pairs mismatched), found one stage
    later; now the input is refused, naming the ids and rows."""
    train = datasets.Dataset.from_parquet(str(toy_world / "data" / "train.parquet"))
    ids = [str(x) for x in train["id"]]
    ids[3] = ids[1]
    data = tmp_path / "dup.parquet"
    train.remove_columns(["id"]).add_column("id", ids).to_parquet(str(data))
    cfg = _cfg(toy_world)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=str(data)))
    with pytest.raises(ValueError, match=rf"dup.parquet: 1 ids are not unique \('{ids[1]}' at rows \[1, 3\]\)"):
        distill_stage.run(cfg, _ctx(tmp_path, toy_world))
    assert scripted.calls == []  # refused before sampling


def test_model_dir_takes_a_hugging_face_id(tmp_path, toy_world, scripted, monkeypatch):
    """`model_dir = "org/name"` was refused as a path that does not exist; it now resolves through the Hugging Face
    cache as `[model].path` does, and is named with the download command when it is not cached and offline."""
    import shutil

    import huggingface_hub.constants as hub_constants

    from engine.config import ConfigError, parse_config

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no relative path named like the id
    raw = {"run": {"name": "x"}, "stages": [
        {"name": "d", "kind": "distill", "model_dir": "org/teacher",
         "data": {"train": str(toy_world / "data" / "train.parquet")}}]}
    with pytest.raises(ConfigError) as e:
        parse_config(json.loads(json.dumps(raw)))
    assert "stages.d.model_dir: 'org/teacher' is not a directory" in str(e.value)
    assert "`hf download org/teacher`" in str(e.value)

    repo = tmp_path / "hub" / "models--org--teacher"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(toy_world / "hf", snapshot)
    assert parse_config(json.loads(json.dumps(raw))).stages[0].model_dir == "org/teacher"

    seen = []
    monkeypatch.setattr(distill_stage, "make_backend",
                        lambda kind, model_dir, **kw: seen.append(model_dir) or ScriptedBackend(model_dir, **kw))
    cfg = dataclasses.replace(_cfg(toy_world), policy="", model_dir="org/teacher")
    ctx = _ctx(tmp_path, toy_world)
    distill_stage.run(cfg, ctx)
    assert seen == [snapshot]
    pairs = datasets.Dataset.from_parquet(str(ctx.stage_dir / "pairs.parquet"))
    assert len(pairs) > 0 and set(pairs["source_model"]) == {"org/teacher"}

"""The eval stage: scores and GF from scripted responses, the report and its plots, resume after a crash (a cut
last line included), rows that cannot be encoded, and recipe validation. Generation is scripted so that every
score is known; the real backend runs in test_tiny_recipe.py."""

import json
import math
from pathlib import Path

import datasets
import pytest
import torch

from engine.config import ConfigError, ModelConfig, RunConfig, parse_config
from engine.dist import DistInfo
from engine.predictions import read_predictions
from engine.rollout import Completion
from engine.stages import StageContext
from engine.stages import eval as eval_stage
from engine.stages.config import BenchmarkConfig, EvalStageConfig


class ScriptedBackend:
    """Greedy: "model" answers rows with an even index right; "second" answers every ID row and 3 of 4 OOD rows
    right. Sampled: "second" is right in samples 0-2 of every 4, "model" only in sample 0 of even rows."""

    answers: dict[str, str] = {}
    calls: list[str] = []
    closed: list[bool] = []  # one entry per backend closed (the stage closes each model's before the next)
    sampled: list[tuple] = []  # per sampled generate call: (first row id, n, temperature, top_p, seed)
    fail_after: int | None = None

    def __init__(self, model_dir, *, device, dtype, processor, **vllm_settings):
        self.strong = "second" in str(model_dir)

    def close(self):
        ScriptedBackend.closed.append(self.strong)

    def generate(self, prompts, n, sampling):
        greedy = sampling.temperature == 0
        assert n == 1 or not greedy
        if not greedy:
            self.sampled.append((prompts[0].row_id, n, sampling.temperature, sampling.top_p, sampling.seed))
        out = []
        for p in prompts:
            if self.fail_after is not None and len(self.calls) >= self.fail_after:
                raise RuntimeError("simulated crash")
            self.calls.append(p.row_id)
            index = int(p.row_id.rsplit("-", 1)[1])
            if greedy:
                rights = [(index % 4 != 3 if "ood" in p.row_id else True) if self.strong else index % 2 == 0]
            else:
                rights = [j % 4 != 3 if self.strong else (j == 0 and index % 2 == 0) for j in range(n)]
            gold = self.answers[p.row_id]
            wrong = "A" if gold != "A" else "B"
            out.append([Completion(0, [1], f"<think>Looking.</think><answer>{gold if right else wrong}</answer>", [0.0],
                                   "stop") for right in rights])
        return out


@pytest.fixture
def scripted(monkeypatch, toy_world):
    for split in ("test", "test_ood"):
        ds = datasets.Dataset.from_parquet(str(toy_world / "data" / f"{split}.parquet"))
        ScriptedBackend.answers.update(zip(ds["id"], ds["answer"], strict=True))
    ScriptedBackend.calls, ScriptedBackend.fail_after, ScriptedBackend.closed = [], None, []
    ScriptedBackend.sampled = []
    monkeypatch.setattr(eval_stage, "make_backend", lambda kind, model_dir, **kw: ScriptedBackend(model_dir, **kw))
    return ScriptedBackend


def _setup(tmp_path, toy_world):
    out = tmp_path / "out"
    (out / "second").mkdir(parents=True)
    (out / "second" / "hf").symlink_to(toy_world / "hf")
    # Row 0 of the ID split cannot be encoded (two placeholders, one image): it must score 0, with its error.
    ds = datasets.Dataset.from_parquet(str(toy_world / "data" / "test.parquet"))
    ds = ds.map(lambda r, i: {"problem": "<image><image>" + r["problem"] if i == 0 else r["problem"]},
                with_indices=True)
    ds.to_parquet(str(tmp_path / "id.parquet"))
    # A GRPO-like metrics file, for the training-curves plot.
    (out / "rl").mkdir()
    (out / "rl" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "rollout/reward": 0.1 * s, "rollout/format_acc": 0.2, "rollout/accuracy": 0.1,
                    "rollout/response_len": 30.0}) + "\n"
        for s in range(1, 6)))
    cfg = EvalStageConfig(name="eval", kind="eval", models=["model", "second"], chunk_prompts=4, benchmarks=[
        BenchmarkConfig(name="toy_id", kind="toy", path=str(tmp_path / "id.parquet"), group="id"),
        BenchmarkConfig(name="toy_ood", kind="toy", path=str(toy_world / "data" / "test_ood.parquet"), group="ood")])
    stage_dir = out / "eval"
    stage_dir.mkdir()
    ctx = StageContext(run=RunConfig(name="t"), model=ModelConfig(path=str(toy_world / "hf"), dtype="float32"),
                       dist=DistInfo(0, 1, 0, torch.device("cpu"), "gloo"), out_dir=out, stage_dir=stage_dir)
    return cfg, ctx


def test_scores_gf_and_report(tmp_path, toy_world, scripted):
    cfg, ctx = _setup(tmp_path, toy_world)
    eval_stage.run(cfg, ctx)
    assert scripted.closed == [False, True]  # each model's backend closed after its benchmarks
    scores = json.loads((ctx.stage_dir / "scores.json").read_text())
    m, s = scores["models"]["model"], scores["models"]["second"]
    assert m["benchmarks"]["toy_id"]["score"] == 100 * 7 / 16 and m["benchmarks"]["toy_id"]["errors"] == 1
    assert s["benchmarks"]["toy_id"]["score"] == 100 * 15 / 16
    assert m["benchmarks"]["toy_ood"]["score"] == 50.0 and s["benchmarks"]["toy_ood"]["score"] == 75.0
    assert (s["g_id"], s["g_ood"]) == (50.0, 25.0) and math.isclose(s["gf"], 5 * 50 * 25 / (4 * 50 + 25))
    assert (m["g_id"], m["g_ood"], m["gf"]) == (0.0, 0.0, 0.0)
    cats = m["benchmarks"]["toy_id"]["categories"]
    assert set(cats) == {"count_color", "major_color", "digit_sum"}
    preds = read_predictions(ctx.stage_dir / "predictions" / "model" / "toy_id.jsonl")
    first = preds["test-00000"]
    assert first["score"] == 0.0 and "placeholder" in first["error"] and first["finish_reason"] == "error"
    report = (ctx.stage_dir / "report.md").read_text()
    # Each score with its Wilson interval (15/16: [71.7, 98.9]); gains with the paired interval on the same rows
    # (ID: 8 of 16 rows flip to right, sd of the differences 0.516 -> +-25.3 points).
    # "mean": over all benchmarks (the paper's ablation-table average), beside the ID and OOD means.
    assert ("| second | 93.75 [71.7, 98.9] | 75.00 [50.5, 89.8] | 93.75 | 75.00 | 84.38 | +50.00 [+24.7, +75.3] | "
            "+25.00 [+3.1, +46.9] | 27.78 |") in report
    assert ("| model | 43.75 [23.1, 66.8] | 50.00 [28.0, 72.0] | 43.75 | 50.00 | 46.88 | (base) | (base) | 0.00 |"
            in report)
    assert s["avg"] == (93.75 + 75.0) / 2 and "Sampled decoding" not in report and "GF over training" not in report
    assert s["group_gain_ci"]["id"] == pytest.approx([50.0, 24.70, 75.30], abs=0.01)
    assert report.index("**What this run can show.**") < report.index("## Scores")  # the paragraph comes first
    assert "- **The final model beats the base** (second, greedy, test rows): ID +50.0 points [+24.7, +75.3]: " \
           "**holds**; OOD +25.0 points [+3.1, +46.9]: **holds**." in report
    assert "### toy_id" in report and "count_shape" in report
    assert m["benchmarks"]["toy_id"]["format"] == 100 * 15 / 16  # every scripted answer is formatted; row 0 errored
    assert "## Format (greedy)" in report
    assert "| model | toy_id | toy_ood |\n|---|---|---|\n| model | 93.75 | 100.00 |" in report
    for png in ("training_curves.png", "gf.png"):
        assert (ctx.stage_dir / png).read_bytes().startswith(b"\x89PNG")


def test_resume_after_crash(tmp_path, toy_world, scripted):
    cfg, ctx = _setup(tmp_path, toy_world)
    scripted.fail_after = 6  # dies in the second chunk of "model" on toy_id
    with pytest.raises(RuntimeError, match="simulated crash"):
        eval_stage.run(cfg, ctx)
    path = ctx.stage_dir / "predictions" / "model" / "toy_id.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 4  # the first chunk, complete
    with path.open("a") as f:
        f.write('{"id": "test-00004", "score": 1.0, "resp')  # a line cut short by the crash
    scripted.calls, scripted.fail_after = [], None
    eval_stage.run(cfg, ctx)
    assert "test-00000" not in scripted.calls and "test-00004" in scripted.calls  # resumed after the last line
    assert len(scripted.calls) == 2 * 32 - 4 - 1  # everything else once (row 0 of model never reached generate)
    scores = json.loads((ctx.stage_dir / "scores.json").read_text())
    assert scores["models"]["second"]["benchmarks"]["toy_id"]["score"] == 100 * 15 / 16


def test_sampled_decoding_pass_at_k_and_claims(tmp_path, toy_world, scripted):
    """samples = 4: each prompt sampled 4 times (temperature, top_p and a seed passed to the backend), the samples
    kept in the predictions, the sampled accuracy and pass@k per benchmark and model beside the greedy score, and the
    claims on test rows made with the sampled accuracy."""
    cfg, ctx = _setup(tmp_path, toy_world)
    cfg.samples, cfg.temperature, cfg.top_p = 4, 0.7, 0.9
    eval_stage.run(cfg, ctx)
    assert {c[1:4] for c in scripted.sampled} == {(4, 0.7, 0.9)}
    scores = json.loads((ctx.stage_dir / "scores.json").read_text())
    assert scores["sampling"] == {"samples": 4, "temperature": 0.7, "top_p": 0.9, "pass_k": [1, 2, 4]}
    m, s = scores["models"]["model"], scores["models"]["second"]
    # "model": 7 even ID rows reach generate (row 0 cannot be encoded), each 1 of 4 samples right: pass@1 0.25,
    # pass@2 1 - C(3,2)/C(4,2) = 0.5, pass@4 1. "second": 3 of 4 right on the 15 rows: pass@1 0.75, pass@2 and 4: 1.
    assert m["benchmarks"]["toy_id"]["sampled"]["pass_at_k"] == pytest.approx(
        {"1": 100 * 7 * 0.25 / 16, "2": 100 * 7 * 0.5 / 16, "4": 100 * 7 / 16})
    assert s["benchmarks"]["toy_id"]["sampled"]["pass_at_k"] == pytest.approx(
        {"1": 100 * 15 * 0.75 / 16, "2": 100 * 15 / 16, "4": 100 * 15 / 16})
    assert s["benchmarks"]["toy_id"]["sampled"]["score"] == pytest.approx(100 * 15 * 0.75 / 16)
    assert s["benchmarks"]["toy_id"]["score"] == 100 * 15 / 16  # the greedy score is unchanged, beside it
    assert m["benchmarks"]["toy_ood"]["sampled"]["score"] == pytest.approx(100 * 8 * 0.25 / 16)
    assert s["sampled"]["g_id"] == pytest.approx(100 * (15 * 0.75 - 7 * 0.25) / 16)
    assert s["sampled"]["g_ood"] == pytest.approx(100 * (0.75 - 2 / 16))
    line = read_predictions(eval_stage.sampled_path(ctx.stage_dir, "second", "toy_id"))["test-00001"]
    assert line["n"] == 4 and line["scores"] == [1.0, 1.0, 1.0, 0.0] and len(line["responses"]) == 4
    errored = read_predictions(eval_stage.sampled_path(ctx.stage_dir, "model", "toy_id"))["test-00000"]
    assert errored["scores"] == [0.0] * 4 and "placeholder" in errored["error"]
    report = (ctx.stage_dir / "report.md").read_text()
    assert "## Sampled decoding (4 samples a prompt)" in report and "### pass@k" in report
    assert "| second | toy_id | 70.31 | 93.75 | 93.75 |" in report
    g = s["sampled"]["group_gain_ci"]["id"]
    assert (f"- **The final model beats the base** (second, sampled accuracy, 4 samples at temperature 0.7, test "
            f"rows): ID {g[0]:+.1f} points [{g[1]:+.1f}, {g[2]:+.1f}]: **holds**") in report


def test_sampled_decoding_resumes(tmp_path, toy_world, scripted):
    """A crash in the sampled pass keeps its complete chunks; the rerun continues after them with the same seeds,
    and sampled lines written with another number of samples are predicted again."""
    cfg, ctx = _setup(tmp_path, toy_world)
    cfg.samples = 4
    scripted.fail_after = 15 + 6  # "model": 15 greedy ID rows, then the sampled pass dies in its second chunk
    with pytest.raises(RuntimeError, match="simulated crash"):
        eval_stage.run(cfg, ctx)
    path = eval_stage.sampled_path(ctx.stage_dir, "model", "toy_id")
    assert len(path.read_text().splitlines()) == 4
    seeds = dict((c[0], c[4]) for c in scripted.sampled)
    scripted.calls, scripted.sampled, scripted.fail_after = [], [], None
    eval_stage.run(cfg, ctx)
    assert scripted.calls[:4] == ["test-00004", "test-00005", "test-00006", "test-00007"]  # greedy ID done earlier
    assert dict((c[0], c[4]) for c in scripted.sampled)["test-00004"] == seeds["test-00004"]
    assert len(read_predictions(path)) == 16
    cfg.samples = 2
    scripted.calls = []
    eval_stage.run(cfg, ctx)
    assert len(scripted.calls) == 2 * 31  # only the sampled pass again, every row that reaches generate
    scores = json.loads((ctx.stage_dir / "scores.json").read_text())
    assert scores["models"]["second"]["benchmarks"]["toy_id"]["sampled"]["n"] == 2


def test_gf_over_training_steps(tmp_path, toy_world, scripted):
    """Several `<stage>@<step>` checkpoints of a run give the report a GF-over-steps table and gf_curves.png."""
    cfg, ctx = _setup(tmp_path, toy_world)
    for step in (5, 10):  # checkpoints already converted: the stage uses the HF directories it finds
        (ctx.out_dir / "second" / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (ctx.stage_dir / "checkpoints_hf").mkdir(exist_ok=True)
        (ctx.stage_dir / "checkpoints_hf" / f"second@{step}").symlink_to(toy_world / "hf")
    cfg.models = ["model", "second@*"]
    eval_stage.run(cfg, ctx)
    report = (ctx.stage_dir / "report.md").read_text()
    assert "## GF over training steps" in report
    assert "| second | 5 | 27.78 |\n| second | 10 | 27.78 |" in report
    assert (ctx.stage_dir / "gf_curves.png").read_bytes().startswith(b"\x89PNG")
    assert "![gf_curves](gf_curves.png)" in report


def test_recipe_validation(toy_world):
    def recipe(kind):
        return {"run": {"name": "x"}, "model": {"path": str(toy_world / "hf")}, "stages": [
            {"name": "e", "kind": "eval", "models": ["model", "nope"], "base": "other",
             "benchmarks": [{"name": "a", "kind": "mathvista", "path": "/nowhere", "group": "id"},
                            {"name": "a", "kind": kind, "path": str(toy_world)}]}]}

    with pytest.raises(ConfigError) as e:
        parse_config(recipe("toy"))
    text = str(e.value)
    for want in ["'nope': not the base model or an earlier stage", "base = 'other' is not one of models",
                 "distinct names", "/nowhere", "both groups 'id' and 'ood'"]:
        assert want in text, want
    with pytest.raises(ConfigError, match="'mathvistaa' not in .*did you mean 'mathvista'"):
        parse_config(recipe("mathvistaa"))
    bad = recipe("toy")
    bad["stages"][0].update(samples=4, temperature=0.0, top_p=1.5, pass_k=[1, 8])
    with pytest.raises(ConfigError) as e:
        parse_config(bad)
    for want in ["temperature must be > 0 to sample", "top_p must be in (0, 1]", "pass_k [8]: each k must be in [1, "
                 "samples = 4]"]:
        assert want in str(e.value), want
    assert EvalStageConfig(name="e", kind="eval", models=["m"], benchmarks=[], samples=64).pass_ks() == \
        [1, 2, 4, 8, 16, 32, 64]
    assert EvalStageConfig(name="e", kind="eval", models=["m"], benchmarks=[], samples=6).pass_ks() == [1, 2, 4, 6]


def test_missing_benchmark_images_stop_the_stage(tmp_path, toy_world):
    cfg, ctx = _setup(tmp_path, toy_world)
    fixture = Path(__file__).parent / "fixtures" / "benchmarks" / "mathvista"
    cfg.benchmarks.append(BenchmarkConfig(name="MathVista", kind="mathvista", path=str(fixture), group="id"))
    with pytest.raises(ValueError, match=r"benchmark MathVista: \d+ image files are missing"):
        eval_stage.load_benchmarks(cfg, ctx)


def test_macro_over_categories_and_left_out_rows(tmp_path, toy_world):
    """MEGA-Bench-style scoring: the mean of per-task means, and rows the rules cannot score counted as left out."""
    import types

    from engine.benchmarks import BenchRow
    from engine.report import summarise

    cfg, ctx = _setup(tmp_path, toy_world)
    module = types.SimpleNamespace(JUDGE_NOTE="", MACRO_OVER_CATEGORIES=True)
    rows = [BenchRow(id=f"r{i}", problem="p", images=[], answer="a", category="big" if i < 3 else "small")
            for i in range(4)]
    bench = BenchmarkConfig(name="mb", kind="megabench", path="x", group="none")
    cfg.benchmarks, cfg.models = [bench], ["model"]
    scores = {"r0": 1.0, "r1": 1.0, "r2": 1.0, "r3": 0.0}  # task means 1.0 and 0.0: macro 50, micro 75
    path = ctx.stage_dir / "predictions" / "model" / "mb.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"id": r.id, "category": r.category, "score": scores[r.id], "error": "",
                                        "finish_reason": "stop"}) + "\n" for r in rows))
    scores = summarise(cfg, ctx, [(bench, module, rows, 7)])
    out = scores["models"]["model"]["benchmarks"]["mb"]
    assert out["score"] == 50.0 and out["left_out_unscorable"] == 7 and out["macro_over_categories"]
    from engine.report import write_report

    report = write_report(cfg, ctx, scores).read_text()
    assert "7 rows are left out" in report and "need `run_code = true`" in report  # run_code is off by default
    from engine.benchmarks.megabench_constrained import available

    assert ("nltk.downloader punkt_tab wordnet" in report) == (not available())


def test_judge_rechecks_rule_wrong_answers(tmp_path, toy_world, scripted, monkeypatch):
    """Where a benchmark's official pipeline asks an LLM, the judge (stub Gemini server) re-checks the answers the
    rules scored wrong; a "yes" scores the row right, and the report says which benchmark was judged."""
    from engine.benchmarks import toy as toy_bench
    from engine.judge import JudgeConfig

    from .test_judge import StubGemini

    monkeypatch.setattr(toy_bench, "JUDGE_NOTE", "an LLM extracts the answer")
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", "test-key-123")
    stub = StubGemini()  # answers YES to everything
    try:
        cfg, ctx = _setup(tmp_path, toy_world)
        cfg.judge = JudgeConfig(enabled=True, base_url=stub.url, max_retries=0)
        eval_stage.run(cfg, ctx)
    finally:
        stub.close()
    scores = json.loads((ctx.stage_dir / "scores.json").read_text())
    m = scores["models"]["model"]["benchmarks"]
    # model: 8 wrong ID rows of 16 (one of them unencodable: never asked), 8 wrong OOD rows; all flipped by the judge
    assert (m["toy_id"]["judged"], m["toy_id"]["judged_yes"]) == (8, 8) and m["toy_id"]["score"] == 100 * 15 / 16
    assert m["toy_ood"]["score"] == 100.0
    s = scores["models"]["second"]["benchmarks"]["toy_ood"]
    assert (s["judged"], s["judged_yes"], s["score"]) == (4, 4, 100.0)
    # Each distinct (question, gold, response) is sent once: "second"'s wrong answers repeat "model"'s (cached).
    assert stub.num_requests <= 16
    assert (ctx.stage_dir / "judge_cache.jsonl").exists()
    assert "rules first, then the judge (gemini-2.5-flash)" in (ctx.stage_dir / "report.md").read_text()


def test_training_checkpoints_as_models(tmp_path, toy_world, scripted):
    """"<stage>@<step>" and "<stage>@*" evaluate training checkpoints: converted once to HF directories with the
    checkpoint's weights, and reported (with GF) like stage outputs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from engine.model import Policy, load_hf_model

    cfg, ctx = _setup(tmp_path, toy_world)
    policy = Policy(load_hf_model(toy_world / "hf"))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = ctx.out_dir / "second" / "checkpoints" / "step-000005"
    dcp.save({"model": get_model_state_dict(policy)}, checkpoint_id=str(ckpt), no_dist=True)

    cfg.models = ["model", "second@*"]
    assert eval_stage.resolve_models(cfg, ctx) == ["model", "second@5"]
    cfg.models = ["model", "second@7"]
    with pytest.raises(ValueError, match=r"no checkpoint of step 7 .* \(there are \[5\]\); raise checkpoint.keep"):
        eval_stage.resolve_models(cfg, ctx)

    cfg.models = ["model", "second@*"]
    eval_stage.run(cfg, ctx)
    converted = load_hf_model(ctx.stage_dir / "checkpoints_hf" / "second@5")
    for (name, a), b in zip(converted.named_parameters(), policy.hf.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    scores = json.loads((ctx.stage_dir / "scores.json").read_text())
    assert list(scores["models"]) == ["model", "second@5"] and scores["models"]["second@5"]["gf"] > 0


def test_megabench_run_code_option(tmp_path, toy_world):
    """The benchmark's run_code decides whether MEGA-Bench's program_judge rows are evaluated or left out."""
    from engine.stages.eval import load_benchmarks

    from .test_bench_megabench import _hf_dir

    cfg, ctx = _setup(tmp_path, toy_world)
    root = _hf_dir(tmp_path)
    seen = {}
    for run_code in (False, True):
        cfg.benchmarks = [BenchmarkConfig(name="mb", kind="megabench", path=str(root), max_images=0,
                                          run_code=run_code)]
        ((_, _, rows, left),) = load_benchmarks(cfg, ctx)
        seen[run_code] = ("code_programming_test_easy/0" in {r.id for r in rows}, left)
    assert not seen[False][0] and seen[True][0] and seen[False][1] == seen[True][1] + 1

"""A GRPO stage on the toy world whose open-ended rows are graded by a stub OpenAI-compatible judge (2 gloo ranks)."""

import json
import re

import datasets
import pytest

from ._launch import TRAIN, child_env, launch, python
from .judge_stubs import StubOpenAI

RECIPE = """
[run]
name = "grpo_judge"
seed = 0
[model]
path = "{world}/hf"
dtype = "float32"
[[stages]]
name = "grpo"
kind = "grpo"
init = "model"
[stages.data]
train = "{data}"
[stages.rollout]
n = 4
max_new_tokens = 12
[stages.optim]
lr = 1e-4
[stages.train]
steps = 2
batch_size = 8
micro_batch_tokens = 2048
[stages.judge]
enabled = true
backend = "openai"
base_url = "{url}"
model = "stub-judge"
api_key_env = "JUDGE_API_KEY"
max_retries = 1
initial_backoff_s = 0.01
"""


def _open_ended_rows(world, out):
    """The toy train rows with free-text golds ("the answer is 3", answer_type "open") for the counting and digit
    tasks, the colour task kept as multiple choice; data_source is the task."""
    rows = datasets.Dataset.from_parquet(str(world / "data" / "train.parquet"))
    rows = rows.map(lambda r: {"answer": r["answer"] if r["task"] == "major_color" else f"the answer is {r['answer']}",
                               "answer_type": "" if r["task"] == "major_color" else "open",
                               "data_source": r["task"]})
    rows.to_parquet(str(out))
    return rows


def _question(prompt: str) -> str:
    return re.search(r"Question:\n(.*?)\n\nReference answer:", prompt, re.DOTALL).group(1)


@pytest.mark.subprocess
def test_grpo_with_a_stub_judge(toy_world, tmp_path):
    """Every open-ended completion the rules miss is judged (the stub says YES to digit-sum rows and fails with 500
    on colour-counting rows); the metrics count the calls, the failures and the judged share; multiple-choice rows
    never reach the judge; the run finishes despite the failing calls; the key reaches neither logs nor outputs."""
    data = tmp_path / "train.parquet"
    rows = _open_ended_rows(toy_world, data)
    stub = StubOpenAI()
    stub.decide = lambda p: ("status", 500) if " shapes" in _question(p) else ("text", "YES")
    try:
        recipe = tmp_path / "r.toml"
        recipe.write_text(RECIPE.format(world=toy_world, data=data, url=stub.url))
        cmd = python(TRAIN, recipe, f"--run.out_dir={tmp_path / 'out'}", nproc=2)
        result = launch(cmd, env=child_env(JUDGE_API_KEY="sk-stub-SECRET-123"))
    finally:
        stub.close()
    assert "sk-stub-SECRET-123" not in result.stdout + result.stderr
    lines = (tmp_path / "out" / "grpo" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert len(metrics) == 2
    for m in metrics:
        assert m["rollout/judge_calls"] > 0 and m["rollout/judged_frac"] > 0 and m["time/judge_s"] >= 0
        # digit-sum rows: every completion is judged right (a random model never writes "the answer is N")
        assert m["rollout/source/digit_sum/accuracy"] == 1.0
        assert m["rollout/source/major_color/accuracy"] < 1.0
        if "rollout/source/count_color/accuracy" in m:  # the stub fails on counting rows: the rules decide
            assert m["rollout/judge_failures"] > 0 and m["rollout/source/count_color/accuracy"] == 0.0
    assert stub.prompts and not any("color" in _question(p) for p in stub.prompts)  # no multiple-choice row sent
    assert stub.auth_seen == {"Bearer sk-stub-SECRET-123"}
    assert (tmp_path / "out" / "grpo" / "judge_cache.jsonl").is_file()
    assert "sk-stub-SECRET-123" not in (tmp_path / "out" / "grpo" / "judge_cache.jsonl").read_text()
    assert set(rows["data_source"]) == {"count_color", "major_color", "digit_sum"}


@pytest.mark.subprocess
def test_grpo_with_the_local_stand_in_judge(toy_world, tmp_path):
    """base_url = "local": rank 0 starts engine/judge_local.py's rule-based stand-in on 127.0.0.1 and the real
    OpenAI client grades the open-ended rows over HTTP, with no key and no network; the logs name it a stand-in."""
    data = tmp_path / "train.parquet"
    _open_ended_rows(toy_world, data)
    recipe = tmp_path / "r.toml"
    text = RECIPE.format(world=toy_world, data=data, url="local").replace('model = "stub-judge"',
                                                                          'model = "local-rule-judge"')
    recipe.write_text(text.replace('api_key_env = "JUDGE_API_KEY"', 'api_key_env = ""'))
    result = launch(python(TRAIN, recipe, f"--run.out_dir={tmp_path / 'out'}", nproc=2), env=child_env())
    assert "LOCAL STAND-IN for GPT-4o" in result.stdout + result.stderr
    metrics = [json.loads(line) for line in (tmp_path / "out" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for m in metrics:
        assert m["rollout/judge_calls"] > 0 and m["rollout/judge_failures"] == 0 and m["rollout/judged_frac"] > 0
    cache = (tmp_path / "out" / "grpo" / "judge_cache.jsonl").read_text().splitlines()
    assert cache and {json.loads(line)["verdict"] for line in cache} <= {"yes", "no"}

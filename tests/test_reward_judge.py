"""Judged rewards: the OpenAI-compatible judge against a loopback stub server (429, 500, timeouts, garbage,
redirects), the backend choice and start-up checks, and the grading of open-ended answers in a GRPO batch."""

import json
import logging
import time

import pytest

from engine.data import Sample
from engine.judge import Judge
from engine.judge_openai import MAX_RESPONSE_BYTES, OpenAIJudge
from engine.log import logger
from engine.reward_judge import JudgeSettings, RewardJudge, RowInfo, check_ready, grade_scored, make_yes_no_judge
from engine.rewards import RewardConfig, answer_type, num_unknown_answer_type
from engine.rollout import Completion
from engine.stages.experience import judge_stats, score_groups, source_stats

from .judge_stubs import StubOpenAI

SECRET = "sk-TEST-SECRET-KEY-0123456789abcdef"


@pytest.fixture
def stub():
    s = StubOpenAI()
    yield s
    s.close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def _cfg(stub, tmp_path=None, **kw) -> JudgeSettings:
    cfg = dict(enabled=True, backend="openai", base_url=stub.url, model="gpt-4o", max_retries=3,
               initial_backoff_s=0.01, max_backoff_s=0.05, timeout_s=2.0, max_concurrency=4,
               cache_path=str(tmp_path / "cache.jsonl") if tmp_path else "")
    cfg.update(kw)
    return JudgeSettings(**cfg)


def _judge(stub, tmp_path=None, **kw) -> OpenAIJudge:
    judge = make_yes_no_judge(_cfg(stub, tmp_path, **kw))
    assert isinstance(judge, OpenAIJudge)
    return judge


def test_yes_no_request_shape(stub, key_env):
    replies = {"a": "YES", "b": "**NO**", "c": "Yes, it matches.", "d": "Checking.\nVerdict: no"}
    for name, reply in replies.items():
        stub.scripts[name] = [("text", reply)]
    judge = _judge(stub)
    got = judge.ask_many([f"q [[{name}]]" for name in replies])
    assert [v.verdict for v in got] == ["yes", "no", "yes", "no"]
    assert stub.paths == {"/v1/chat/completions"} and stub.auth_seen == {f"Bearer {SECRET}"}
    body = stub.bodies[0]
    assert body["model"] == "gpt-4o" and body["temperature"] == 0.0 and body["max_tokens"] == 64
    assert judge.stats.num_requests == 4 and judge.stats.num_retries == 0


def test_retries_429_5xx_and_no_retry_on_4xx_or_redirect(stub, key_env):
    stub.scripts["rate"] = [("status", 429), ("status", 429), ("text", "NO")]
    stub.scripts["srv"] = [("status", 500), ("status", 503), ("text", "yes")]
    stub.scripts["dead"] = [("status", 502)]
    stub.scripts["auth"] = [("status", 401)]
    stub.scripts["moved"] = [("redirect", "http://127.0.0.1:9/elsewhere")]
    judge = _judge(stub, max_retries=2)
    got = judge.ask_many(["[[rate]]", "[[srv]]", "[[dead]]", "[[auth]]", "[[moved]]"])
    assert [(v.verdict, v.attempts) for v in got] == [("no", 3), ("yes", 3), ("unjudged", 3), ("unjudged", 1),
                                                       ("unjudged", 1)]
    assert "401" in got[3].error and "307" in got[4].error
    assert stub.calls == {"rate": 3, "srv": 3, "dead": 3, "auth": 1, "moved": 1}  # the redirect was not followed


def test_timeout_is_a_deadline_and_retried(stub, key_env):
    stub.scripts["slow"] = [("sleep", 1.5, "YES"), ("text", "YES")]
    t0 = time.perf_counter()
    (v,) = _judge(stub, timeout_s=0.3).ask_many(["[[slow]]"])
    assert (v.verdict, v.attempts) == ("yes", 2) and time.perf_counter() - t0 < 1.4
    stub.scripts["slow2"] = [("sleep", 1.0, "YES")]
    (v,) = _judge(stub, timeout_s=0.2, max_retries=1).ask_many(["[[slow2]]"])
    assert (v.verdict, v.attempts) == ("unjudged", 2) and "Timeout" in v.error


def test_garbage_bodies(stub, key_env):
    deep = ("[" * 100_000 + "]" * 100_000).encode()  # deeper than the JSON parser's stack
    huge = json.dumps({"choices": [{"message": {"content": "YES " + "x" * MAX_RESPONSE_BYTES}}]}).encode()
    stub.scripts["badjson"] = [("raw", b"{not json"), ("text", "yes")]
    stub.scripts["nochoice"] = [("raw", b'{"choices": []}'), ("text", "no")]
    stub.scripts["deep"] = [("raw", deep)]
    stub.scripts["huge"] = [("raw", huge)]
    stub.scripts["babble"] = [("text", "It depends on the reading.")]
    stub.scripts["nulltext"] = [("raw", b'{"choices": [{"message": {"content": null}}]}')]
    got = _judge(stub).ask_many(["[[badjson]]", "[[nochoice]]", "[[deep]]", "[[huge]]", "[[babble]]", "[[nulltext]]"])
    assert [(v.verdict, v.attempts) for v in got] == [("yes", 2), ("no", 2), ("unjudged", 2), ("unjudged", 2),
                                                       ("unjudged", 2), ("unjudged", 2)]
    assert "malformed" in got[2].error and "bytes" in got[3].error and "unparseable" in got[4].error


def test_budget_cache_and_concurrency(stub, key_env, tmp_path):
    judge = _judge(stub, tmp_path, request_budget=5, max_concurrency=1)
    got = judge.ask_many([f"[[q{i}]]" for i in range(8)])
    assert [v.verdict for v in got] == ["yes"] * 5 + ["unjudged"] * 3 and stub.num_requests == 5
    again = _judge(stub, tmp_path, max_concurrency=3).ask_many([f"[[q{i}]]" for i in range(8)])
    assert sum(v.cached for v in again) == 5 and stub.num_requests == 8  # only the unjudged are asked again
    assert stub.max_in_flight <= 3


def test_no_key_for_a_local_server(stub, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    (v,) = _judge(stub, api_key_env="").ask_many(["[[x]]"])
    assert v.verdict == "yes" and stub.auth_seen == {""}


def test_misconfiguration_fails_at_start_naming_the_cause(stub, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY is not set"):
        check_ready(_cfg(stub))
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with pytest.raises(ValueError, match="'ftp://host/v1' is not an http"):
        check_ready(_cfg(stub, base_url="ftp://host/v1"))
    with pytest.raises(ValueError, match="needs judge.base_url"):
        check_ready(_cfg(stub, base_url=""))
    with pytest.raises(ValueError, match="'MY_KEY' is not declared in engine/env.py"):
        check_ready(_cfg(stub, api_key_env="MY_KEY"))
    with pytest.raises(RuntimeError, match="GOOGLE_API_KEY nor GEMINI_API_KEY"):
        check_ready(_cfg(stub, backend="gemini", base_url=""))
    assert make_yes_no_judge(_cfg(stub, enabled=False)) is None
    monkeypatch.setenv("GEMINI_API_KEY", "AIza-x")
    assert isinstance(make_yes_no_judge(_cfg(stub, backend="gemini", base_url="")), Judge)


def test_key_never_leaks(stub, key_env, tmp_path, caplog):
    stub.scripts["leaky"] = [("status", 400, {"error": {"message": f"bad key {SECRET}"}})]
    stub.scripts["e500"] = [("status", 500, {"error": {"message": f"upstream saw {SECRET}"}})]
    caplog.set_level(logging.DEBUG)
    logger.addHandler(caplog.handler)  # the engine logger may not propagate to root
    try:
        judge = _judge(stub, tmp_path, max_retries=1)
        got = judge.ask_many(["[[leaky]]", "[[e500]]", "[[fine]]"])
    finally:
        logger.removeHandler(caplog.handler)
    assert stub.auth_seen == {f"Bearer {SECRET}"}  # it was really sent
    assert caplog.text and SECRET not in caplog.text
    assert SECRET not in (tmp_path / "cache.jsonl").read_text()
    assert all(SECRET not in str(v) for v in got) and "<redacted>" in got[0].error
    assert SECRET not in repr(judge.cfg) and SECRET not in repr(judge.__dict__.get("cfg"))


@pytest.mark.parametrize("gold, choices, declared, want", [
    ("B", None, "", "choice"), ("dog", ["cat", "dog"], "", "choice"), ("3.5 cm", None, "", "number"),
    ("\\frac{1}{2}", None, "", "math"), ("a red circle", None, "", "open"), ("42", None, "open", "open"),
    ("Paris", None, "number", "number"),
])
def test_answer_type(gold, choices, declared, want):
    assert answer_type(gold, choices, declared) == want


def test_unknown_answer_type_is_counted_and_ruled():
    before = num_unknown_answer_type()
    assert answer_type("a dog at (1, 2)", None, "points") == "unknown"  # never judged
    assert answer_type("[1, 2, 3, 4]", None, "boxes") == "boxes"  # scored by IoU (engine/reward_boxes.py)
    assert num_unknown_answer_type() == before + 1


def _sample(row_id, answer, choices=None):
    return Sample([1], None, [0], None, None, 1, row_id, answer=answer, choices=choices)


def _completion(text):
    return Completion(prompt_index=0, token_ids=[1], text=text, logprobs=[0.0], finish_reason="stop")


def test_grpo_scoring_judges_only_open_ended_rule_misses(stub, key_env, tmp_path):
    """Open-ended golds the rules miss go to the judge once per distinct (question, gold, answer); rule hits and
    choice/number rows never do; a failed call keeps the rule verdict and is counted."""
    stub.decide = lambda p: ("text", "YES") if "crimson" in p else ("status", 500) if "outage" in p else \
        ("text", "NO")
    prompts = [_sample("r0", "a red circle"), _sample("r1", "3"), _sample("r2", "the tall tree")]
    infos = {"r0": RowInfo("What is drawn?", "", "shapes"), "r1": RowInfo("How many?", "", "count"),
             "r2": RowInfo("What is it? outage", "open", "shapes")}
    groups = [[_completion(t) for t in ("<think>x</think><answer>a crimson circle</answer>",
                                        "<think>x</think><answer>a red circle</answer>",
                                        "<think>x</think><answer>a blue square</answer>",
                                        "<think>x</think><answer>a crimson circle</answer>")],
              [_completion(t) for t in ("<answer>3</answer>", "<answer>4</answer>", "4", "three")],
              [_completion(t) for t in ("<answer>a tree</answer>",) * 4]]
    judge = RewardJudge(_cfg(stub, tmp_path, max_retries=1))
    rewards, tally = score_groups(groups, prompts, RewardConfig(), infos, judge)
    acc = [[r.accuracy for r in grp] for grp in rewards]
    assert acc == [[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0] * 4]
    assert [r.method for r in rewards[0]] == ["judge", "string", "judge", "judge"]
    assert all(r.total == r.format + r.accuracy for grp in rewards for r in grp)
    # distinct prompts: crimson, blue, tree (the duplicates are sent once); the tree fails twice (500, 1 retry)
    assert sorted(stub.calls.values()) == [4] and tally.num_requests == 4
    assert (tally.num_asked, tally.num_judged, tally.num_failures) == (7, 3, 4)
    stats = judge_stats(tally, num_completions=12, world=1)
    assert stats["rollout/judge_calls"] == 4 and stats["rollout/judge_failures"] == 4
    assert abs(float(stats["rollout/judged_frac"]) - 3 / 12) < 1e-6
    per_source = source_stats(rewards, [infos["r0"], infos["r1"], infos["r2"]], list(infos.values()), 4)
    assert abs(float(per_source["rollout/source/shapes/accuracy"]) - 3 / 8) < 1e-6
    assert abs(float(per_source["rollout/source/count/accuracy"]) - 1 / 4) < 1e-6
    # a second batch: the verdicts come from the disk cache, nothing is sent
    n0 = stub.num_requests
    judge2 = RewardJudge(_cfg(stub, tmp_path))
    _, tally2 = score_groups(groups[:1], prompts[:1], RewardConfig(), infos, judge2)
    assert stub.num_requests == n0 and tally2.num_judged == 3 and tally2.num_requests == 0


def test_judge_outage_never_raises(stub, key_env):
    stub.close()  # nothing listens any more: connection refused on every request
    judge = RewardJudge(_cfg(stub, max_retries=1))
    rewards, tally = score_groups([[_completion("<answer>a tree</answer>")]], [_sample("r", "the tall tree")],
                                  RewardConfig(), {"r": RowInfo("q")}, judge)
    assert rewards[0][0].accuracy == 0.0 and tally.num_failures == 1


def test_a_broken_client_leaves_items_unjudged(stub, key_env):
    """Anything raised on the judging rank after the gather (here the client's stats) becomes "unjudged", so the
    other ranks are never left waiting in the broadcast that follows."""
    class Broken:
        @property
        def stats(self):
            raise AttributeError("no stats")

    judge = RewardJudge(_cfg(stub), client=Broken())
    rewards, tally = score_groups([[_completion("<answer>a tree</answer>")]], [_sample("r", "the tall tree")],
                                  RewardConfig(), {"r": RowInfo("q", "open")}, judge)
    assert rewards[0][0].accuracy == 0.0 and (tally.num_asked, tally.num_failures) == (1, 1)


def test_grade_scored_for_distill(stub, key_env):
    stub.decide = lambda p: ("text", "YES") if "a crimson circle" in p else ("text", "NO")
    base = {"format": 0.5, "accuracy": 0.0, "gold_unparseable": False}
    groups = [[{"text": "t", "extracted": "a crimson circle", **base}, {"text": "u", "extracted": "a square", **base}]]
    rows = [{"problem": "What?", "answer": "a red circle", "choices": None}]
    tally = grade_scored(RewardJudge(_cfg(stub)), groups, rows)
    assert [s["accuracy"] for s in groups[0]] == [1.0, 0.0] and tally.num_judged == 2


def test_row_source_is_data_source_else_task():
    import datasets

    from engine.reward_judge import row_infos

    both = datasets.Dataset.from_dict({"id": ["a"], "problem": ["q"], "task": ["count"], "data_source": ["src"]})
    task_only = datasets.Dataset.from_dict({"id": ["a"], "problem": ["q"], "task": ["count"]})
    neither = datasets.Dataset.from_dict({"id": ["a"], "problem": ["q"]})
    assert [row_infos(d)["a"].data_source for d in (both, task_only, neither)] == ["src", "count", ""]

"""engine/judge_local.py: the rule-based stand-in for GPT-4o, its rule on the engine's three judge prompts, and the
real client path (engine/judge_openai.py over HTTP) against it."""

import json
import urllib.error
import urllib.request

import pytest

from engine.judge import MATCH_PROMPT, SUPPORT_PROMPT
from engine.judge_local import content_tokens, final_answer, same_answer, start_local_judge, stop_local_judge, verdict
from engine.judge_settings import JudgeSettings
from engine.reward_judge import OPEN_ANSWER_PROMPT, RewardJudge, check_ready, make_yes_no_judge
from engine.rewards import Reward, RewardConfig

LOCAL = dict(enabled=True, backend="openai", base_url="local", model="local-rule-judge", api_key_env="OPENAI_API_KEY")


@pytest.fixture(autouse=True)
def _fresh_server():
    stop_local_judge()
    yield
    stop_local_judge()


@pytest.mark.parametrize("answer,gold,yes", [
    ("3", "the answer is 3", True), ("three", "3", True), ("The answer is 3.0.", "3", True), ("1,000", "1000", True),
    ("a red circle", "Red circle", True), ("circle, red!", "red circle", True), ("-2", "minus two", False),
    ("3 apples", "3", False), ("4", "the answer is 3", False), ("", "", False), ("the answer", "the", False),
    ("blue", "red", False)])
def test_open_answer_rule(answer, gold, yes):
    assert same_answer(answer, gold) is yes
    ok, _ = verdict(OPEN_ANSWER_PROMPT.format(question="How many?\nThink.", gold=gold, answer=answer))
    assert ok is yes


def test_content_tokens():
    assert content_tokens("The answer is 3, three, 3.0") == {3.0}
    assert content_tokens("A dog and a CAT.") == {"dog", "and", "cat"}


def test_match_and_support_prompts_and_unknown_prompts():
    response = "<think>2 + 1 = 3</think>\n<answer>3</answer>"
    assert verdict(MATCH_PROMPT.format(question="q", gold="three", response=response))[0] is True
    assert verdict(MATCH_PROMPT.format(question="q", gold="4", response=response))[0] is False
    assert final_answer("work\nso it is 5\n\n") == "so it is 5"
    assert final_answer("<answer>a</answer> <answer>b</answer>") == "b"
    assert verdict(SUPPORT_PROMPT.format(question="q", reasoning="2 + 1 gives 3", answer="3"))[0] is True
    assert verdict(SUPPORT_PROMPT.format(question="q", reasoning="2 + 1 gives 3", answer="4"))[0] is False
    assert verdict("Is the sky blue?") is None


def test_real_client_against_the_local_server(monkeypatch, tmp_path):
    """make_yes_no_judge starts the server (no key needed, OPENAI_API_KEY unset) and the OpenAI client asks it over
    HTTP; an unknown prompt is answered 400 and stays unjudged; the verdicts are cached on disk."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = JudgeSettings(**LOCAL, cache_path=str(tmp_path / "cache.jsonl"), max_retries=0)
    check_ready(cfg)
    client = make_yes_no_judge(cfg)
    assert client._url.startswith("http://127.0.0.1:") and client._url.endswith("/v1/chat/completions")
    prompts = [OPEN_ANSWER_PROMPT.format(question="q", gold="the answer is 3", answer=a) for a in ("3", "4")]
    verdicts = client.ask_many(prompts + ["Is the sky blue?"])
    assert [v.verdict for v in verdicts] == ["yes", "no", "unjudged"]
    assert "stand-in" in verdicts[0].reply and client.stats.num_requests == 3
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 2  # the unjudged one is not cached
    assert start_local_judge() == client._url.removesuffix("/chat/completions")  # one server per process
    stop_local_judge()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(client._url, data=b"{}", timeout=5)


def test_reward_judge_grades_with_the_local_judge(caplog):
    judge = RewardJudge(JudgeSettings(**LOCAL), rank=0)
    rewards = [Reward(0.5, 0.0, 0.5, extracted=a) for a in ("3", "4", "3")]
    items = [("How many?", "the answer is 3", "3"), ("How many?", "the answer is 3", "4"), None]
    tally = judge.grade(rewards, items, RewardConfig(), distributed=False)
    assert (tally.num_asked, tally.num_judged, tally.num_failures, tally.num_requests) == (2, 2, 0, 2)
    assert [r.accuracy for r in rewards] == [1.0, 0.0, 0.0] and rewards[0].method == "judge"


def test_server_rejects_other_paths_and_bodies():
    url = start_local_judge()
    for path, body, code in (("/v1/models", b"{}", 404), ("/v1/chat/completions", b"not json", 400),
                             ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400)):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url.removesuffix("/v1") + path, data=body, timeout=5)
        assert e.value.code == code and "local" in json.loads(e.value.read())["error"]["message"]


def test_local_needs_the_openai_backend():
    assert any("needs judge.backend = 'openai'" in p for p in JudgeSettings(**(LOCAL | {"backend": "gemini"})).check())
    assert JudgeSettings(**LOCAL).check() == []

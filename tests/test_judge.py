"""The Gemini judge and its HTTP transport (engine/http_json.py) against a stub Gemini server on 127.0.0.1, including
servers that misbehave: endless or dripping replies, redirects, deeply nested JSON."""

import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engine.judge import Judge, JudgeConfig, make_judge, parse_yes_no
from engine.log import logger

SECRET = "AIzaSy-TEST-SECRET-KEY-0123456789"


class StubGemini:
    """Answers `POST /v1beta/models/{model}:generateContent` like the Gemini API.

    Each prompt carries a tag `[[name]]`; `scripts[name]` is the list of actions for its 1st, 2nd, ...
    request (the last one repeats). An action is ("text", reply), ("status", code[, body]), ("sleep", s, reply),
    ("raw", bytes), ("json", obj), ("redirect", url) (a 307), ("chunked_forever",) (an endless chunked body) or
    ("drip", interval_s) (a body one byte per interval). Untagged prompts get "YES".
    """

    def __init__(self):
        self.scripts: dict[str, list[tuple]] = {}
        self.calls: dict[str, int] = {}
        self.num_requests = 0
        self.in_flight = self.max_in_flight = 0
        self.delay_s = 0.0
        self.keys_seen: set[str] = set()
        self.bytes_sent = 0
        self.paths: set[str] = set()
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 -- http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                prompt = body["contents"][0]["parts"][0]["text"]
                m = re.search(r"\[\[(\w+)\]\]", prompt)
                name = m.group(1) if m else ""
                with stub.lock:
                    stub.num_requests += 1
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    stub.keys_seen.add(self.headers.get("x-goog-api-key", ""))
                    stub.paths.add(self.path)
                    i = stub.calls.get(name, 0)
                    stub.calls[name] = i + 1
                try:
                    script = stub.scripts.get(name, [("text", "YES")])
                    self._act(script[min(i, len(script) - 1)])
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def _act(self, action):
                time.sleep(stub.delay_s)
                kind, code = action[0], 200
                if kind in ("chunked_forever", "drip", "redirect"):
                    return self._misbehave(action)
                if kind == "sleep":
                    time.sleep(action[1])
                    kind, action = "text", ("text", action[2])
                if kind == "text":
                    out = json.dumps({"candidates": [{"content": {"parts": [{"text": action[1]}], "role": "model"},
                                                      "finishReason": "STOP"}]}).encode()
                elif kind == "status":
                    code = action[1]
                    err = action[2] if len(action) > 2 else {"error": {"code": code, "message": "stub", "status": "X"}}
                    out = json.dumps(err).encode()
                elif kind == "raw":
                    out = action[1]
                else:
                    out = json.dumps(action[1]).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def _misbehave(self, action):
                kind = action[0]
                try:
                    if kind == "redirect":
                        self.send_response(307)
                        self.send_header("Location", action[1])
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    if kind == "chunked_forever":
                        self.wfile.write((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
                        chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
                        while stub.bytes_sent < 1 << 30:  # 1 GiB at most, should the client never stop
                            self.wfile.write(chunk)
                            stub.bytes_sent += len(chunk)
                    else:  # drip: a 600-byte body, one byte at a time
                        self.wfile.write((head + "Content-Length: 600\r\n\r\n").encode())
                        for _ in range(600):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            stub.bytes_sent += 1
                            time.sleep(action[1])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = StubGemini()
    yield s
    s.close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)


def _judge(stub, tmp_path=None, **kw) -> Judge:
    cfg = dict(enabled=True, base_url=stub.url, max_retries=3, initial_backoff_s=0.01, max_backoff_s=0.05,
               timeout_s=2.0, max_concurrency=4, cache_path=str(tmp_path / "cache.jsonl") if tmp_path else "")
    cfg.update(kw)
    return Judge(JudgeConfig(**cfg))


@pytest.mark.parametrize(
    "text, want",
    [
        ("YES", "yes"), ("no", "no"), ("Yes.", "yes"), ("NO!", "no"), ("**NO**", "no"), ("**Yes**, because x", "yes"),
        ("Yes, because the sum is 5.", "yes"), ("  \n\nno - the reasoning says 4", "no"), ("Verdict: yes", "yes"),
        ("**Verdict:** NO", "no"), ("Let me check.\nThe steps add up.\nYES", "yes"), ("`yes`", "yes"),
        ("Final answer: no", "no"), ("I looked at it.\nMy verdict is no, since 3 != 4.\nThanks", "no"),
        ("", None), (None, None), ("Maybe", None), ("Not sure", None), ("Nothing to add", None), ("yesterday", None),
        ("The reasoning looks fine.", None),
    ],
)
def test_parse_yes_no(text, want):
    assert parse_yes_no(text) == want


def test_yes_no_formats_against_the_server(stub, key_env):
    replies = {"a": "YES", "b": "**NO**", "c": "Yes, because it adds up.", "d": "Thinking...\nVerdict: no"}
    for name, reply in replies.items():
        stub.scripts[name] = [("text", reply)]
    judge = _judge(stub)
    got = judge.judge_many([(f"q [[{name}]]", "r", "a") for name in replies])
    assert [v.verdict for v in got] == ["yes", "no", "yes", "no"]
    assert all(v.attempts == 1 and not v.cached and v.error is None for v in got)
    assert stub.paths == {"/v1beta/models/gemini-2.5-flash:generateContent"}
    assert stub.keys_seen == {SECRET}
    assert [judge.keep(v) for v in got] == [True, False, True, False]
    assert judge.stats.num_requests == 4 and judge.stats.num_retries == 0


def test_retries_429_and_5xx_then_success(stub, key_env):
    stub.scripts["rate"] = [("status", 429), ("status", 429), ("text", "NO")]
    stub.scripts["srv"] = [("status", 500), ("status", 503), ("text", "yes")]
    judge = _judge(stub)
    got = judge.ask_many(["[[rate]]", "[[srv]]"])
    assert [(v.verdict, v.attempts) for v in got] == [("no", 3), ("yes", 3)]
    assert judge.stats.num_retries == 4 and judge.stats.num_requests == 6


def test_retries_exhausted_and_no_retry_on_other_4xx(stub, key_env):
    stub.scripts["always500"] = [("status", 500)]
    stub.scripts["forbidden"] = [("status", 403)]
    stub.scripts["bad"] = [("status", 400)]
    for on_unjudged, kept in (("keep", True), ("drop", False)):
        stub.calls.clear()
        judge = _judge(stub, max_retries=2, on_unjudged=on_unjudged)
        v500, v403, v400 = judge.ask_many(["[[always500]]", "[[forbidden]]", "[[bad]]"])
        assert (v500.verdict, v500.attempts) == ("unjudged", 3) and "500" in v500.error
        assert (v403.verdict, v403.attempts) == ("unjudged", 1) and "403" in v403.error
        assert (v400.verdict, v400.attempts) == ("unjudged", 1)
        assert stub.calls == {"always500": 3, "forbidden": 1, "bad": 1}
        assert judge.keep(v500) is kept and judge.stats.num_unjudged == 3


def test_timeout_is_retried(stub, key_env):
    stub.scripts["slow"] = [("sleep", 1.5, "YES"), ("text", "YES")]
    judge = _judge(stub, timeout_s=0.3)
    t0 = time.perf_counter()
    (v,) = judge.ask_many(["[[slow]]"])
    assert (v.verdict, v.attempts) == ("yes", 2)
    assert time.perf_counter() - t0 < 1.4  # gave up on the first request at the client timeout
    stub.scripts["slow2"] = [("sleep", 1.0, "YES")]
    (v,) = _judge(stub, timeout_s=0.2, max_retries=1).ask_many(["[[slow2]]"])
    assert (v.verdict, v.attempts) == ("unjudged", 2) and "Timeout" in v.error


def test_malformed_bodies_and_unparseable_replies(stub, key_env):
    stub.scripts["badjson"] = [("raw", b"{not json"), ("text", "yes")]
    stub.scripts["nocand"] = [("json", {}), ("text", "no")]
    stub.scripts["emptyparts"] = [("json", {"candidates": [{"content": {"parts": []}}]}), ("text", "no")]
    stub.scripts["babble"] = [("text", "It depends on the reading of the question.")]
    stub.scripts["always_bad"] = [("raw", b"<html>proxy error</html>")]
    judge = _judge(stub)
    got = judge.ask_many(["[[badjson]]", "[[nocand]]", "[[emptyparts]]", "[[babble]]", "[[always_bad]]"])
    assert [(v.verdict, v.attempts) for v in got] == [("yes", 2), ("no", 2), ("no", 2), ("unjudged", 2),
                                                       ("unjudged", 2)]
    assert "unparseable" in got[3].error and "depends" in got[3].reply
    assert "malformed" in got[4].error


def test_request_budget(stub, key_env):
    judge = _judge(stub, request_budget=5, max_concurrency=1, on_unjudged="drop")
    got = judge.ask_many([f"[[q{i}]]" for i in range(8)])
    assert [v.verdict for v in got] == ["yes"] * 5 + ["unjudged"] * 3
    assert all(v.error == "request budget exhausted" and v.attempts == 0 for v in got[5:])
    assert stub.num_requests == 5 and judge.stats.num_budget_exhausted == 3
    assert [judge.keep(v) for v in got].count(True) == 5
    # retries count against the budget too
    stub.scripts["r"] = [("status", 429)]
    (v,) = _judge(stub, request_budget=2, max_retries=5).ask_many(["[[r]]"])
    assert (v.verdict, v.attempts, v.error) == ("unjudged", 2, "request budget exhausted")


def test_cache_second_run_sends_nothing(stub, key_env, tmp_path):
    stub.scripts["n"] = [("text", "NO")]
    stub.scripts["flaky"] = [("status", 403), ("text", "yes")]
    prompts = [f"[[q{i}]]" for i in range(6)] + ["[[n]]", "[[flaky]]", "[[q0]]"]
    first = _judge(stub, tmp_path).ask_many(prompts)
    assert [v.verdict for v in first] == ["yes"] * 6 + ["no", "unjudged", "yes"]
    assert stub.num_requests == 8  # the repeated prompt is sent once
    assert first[-1] is first[0]
    judge = _judge(stub, tmp_path)
    second = judge.ask_many(prompts)
    assert stub.num_requests == 9  # only the unjudged item is asked again (and now succeeds)
    assert [v.verdict for v in second] == ["yes"] * 6 + ["no", "yes", "yes"]
    assert sum(v.cached for v in second) == 8 and judge.stats.num_cache_hits == 8
    third = _judge(stub, tmp_path, model="gemini-2.5-pro").ask_many(["[[n]]"])  # the model is part of the key
    assert not third[0].cached and stub.num_requests == 10


def test_cache_tolerates_truncated_last_line(stub, key_env, tmp_path):
    _judge(stub, tmp_path).ask_many(["[[a]]", "[[b]]"])
    path = tmp_path / "cache.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # crash mid-write of the 2nd row
    n0 = stub.num_requests
    got = _judge(stub, tmp_path).ask_many(["[[a]]", "[[b]]"])
    assert [v.cached for v in got].count(True) == 1 and stub.num_requests == n0 + 1
    rows = path.read_text().splitlines()
    assert len(rows) == 3 and json.loads(rows[2])["verdict"] == "yes"  # the new row is on its own line
    got = _judge(stub, tmp_path).ask_many(["[[a]]", "[[b]]"])
    assert all(v.cached for v in got) and stub.num_requests == n0 + 1


def test_concurrency_limit(stub, key_env):
    stub.delay_s = 0.1
    judge = _judge(stub, max_concurrency=3)
    t0 = time.perf_counter()
    got = judge.ask_many([f"[[c{i}]]" for i in range(12)])
    assert all(v.verdict == "yes" for v in got)
    assert stub.max_in_flight == 3
    assert time.perf_counter() - t0 < 12 * 0.1  # ran in parallel


def test_missing_key_and_disabled(stub, monkeypatch):
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    assert make_judge(JudgeConfig(enabled=False)) is None
    with pytest.raises(RuntimeError, match="GOOGLE_API_KEY.*GEMINI_API_KEY"):
        make_judge(JudgeConfig(enabled=True, base_url=stub.url))
    monkeypatch.setenv("GOOGLE_API_KEY", SECRET)
    assert isinstance(make_judge(JudgeConfig(enabled=True, base_url=stub.url)), Judge)


def test_bad_config():
    with pytest.raises(ValueError, match="max_concurrency.*on_unjudged"):
        Judge(JudgeConfig(enabled=True, max_concurrency=0, on_unjudged="maybe"))  # type: ignore[arg-type]


def test_key_never_leaks(stub, key_env, tmp_path, caplog):
    """Not in logs (every logger at DEBUG), the cache file, verdict errors or exception strings."""
    stub.scripts["echo"] = [("status", 400)]
    stub.scripts["e500"] = [("status", 500)]
    caplog.set_level(logging.DEBUG)
    logger.addHandler(caplog.handler)  # the engine logger may not propagate to root
    try:
        judge = _judge(stub, tmp_path, max_retries=1)
        got = judge.ask_many(["[[echo]]", "[[e500]]", "[[fine]]"])
        stub.scripts["slow"] = [("sleep", 1.0, "YES")]
        got += _judge(stub, tmp_path, timeout_s=0.2, max_retries=0).ask_many(["[[slow]]"])
    finally:
        logger.removeHandler(caplog.handler)
    assert stub.keys_seen == {SECRET}  # it was really sent
    assert caplog.text and SECRET not in caplog.text
    assert SECRET not in (tmp_path / "cache.jsonl").read_text()
    assert all(SECRET not in str(v) for v in got)
    assert SECRET not in repr(judge.cfg) and SECRET not in str(judge.stats.as_dict())
    # an error body that echoes the key (a proxy might) is scrubbed from the verdict
    stub.scripts["leaky"] = [("status", 400, {"error": {"code": 400, "message": f"bad key {SECRET}", "status": "X"}})]
    (v,) = _judge(stub).ask_many(["[[leaky]]"])
    assert v.verdict == "unjudged" and "<redacted>" in v.error and SECRET not in v.error


def test_deadline_covers_the_whole_reply(stub, key_env):
    """A server sending one byte every 0.05 s: each read is quick, the reply never ends (30 s). timeout_s used to be
    per read, so this held the caller for the whole drip."""
    stub.scripts["drip"] = [("drip", 0.05)]
    t0 = time.perf_counter()
    (v,) = _judge(stub, timeout_s=0.5, max_retries=1).ask_many(["[[drip]]"])
    assert (v.verdict, v.attempts) == ("unjudged", 2) and "RequestTimeoutError" in v.error
    assert time.perf_counter() - t0 < 3


def test_endless_reply_is_cut_at_the_size_cap(stub, key_env):
    """An endless chunked reply used to grow the process without bound (14 GB in 41 s)."""
    stub.scripts["flood"] = [("chunked_forever",)]
    t0 = time.perf_counter()
    (v,) = _judge(stub, timeout_s=30).ask_many(["[[flood]]"])
    assert v.verdict == "unjudged" and "larger than" in v.error and v.attempts == 2  # malformed: retried once
    assert time.perf_counter() - t0 < 10 and stub.bytes_sent < 64 << 20


def test_redirect_is_not_followed_with_the_key(stub, key_env):
    """A 307 to another port used to be followed, sending x-goog-api-key there."""
    other = StubGemini()
    try:
        stub.scripts["moved"] = [("redirect", other.url + "/v1beta/models/m:generateContent")]
        (v,) = _judge(stub).ask_many(["[[moved]]"])
        assert other.num_requests == 0 and other.keys_seen == set()
    finally:
        other.close()
    assert (v.verdict, v.attempts) == ("unjudged", 1) and "redirect" in v.error and SECRET not in v.error


def test_deeply_nested_reply_is_unjudged_not_a_crash(stub, key_env):
    """A deeply nested JSON body used to raise RecursionError out of ask_many."""
    deep = b"[" * 200_000 + b"]" * 200_000
    stub.scripts["deep"] = [("raw", deep)]
    stub.scripts["deep_inside"] = [("raw", b'{"candidates": ' + deep + b"}")]
    stub.scripts["odd_shape"] = [("json", {"candidates": [{"content": {"parts": [["x"], 3, {"text": 5}]}}]})]
    judge = _judge(stub)
    got = judge.ask_many(["[[deep]]", "[[deep_inside]]", "[[odd_shape]]", "[[fine]]"])
    assert [v.verdict for v in got] == ["unjudged", "unjudged", "unjudged", "yes"]
    assert "nested too deeply" in got[0].error and judge.stats.num_unjudged == 3

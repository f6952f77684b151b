"""A local STAND-IN for the paper's GPT-4o judge: a loopback OpenAI-compatible chat server that judges by a rule.

It is not an LLM and its verdicts are not GPT-4o's. It exists so that the demo (recipes/tiny.toml) and the tests
run the real judged-reward path (engine/reward_judge.py -> engine/judge_openai.py over HTTP, with the cache,
retries and metrics) with no network and no key. A recipe asks for it with

    [stages.judge]
    enabled = true
    backend = "openai"
    base_url = "local"        # start this server in-process on 127.0.0.1, on a free port
    model = "local-rule-judge"

The process that sends judge requests (rank 0) starts one server on first use, on 127.0.0.1 with a port the OS
picks, and stops it at exit (or with `stop_local_judge`). Every start is logged as a stand-in for GPT-4o.

The rule, for each of the engine's three judge prompts (anything else is answered HTTP 400):
  open-ended accuracy (reward_judge.OPEN_ANSWER_PROMPT): YES when the student's answer and the reference have the
      same content tokens; NO otherwise.
  benchmark re-check (judge.MATCH_PROMPT): the same, with the response's final answer (its last <answer>...</answer>,
      else its last non-empty line).
  reasoning consistency (judge.SUPPORT_PROMPT): YES when the final answer's content tokens all occur in the
      reasoning.
Content tokens: the text lower-cased, punctuation dropped, numbers ("3", "3.0", "1,000", "-2") and number words
("three") read as numbers, and the filler words in `FILLER` ("a", "the", "answer", "is", ...) left out, as a set.
So "The answer is 3." matches "3" and "three", "a red circle" matches "Red circle", "3 apples" does not match "3",
and an empty answer never matches. The reply is "YES" or "NO" followed by one sentence naming this rule.
"""

from __future__ import annotations

import atexit
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engine.log import logger

LOCAL = "local"
"""The `judge.base_url` value that asks for this server."""
MAX_REQUEST_BYTES = 1 << 20
"""Largest request body read; a larger one is answered 413."""
FILLER = frozenset("a an the answer answers final is are was it its this that of so therefore thus be".split())
"""Words left out of the content tokens."""
_NUMBER_WORDS = {w: float(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty".split())}
_TOKEN_RE = re.compile(r"-?\d+(?:\.\d+)?|[^\W_]+")
_OPEN_RE = re.compile(r"Reference answer:\n(.*?)\n\nStudent's final answer:\n(.*?)\n\nIs the student's final answer "
                      r"correct", re.S)
_MATCH_RE = re.compile(r"Reference answer:\n(.*?)\n\nModel's response \(its final answer is what counts\):\n(.*?)\n\n"
                       r"Does the model's final answer match", re.S)
_SUPPORT_RE = re.compile(r"Reasoning:\n(.*?)\n\nFinal answer:\n(.*?)\n\nDoes the reasoning support", re.S)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.S)


def content_tokens(text: str) -> frozenset:
    """The set of content tokens of `text` (module docstring): numbers as floats, other words lower-cased."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())  # 1,000 -> 1000
    out = set()
    for tok in _TOKEN_RE.findall(text):
        if tok in FILLER:
            continue
        if tok in _NUMBER_WORDS:
            out.add(_NUMBER_WORDS[tok])
        elif tok[0].isdigit() or tok[0] == "-":
            out.add(float(tok))
        else:
            out.add(tok)
    return frozenset(out)


def same_answer(answer: str, gold: str) -> bool:
    """The open-ended rule: equal, non-empty content-token sets."""
    tokens = content_tokens(answer)
    return bool(tokens) and tokens == content_tokens(gold)


def final_answer(response: str) -> str:
    """A response's final answer: its last <answer>...</answer>, else its last non-empty line."""
    tags = _ANSWER_TAG_RE.findall(response)
    if tags:
        return tags[-1]
    lines = [line for line in response.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def verdict(prompt: str) -> tuple[bool, str] | None:
    """(yes, which rule) for one of the engine's judge prompts, or None for a prompt this judge does not know."""
    m = _OPEN_RE.search(prompt)
    if m:
        return same_answer(m.group(2), m.group(1)), "the answer and the reference have the same content tokens"
    m = _MATCH_RE.search(prompt)
    if m:
        return same_answer(final_answer(m.group(2)), m.group(1)), \
            "the response's final answer and the reference have the same content tokens"
    m = _SUPPORT_RE.search(prompt)
    if m:
        answer = content_tokens(m.group(2))
        return bool(answer) and answer <= content_tokens(m.group(1)), \
            "the final answer's content tokens all occur in the reasoning"
    return None


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # http.server writes every request to stderr otherwise
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str) -> None:
        self._reply(code, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

    def do_POST(self):  # noqa: N802 -- http.server's naming
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._error(404, f"the local judge serves POST /v1/chat/completions, not {self.path}")
        size = int(self.headers.get("content-length") or 0)
        if size > MAX_REQUEST_BYTES:
            return self._error(413, f"request of {size} bytes; the local judge reads at most {MAX_REQUEST_BYTES}")
        try:
            body = json.loads(self.rfile.read(size))
            prompt = body["messages"][-1]["content"]
            model = str(body.get("model", LOCAL))
        except (ValueError, KeyError, IndexError, TypeError):
            return self._error(400, "the local judge expected a chat-completions body with messages[-1].content")
        found = verdict(prompt) if isinstance(prompt, str) else None
        if found is None:
            return self._error(400, "the local stand-in judge (engine/judge_local.py) only answers the engine's "
                                    "judge prompts (OPEN_ANSWER_PROMPT, MATCH_PROMPT, SUPPORT_PROMPT)")
        yes, rule = found
        text = f"{'YES' if yes else 'NO'}. Local stand-in judge (a rule, not GPT-4o): {rule} " \
               f"{'' if yes else 'not '}holds."
        self._reply(200, {"id": "local-judge", "object": "chat.completion", "model": model, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})


class LocalJudgeServer:
    """The stand-in judge on 127.0.0.1 at a free port, served by a daemon thread; `url` is its API root."""

    def __init__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, name="local-judge", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_server: LocalJudgeServer | None = None
_lock = threading.Lock()


def start_local_judge() -> str:
    """Start this process's stand-in judge if it is not running (stopped at exit); its base URL."""
    global _server
    with _lock:
        if _server is None:
            _server = LocalJudgeServer()
            atexit.register(stop_local_judge)
            logger.warning("judge: LOCAL STAND-IN for GPT-4o at %s (engine/judge_local.py): verdicts come from a "
                           "string/number rule, not an LLM; use them to exercise the judged path, not as results",
                           _server.url)
        return _server.url


def stop_local_judge() -> None:
    """Stop the stand-in judge if it runs (idempotent)."""
    global _server
    with _lock:
        if _server is not None:
            _server.close()
            _server = None

"""Yes/no judge over any OpenAI-compatible chat endpoint (GPT-4o, or a judge model served by vLLM or SGLang).

`OpenAIJudge` is `engine.judge.Judge` with another request: everything else is shared (the thread pool, retries
with backoff and seeded jitter on 408, 429, 5xx and transport errors, one retry of an unparseable or malformed
reply, the request budget, the on-disk verdict cache, the statistics, the prompts, key redaction). The request is
`POST {base_url}/chat/completions` with `{"model", "messages": [{"role": "user", "content": prompt}],
"temperature": 0, "max_tokens"}`, sent through engine/http_json.py (one deadline of `timeout_s` for the whole
request, a reply capped at `MAX_RESPONSE_BYTES`, no redirect followed, a body that cannot raise anything but
MalformedResponseError), and the verdict is parsed from `choices[0].message.content`.

The key comes from the environment variable named by `api_key_env` (declared in engine/env.py); it is sent only as
an `Authorization: Bearer` header and redacted from every error string we keep. An empty `api_key_env` sends no key
(a local server).
"""

from __future__ import annotations

import random
import threading
from urllib.parse import urlsplit

from engine.http_json import MalformedResponseError, post_json
from engine.judge import Judge, JudgeConfig, JudgeStats, VerdictCache

MAX_RESPONSE_BYTES = 1 << 20
"""Largest reply body read, in bytes; a longer one is malformed (a yes/no reply is a few hundred bytes)."""


def split_url(base_url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of an http(s) base URL; ValueError naming the URL when it is not one."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"judge.base_url = {base_url!r} is not an http:// or https:// URL with a host; set it to "
                         f"the server's API root, e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise ValueError(f"judge.base_url = {base_url!r}: {e}") from None
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def chat_text(body) -> str | None:
    """The reply text of a chat-completions body (None for a null content); MalformedResponseError for a body of
    another shape."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise MalformedResponseError("no choices[0].message.content") from None
    if content is not None and not isinstance(content, str):
        raise MalformedResponseError(f"content is {type(content).__name__}, not text")
    return content


class OpenAIJudge(Judge):
    """Yes/no questions to an OpenAI-compatible endpoint, with a concurrency limit, retries, a request budget and
    a disk cache (engine.judge.Judge's). `key` is the API key ("" sends none)."""

    def __init__(self, cfg: JudgeConfig, key: str):  # not Judge.__init__: no Gemini key, another URL
        errs = cfg.check()
        if errs:
            raise ValueError("judge config: " + "; ".join(errs))
        split_url(cfg.base_url)  # a malformed URL is named here, before any request
        self.cfg = cfg
        self._key = key
        self._url = f"{cfg.base_url.rstrip('/')}/chat/completions"
        self.cache = VerdictCache(cfg.cache_path)
        self.stats = JudgeStats()
        self._lock = threading.Lock()
        self._rng = random.Random(cfg.seed)

    def _send(self, prompt: str) -> str | None:
        """One request; the reply text. Raises engine.http_json's errors (Judge._ask_one sorts them)."""
        headers = {"Accept": "application/json"} | ({"Authorization": f"Bearer {self._key}"} if self._key else {})
        body = post_json(self._url, {"model": self.cfg.model, "messages": [{"role": "user", "content": prompt}],
                                     "temperature": 0.0, "max_tokens": self.cfg.max_output_tokens},
                         headers, self.cfg.timeout_s, max_bytes=MAX_RESPONSE_BYTES)
        return chat_text(body)

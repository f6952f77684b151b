"""Yes/no judge over any OpenAI-compatible chat endpoint (GPT-4o, or a judge model served by vLLM or SGLang).

`OpenAIJudge` has the public interface of `engine.judge.Judge` (`ask_many`, `judge_many`, `match_many`, `keep`,
`stats`, `cache`, `cfg`) and shares its pieces: the verdict parser, the on-disk verdict cache, the statistics and
the prompts. Only the transport differs: `POST {base_url}/chat/completions` with
`{"model", "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens"}`, and the verdict
is parsed from `choices[0].message.content`.

Decisions:
- Standard library HTTP (`http.client`): no new dependency, and no redirect is ever followed (a 3xx is an error
  that is not retried), so the key cannot be forwarded to another host.
- Each request has one deadline (`timeout_s`) covering connect, send and the whole body; a body larger than
  `MAX_RESPONSE_BYTES` or nested deeper than Python's JSON parser allows is a malformed reply.
- Retries with exponential backoff and seeded jitter on 408, 429, 5xx and transport errors/timeouts; other
  4xx and 3xx are not retried. A reply with no parseable YES/NO, or a malformed body, is retried once.
- The key comes from the environment variable named by `api_key_env` (declared in engine/env.py); it is sent only
  as an `Authorization: Bearer` header and redacted from every error string we keep. An empty `api_key_env`
  sends no key (a local server).
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from engine.judge import (
    MATCH_PROMPT,
    SUPPORT_PROMPT,
    JudgeConfig,
    JudgeStats,
    Verdict,
    VerdictCache,
    cache_key,
    parse_yes_no,
)
from engine.log import log0, logger, warn_once

MAX_RESPONSE_BYTES = 1 << 20
"""Largest reply body read, in bytes; a longer one is malformed (a yes/no reply is a few hundred bytes)."""
RETRY_CODES = frozenset({408, 429})  # plus every 5xx


class HTTPStatusError(Exception):
    """A non-200 reply: `code` is the HTTP status."""

    def __init__(self, code: int, message: str):
        self.code = code
        super().__init__(f"HTTP {code}: {message}")


class MalformedReply(ValueError):  # noqa: N818 - reads as what happened
    """A 200 reply whose body is not the chat-completions JSON we expect."""


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


def _content(body: bytes) -> str | None:
    """The reply text of a chat-completions body; MalformedReply when the body is not one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
        raise MalformedReply(f"invalid JSON ({type(e).__name__})") from None
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise MalformedReply("no choices[0].message.content") from None
    if content is not None and not isinstance(content, str):
        raise MalformedReply(f"content is {type(content).__name__}, not text")
    return content


class OpenAIJudge:
    """Yes/no questions to an OpenAI-compatible endpoint, with a concurrency limit, retries, a request budget and
    a disk cache. `key` is the API key ("" sends none)."""

    def __init__(self, cfg: JudgeConfig, key: str):
        errs = cfg.check()
        if errs:
            raise ValueError("judge config: " + "; ".join(errs))
        self.cfg = cfg
        self._scheme, self._host, self._port, self._path = split_url(cfg.base_url)
        self._key = key
        self.cache = VerdictCache(cfg.cache_path)
        self.stats = JudgeStats()
        self._lock = threading.Lock()
        self._rng = random.Random(cfg.seed)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "<redacted>") if self._key else text

    def _reserve_request(self) -> bool:
        with self._lock:
            if self.cfg.request_budget and self.stats.num_requests >= self.cfg.request_budget:
                return False
            self.stats.num_requests += 1
            return True

    def _backoff_s(self, num_retry: int) -> float:
        with self._lock:
            jitter = 0.5 + 0.5 * self._rng.random()
        return min(self.cfg.max_backoff_s, self.cfg.initial_backoff_s * 2 ** (num_retry - 1)) * jitter

    def _send(self, prompt: str) -> str | None:
        """One request; the reply text. Raises HTTPStatusError, MalformedReply, TimeoutError or OSError."""
        deadline = time.monotonic() + self.cfg.timeout_s
        body = json.dumps({"model": self.cfg.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.0, "max_tokens": self.cfg.max_output_tokens}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.cfg.timeout_s)
        try:
            conn.request("POST", f"{self._path}/chat/completions", body=body, headers=headers)
            sock = conn.sock  # kept: getresponse() drops conn.sock when the server closes after this reply
            sock.settimeout(max(1e-3, deadline - time.monotonic()))
            resp = conn.getresponse()
            data = b""
            while len(data) <= MAX_RESPONSE_BYTES:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise TimeoutError(f"no complete reply within judge.timeout_s = {self.cfg.timeout_s} s")
                sock.settimeout(left_s)  # the deadline covers the whole body, not each read
                chunk = resp.read1(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError as e:  # socket timeouts; re-raised with the setting named
            raise TimeoutError(f"timed out after judge.timeout_s = {self.cfg.timeout_s} s") from e
        finally:
            conn.close()
        if len(data) > MAX_RESPONSE_BYTES:
            raise MalformedReply(f"reply body over {MAX_RESPONSE_BYTES} bytes")
        if resp.status != 200:
            raise HTTPStatusError(resp.status, data[:300].decode("utf-8", errors="replace"))
        return _content(data)

    def _ask_one(self, prompt: str) -> Verdict:
        key = cache_key(self.cfg.model, prompt)
        hit = self.cache.get(key)
        if hit is not None:
            return Verdict(hit, cached=True)  # type: ignore[arg-type]
        attempts, num_bad_replies, reply = 0, 0, ""
        while True:
            if not self._reserve_request():
                with self._lock:
                    self.stats.num_budget_exhausted += 1
                warn_once(f"judge: request budget of {self.cfg.request_budget} spent; the rest are unjudged")
                return Verdict("unjudged", attempts=attempts, error="request budget exhausted", reply=reply)
            attempts += 1
            wait_s = 0.0
            try:
                text = self._send(prompt)
                reply = (text or "")[:200]
                verdict = parse_yes_no(text)
                if verdict is not None:
                    self.cache.put(key, verdict, self.cfg.model)
                    return Verdict(verdict, attempts=attempts, reply=reply)
                num_bad_replies += 1
                error = f"unparseable reply: {reply!r}"
            except MalformedReply as exc:
                num_bad_replies += 1
                error = f"malformed response: {exc}"
            except HTTPStatusError as exc:
                error = str(exc)
                if not (exc.code in RETRY_CODES or 500 <= exc.code < 600):  # 3xx, other 4xx: retrying cannot help
                    return Verdict("unjudged", attempts=attempts, error=self._redact(error)[:500], reply=reply)
                wait_s = self._backoff_s(attempts)
            except (OSError, http.client.HTTPException) as exc:  # TimeoutError, refused, reset, bad status line
                error = f"{type(exc).__name__}: {exc}"
                wait_s = self._backoff_s(attempts)
            if num_bad_replies > 1 or attempts > self.cfg.max_retries:
                return Verdict("unjudged", attempts=attempts, error=self._redact(error)[:500], reply=reply)
            logger.debug("judge: retry %d after %s (wait %.2f s)", attempts, self._redact(error)[:200], wait_s)
            with self._lock:
                self.stats.num_retries += 1
            time.sleep(wait_s)

    def ask_many(self, prompts: list[str]) -> list[Verdict]:
        """Ask each yes/no prompt; identical prompts are sent once. Returns one Verdict per prompt, in order."""
        unique = list(dict.fromkeys(prompts))
        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency, thread_name_prefix="judge") as pool:
            by_prompt = dict(zip(unique, pool.map(self._ask_one, unique), strict=True))
        out = [by_prompt[p] for p in prompts]
        s = self.stats
        for v in out:
            s.num_items += 1
            s.num_cache_hits += v.cached
            s.num_yes += v.verdict == "yes"
            s.num_no += v.verdict == "no"
            s.num_unjudged += v.verdict == "unjudged"
        log0("judge %s (openai-compatible): %d items | yes %d no %d unjudged %d | %d requests, %d retries, %d cache "
             "hits", self.cfg.model, s.num_items, s.num_yes, s.num_no, s.num_unjudged, s.num_requests, s.num_retries,
             s.num_cache_hits)
        return out

    def judge_many(self, items: list[tuple[str, str, str]]) -> list[Verdict]:
        """(question, reasoning, final answer) triples: does the reasoning support the answer? (as Judge.judge_many)"""
        return self.ask_many([SUPPORT_PROMPT.format(question=q, reasoning=r, answer=a) for q, r, a in items])

    def match_many(self, items: list[tuple[str, str, str]]) -> list[Verdict]:
        """(question, gold, response) triples: does the final answer match the reference? (as Judge.match_many)"""
        return self.ask_many([MATCH_PROMPT.format(question=q, gold=g, response=r) for q, g, r in items])

    def keep(self, verdict: Verdict) -> bool:
        """Keep "yes", drop "no", and keep or drop "unjudged" per `on_unjudged`."""
        if verdict.verdict == "unjudged":
            return self.cfg.on_unjudged == "keep"
        return verdict.verdict == "yes"

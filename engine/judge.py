"""Optional LLM judge (Gemini's REST API): yes/no questions, answered concurrently, cached on disk.

Used by the SPECS distill stage (arXiv:2510.25801) to keep only self-distilled chosen responses whose
reasoning supports their final answer (`Judge.judge_many`); `Judge.ask_many` is the generic yes/no
interface (e.g. grading open-ended answers).

Decisions:
- Threads, not asyncio: a pool of `max_concurrency` workers, each request a plain HTTP call, so the judge works
  from any caller, inside an event loop or not.
- The transport is engine/http_json.py, not an SDK: `timeout_s` is a deadline for the whole request (a server
  sending one byte at a time cannot hold us), the reply is capped at 1 MiB, redirects are refused (they would
  carry the key elsewhere), and no body (invalid JSON, nested past the recursion limit, wrong shape) raises.
- Retries with exponential backoff and seeded jitter on 408, 429, 5xx and transport errors/timeouts. Other 4xx
  and redirects are not retried. Every request is counted here.
- A reply with no parseable YES/NO (or a malformed body: invalid JSON, no candidates, too large) is retried once,
  immediately; a second one makes the item "unjudged". Retrying more rarely helps at temperature 0.
- "unjudged" items (retries spent, budget spent, unparseable, non-retryable error) are kept or dropped
  per `on_unjudged`; they are never cached, so a rerun asks again.
- Cache: append-only JSONL, one line per yes/no verdict, keyed by sha256 of (model, prompt). A truncated
  last line (crash mid-write) is skipped on load and the next append starts on a fresh line.
- The API key comes only from GOOGLE_API_KEY or GEMINI_API_KEY (engine/env.py; GOOGLE_API_KEY wins, as
  in google-genai), is sent only in the `x-goog-api-key` header to `base_url`, and is redacted from every error
  string we keep.
"""

import hashlib
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from engine import atomic
from engine.env import env
from engine.http_json import (
    HTTPStatusError,
    MalformedResponseError,
    RedirectError,
    TransportError,
    post_json,
)
from engine.log import Progress, log0, logger, warn_once

KEY_VARS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")
RETRY_CODES = frozenset({408, 429})  # plus every 5xx
GEMINI_URL = "https://generativelanguage.googleapis.com"

SUPPORT_PROMPT = """You are checking a worked solution for internal consistency.

Question:
{question}

Reasoning:
{reasoning}

Final answer:
{answer}

Does the reasoning support the final answer? Say YES if the final answer is what the reasoning arrives at,
and NO if the reasoning reaches a different result, contradicts the answer, or never reaches a result.
Judge only whether the answer follows from the reasoning, not whether it is correct.
Reply with one word first, YES or NO; you may add one short sentence after it."""

MATCH_PROMPT = """You are grading a model's answer to a benchmark question against the reference answer.

Question:
{question}

Reference answer:
{gold}

Model's response (its final answer is what counts):
{response}

Does the model's final answer match the reference answer? Equivalent forms count as a match (3/4 and 0.75, an
option letter and that option's text, units written differently); a different value, a different option, several
answers, or no answer do not. Reply with one word first, YES or NO; you may add one short sentence after it."""


@dataclass(kw_only=True, slots=True)
class JudgeConfig:
    enabled: bool = False
    """Run the judge at all; when False no client is built and no key is needed."""
    model: str = "gemini-2.5-flash"
    """Gemini model name."""
    max_concurrency: int = 8
    """Requests in flight at once (worker threads)."""
    max_retries: int = 5
    """Retries per item after the first request (so at most max_retries + 1 requests per item)."""
    initial_backoff_s: float = 1.0
    """Wait before the first retry, in seconds; doubles per retry, times a jitter in [0.5, 1)."""
    max_backoff_s: float = 30.0
    """Cap on one wait, in seconds (before jitter)."""
    timeout_s: float = 60.0
    """Deadline of one request, connect to last byte, in seconds."""
    request_budget: int = 0
    """Max HTTP requests per Judge (retries included); past it items are "unjudged". 0 means no limit."""
    on_unjudged: Literal["keep", "drop"] = "keep"
    """What `Judge.keep` does with an "unjudged" item."""
    cache_path: str = ""
    """JSONL verdict cache; "" keeps the cache in memory only."""
    base_url: str = ""
    """API endpoint override (tests, proxies); "" is Google's default. Redirects from it are not followed."""
    max_output_tokens: int = 64
    """Reply length cap, in tokens; the verdict is the first word."""
    thinking_budget: int = 0
    """Thinking tokens for 2.5 models (0 = off, the cheapest for flash); < 0 sends no thinking config."""
    seed: int = 0
    """Seed of the backoff jitter."""

    def check(self) -> list[str]:
        errs = []
        for name in ("max_concurrency", "max_output_tokens"):
            if getattr(self, name) < 1:
                errs.append(f"judge.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_retries", "request_budget"):
            if getattr(self, name) < 0:
                errs.append(f"judge.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("initial_backoff_s", "max_backoff_s"):
            if getattr(self, name) < 0:
                errs.append(f"judge.{name} must be >= 0 seconds, got {getattr(self, name)}")
        if self.timeout_s < 0.001:
            errs.append(f"judge.timeout_s must be >= 0.001 seconds, got {self.timeout_s}")
        if self.on_unjudged not in ("keep", "drop"):
            errs.append(f"judge.on_unjudged must be 'keep' or 'drop', got {self.on_unjudged!r}")
        return errs


@dataclass(slots=True)
class Verdict:
    verdict: Literal["yes", "no", "unjudged"]
    cached: bool = False
    """True when the verdict came from the cache (no request sent)."""
    attempts: int = 0
    """Requests sent for this item."""
    error: str | None = None
    """Why the item is unjudged (key redacted); None for yes/no."""
    reply: str = ""
    """The start of the model's last reply, for debugging."""


@dataclass(slots=True)
class JudgeStats:
    num_items: int = 0
    num_requests: int = 0
    num_cache_hits: int = 0
    num_retries: int = 0
    num_yes: int = 0
    num_no: int = 0
    num_unjudged: int = 0
    num_budget_exhausted: int = 0
    """Items left unjudged because the request budget ran out."""

    def as_dict(self) -> dict[str, int]:
        return {f"judge/{k}": v for k, v in asdict(self).items()}


_MARKDOWN_RE = re.compile(r"[*_`#>~]")
_LINE_VERDICT_RE = re.compile(r"^\W*(?:(?:final\s+)?(?:verdict|answer)\s*(?:is)?\s*[:=-]?\s*)?\W*(yes|no)\b", re.I)
_ANY_VERDICT_RE = re.compile(r"\bverdict\b\W*(?:is\W*)?(yes|no)\b", re.I)


def parse_yes_no(text: str | None) -> Literal["yes", "no"] | None:
    """The verdict in a reply, or None if there is none.

    Looks, after dropping markdown emphasis, at the start of the first non-empty line ("YES", "**No.**",
    "Yes, because...", "Verdict: no"), then at the start of the last one, then for a "verdict: yes/no"
    anywhere (the last such wins).
    """
    if not text:
        return None
    plain = _MARKDOWN_RE.sub("", text)
    lines = [line.strip() for line in plain.splitlines() if line.strip()]
    for line in lines[:1] + lines[-1:]:
        m = _LINE_VERDICT_RE.match(line)
        if m:
            return m.group(1).lower()  # type: ignore[return-value]
    found = _ANY_VERDICT_RE.findall(plain)
    return found[-1].lower() if found else None


def cache_key(model: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([model, prompt], ensure_ascii=False).encode("utf-8")).hexdigest()


class VerdictCache:
    """Append-only JSONL of {"key", "verdict"}; in memory only when `path` is ""."""

    def __init__(self, path: str):
        self.path = Path(path) if path else None
        self.verdicts: dict[str, str] = {}
        self._lock = threading.Lock()
        self._needs_newline = False
        if self.path is None or not self.path.exists():
            return
        data = self.path.read_bytes()
        self._needs_newline = bool(data) and not data.endswith(b"\n")
        for num, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                row = json.loads(line)
                self.verdicts[row["key"]] = row["verdict"]
            except (json.JSONDecodeError, KeyError, TypeError):
                warn_once(f"judge cache {self.path}: skipping unreadable line {num} (truncated write?)")
        log0("judge cache %s: %d verdicts loaded", self.path, len(self.verdicts))

    def get(self, key: str) -> str | None:
        return self.verdicts.get(key)

    def put(self, key: str, verdict: str, model: str) -> None:
        with self._lock:
            self.verdicts[key] = verdict
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Never glue a new row onto a truncated one; a failed append is cut back (a full disk: DiskFullError).
            atomic.append_text(self.path, "\n" * self._needs_newline
                               + json.dumps({"key": key, "verdict": verdict, "model": model}) + "\n")
            self._needs_newline = False


def _api_key() -> str:
    for name in KEY_VARS:
        if env(name):
            return env(name)
    raise RuntimeError(
        f"the judge is enabled (judge.enabled=true) but neither {KEY_VARS[0]} nor {KEY_VARS[1]} is set; "
        "export one of them with a Gemini API key, or set judge.enabled=false"
    )


def _is_api_error(exc: BaseException) -> bool:
    """A definite answer from the server that retrying cannot change (a 4xx other than 408/429, a redirect)."""
    return isinstance(exc, (HTTPStatusError, RedirectError))


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, HTTPStatusError):
        return exc.code in RETRY_CODES or 500 <= exc.code < 600
    return isinstance(exc, (TimeoutError, TransportError)) and not isinstance(exc, RedirectError)


def gemini_request(prompt: str, max_output_tokens: int, thinking_budget: int) -> dict:
    """The generateContent body for one prompt at temperature 0."""
    config: dict = {"temperature": 0.0, "maxOutputTokens": max_output_tokens}
    if thinking_budget >= 0:
        config["thinkingConfig"] = {"thinkingBudget": thinking_budget}
    return {"contents": [{"role": "user", "parts": [{"text": prompt}]}], "generationConfig": config}


def gemini_text(body) -> str | None:
    """The reply text of a generateContent response (its first candidate's non-thought text parts), None when
    there is none; a body of the wrong shape is a MalformedResponseError."""
    if not isinstance(body, dict):
        raise MalformedResponseError(f"expected a JSON object, got {type(body).__name__}")
    candidates = body.get("candidates") or []
    if not isinstance(candidates, list) or not candidates:
        return None
    content = candidates[0].get("content") if isinstance(candidates[0], dict) else None
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list):
        return None
    texts = [p["text"] for p in parts
             if isinstance(p, dict) and isinstance(p.get("text"), str) and not p.get("thought")]
    return "".join(texts) or None


class Judge:
    """Yes/no questions to Gemini with a concurrency limit, retries, a request budget and a disk cache."""

    def __init__(self, cfg: JudgeConfig):
        errs = cfg.check()
        if errs:
            raise ValueError("judge config: " + "; ".join(errs))
        self.cfg = cfg
        self._key = _api_key()
        self._url = f"{(cfg.base_url or GEMINI_URL).rstrip('/')}/v1beta/models/{cfg.model}:generateContent"
        self.cache = VerdictCache(cfg.cache_path)
        self.stats = JudgeStats()
        self._lock = threading.Lock()
        self._rng = random.Random(cfg.seed)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "<redacted>") if self._key else text

    def _reserve_request(self) -> bool:
        """Count one request against the budget; False when the budget is spent."""
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
        body = post_json(self._url, gemini_request(prompt, self.cfg.max_output_tokens, self.cfg.thinking_budget),
                         {"x-goog-api-key": self._key}, self.cfg.timeout_s)
        return gemini_text(body)  # None when the body has no candidates or no text part

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
            wait_s, error = 0.0, None
            try:
                text = self._send(prompt)
                reply = (text or "")[:200]
                verdict = parse_yes_no(text)
                if verdict is not None:
                    self.cache.put(key, verdict, self.cfg.model)
                    return Verdict(verdict, attempts=attempts, reply=reply)
                num_bad_replies += 1
                error = f"unparseable reply: {reply!r}"
            except ValueError as exc:  # MalformedResponseError: invalid JSON, too deep, too large, wrong shape
                num_bad_replies += 1
                error = f"malformed response: {type(exc).__name__}: {exc}"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if _is_retryable(exc):
                    wait_s = self._backoff_s(attempts)
                elif _is_api_error(exc):  # other 4xx: retrying cannot help
                    return Verdict("unjudged", attempts=attempts, error=self._redact(error)[:500], reply=reply)
                else:  # a bug, not a transient API problem
                    raise
            if num_bad_replies > 1 or attempts > self.cfg.max_retries:
                return Verdict("unjudged", attempts=attempts, error=self._redact(error)[:500], reply=reply)
            logger.debug("judge: retry %d after %s (wait %.2f s)", attempts, self._redact(error)[:200], wait_s)
            with self._lock:
                self.stats.num_retries += 1
            time.sleep(wait_s)

    def ask_many(self, prompts: list[str]) -> list[Verdict]:
        """Ask each yes/no prompt; identical prompts are sent once. Returns one Verdict per prompt, in order."""
        unique = list(dict.fromkeys(prompts))
        progress, answers = Progress(f"judge {self.cfg.model}", len(unique), "prompts"), []
        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency, thread_name_prefix="judge") as pool:
            for verdict in pool.map(self._ask_one, unique):  # in order, as they arrive: a line every 30 s or so
                answers.append(verdict)
                progress.update(1)
        by_prompt = dict(zip(unique, answers, strict=True))
        out = []
        for prompt in prompts:
            v = by_prompt[prompt]
            out.append(v)
            self.stats.num_items += 1
            self.stats.num_cache_hits += v.cached
            self.stats.num_yes += v.verdict == "yes"
            self.stats.num_no += v.verdict == "no"
            self.stats.num_unjudged += v.verdict == "unjudged"
        s = self.stats
        log0(
            "judge %s: %d items | yes %d no %d unjudged %d | %d requests, %d retries, %d cache hits%s",
            self.cfg.model, s.num_items, s.num_yes, s.num_no, s.num_unjudged, s.num_requests, s.num_retries,
            s.num_cache_hits, f", budget exhausted for {s.num_budget_exhausted}" if s.num_budget_exhausted else "",
        )
        return out

    def judge_many(self, items: list[tuple[str, str, str]]) -> list[Verdict]:
        """Does each response's reasoning support its final answer?

        Args:
            items: (question, reasoning, final answer) text triples, e.g. the question and the think and
                answer blocks of a self-distilled response.

        Returns:
            One Verdict per item, in order: "yes" (supported), "no", or "unjudged" (see `keep`).
        """
        return self.ask_many([SUPPORT_PROMPT.format(question=q, reasoning=r, answer=a) for q, r, a in items])

    def match_many(self, items: list[tuple[str, str, str]]) -> list[Verdict]:
        """Does each response's final answer match the reference? Items are (question, gold, response) triples;
        the evaluation asks this where an official benchmark pipeline asks an LLM (answer extraction, judging)."""
        return self.ask_many([MATCH_PROMPT.format(question=q, gold=g, response=r) for q, g, r in items])

    def keep(self, verdict: Verdict) -> bool:
        """Keep "yes", drop "no", and keep or drop "unjudged" per `on_unjudged`."""
        if verdict.verdict == "unjudged":
            return self.cfg.on_unjudged == "keep"
        return verdict.verdict == "yes"


def make_judge(cfg: JudgeConfig) -> Judge | None:
    """A Judge when `cfg.enabled`, else None (and no key is needed)."""
    return Judge(cfg) if cfg.enabled else None


__all__ = ["Judge", "JudgeConfig", "JudgeStats", "Verdict", "make_judge", "parse_yes_no", "MATCH_PROMPT",
           "SUPPORT_PROMPT"]

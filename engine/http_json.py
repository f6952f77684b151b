"""One JSON request over HTTP(S), with limits that a slow, hostile or broken server cannot get past.

`post_json(url, payload, headers, deadline_s)` is the transport of the LLM judges (engine/judge.py):
- a total deadline for the whole call (connect, send, headers, body), not a per-read timeout: a watchdog shuts the
  socket down when it passes, so a server dripping one byte at a time cannot hold the caller;
- a cap on the response size (`max_bytes`), checked while reading, so an endless (chunked) reply cannot grow us;
- no redirects: a 3xx is an error (RedirectError), so headers carrying an API key never go to another address;
- a parse that never raises anything but MalformedResponseError (invalid JSON or UTF-8, nesting deep enough to hit
  Python's recursion limit).
Errors: HTTPStatusError (a non-2xx reply, with its code and the body's message), RedirectError, RequestTimeoutError
and TransportError (connection problems) for the transport, MalformedResponseError (a ValueError) for the body.
HTTPS goes through $HTTPS_PROXY (a CONNECT tunnel) unless $NO_PROXY names the host.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from engine.env import env

MAX_RESPONSE_BYTES = 1 << 20
"""Default cap on a response body (a yes/no judge reply is about 2 KB)."""


class TransportError(Exception):
    """The request did not complete: connection refused or reset, DNS, TLS, ..."""


class RequestTimeoutError(TransportError):
    """No complete reply within the deadline."""


class RedirectError(TransportError):
    """The server answered with a redirect, which is not followed."""


class HTTPStatusError(Exception):
    """A complete reply with a non-2xx status."""

    def __init__(self, code: int, message: str):
        super().__init__(f"HTTP {code}: {message}")
        self.code = code


class MalformedResponseError(ValueError):
    """A 2xx reply whose body is not the JSON we can read (or is larger than the cap)."""


def parse_json(data: bytes) -> Any:
    """`data` as JSON; any failure (bad UTF-8, bad JSON, too deeply nested) is a MalformedResponseError."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedResponseError(f"invalid JSON: {e}") from None
    except RecursionError:
        raise MalformedResponseError("JSON nested too deeply") from None


def _proxy_for(host: str) -> tuple[str, int] | None:
    proxy = env("HTTPS_PROXY") or env("https_proxy")
    no_proxy = [h.strip().lstrip(".") for h in (env("NO_PROXY") or env("no_proxy")).split(",") if h.strip()]
    if not proxy or any(h == "*" or host == h or host.endswith("." + h) for h in no_proxy):
        return None
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parts.hostname or "", parts.port or 80


def _connection(url: str, timeout_s: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TransportError(f"unsupported URL {url!r}: need http:// or https://")
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "http":
        return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s), target
    proxy = _proxy_for(parts.hostname)
    ctx = ssl.create_default_context()
    if proxy is None:
        return http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout_s, context=ctx), target
    conn = http.client.HTTPSConnection(*proxy, timeout=timeout_s, context=ctx)
    conn.set_tunnel(parts.hostname, parts.port or 443)
    return conn, target


def _error_message(body: bytes) -> str:
    """The `error.message` of a JSON error body, or the body's start."""
    try:
        err = parse_json(body).get("error", {})
        return str(err.get("message") or err)[:300]
    except (MalformedResponseError, AttributeError):
        return body[:300].decode("utf-8", errors="replace")


def post_json(url: str, payload: Any, headers: dict[str, str], deadline_s: float,
              max_bytes: int = MAX_RESPONSE_BYTES) -> Any:
    """POST `payload` as JSON to `url` and return the JSON reply, all within `deadline_s` seconds."""
    body = json.dumps(payload).encode()
    conn, target = _connection(url, deadline_s)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # unblocks the reading thread at once
            except OSError:
                pass

    watchdog = threading.Timer(deadline_s, expire)
    watchdog.daemon = True
    start = time.monotonic()
    watchdog.start()
    try:
        conn.request("POST", target, body=body, headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        data = bytearray()
        while chunk := resp.read(min(65536, max_bytes + 1 - len(data))):
            data += chunk
            if len(data) > max_bytes:
                raise MalformedResponseError(f"reply larger than {max_bytes} bytes (cut off)")
        if expired.is_set():
            raise RequestTimeoutError(f"no complete reply within {deadline_s:g} s")
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set() or isinstance(e, TimeoutError):
            raise RequestTimeoutError(f"no complete reply within {deadline_s:g} s "
                                      f"({time.monotonic() - start:.1f} s)") from None
        raise TransportError(f"{type(e).__name__}: {e}") from None
    finally:
        watchdog.cancel()
        conn.close()
    if 300 <= resp.status < 400:
        raise RedirectError(f"HTTP {resp.status} redirect to {resp.getheader('Location')!r} refused: redirects are "
                            "not followed (the request's headers carry the API key); set the endpoint itself")
    if not 200 <= resp.status < 300:
        raise HTTPStatusError(resp.status, _error_message(bytes(data)))
    return parse_json(bytes(data))

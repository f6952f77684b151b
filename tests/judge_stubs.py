"""A loopback stub of an OpenAI-compatible chat-completions server, for the judge tests."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubOpenAI:
    """Answers `POST {prefix}/chat/completions` like an OpenAI-compatible server.

    Each prompt may carry a tag `[[name]]`; `scripts[name]` is the list of actions for its 1st, 2nd, ... request
    (the last one repeats). An action is ("text", reply), ("status", code[, body]), ("sleep", s, reply),
    ("raw", bytes) or ("redirect", location). Untagged prompts go to `decide(prompt) -> action` (default: "YES").
    """

    def __init__(self, prefix: str = "/v1"):
        self.prefix = prefix
        self.scripts: dict[str, list[tuple]] = {}
        self.decide = lambda prompt: ("text", "YES")
        self.calls: dict[str, int] = {}
        self.prompts: list[str] = []
        self.num_requests = 0
        self.in_flight = self.max_in_flight = 0
        self.auth_seen: set[str] = set()
        self.paths: set[str] = set()
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 -- http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                prompt = body["messages"][0]["content"]
                m = re.search(r"\[\[(\w+)\]\]", prompt)
                name = m.group(1) if m else ""
                with stub.lock:
                    stub.num_requests += 1
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    stub.auth_seen.add(self.headers.get("authorization", ""))
                    stub.paths.add(self.path)
                    stub.bodies.append(body)
                    stub.prompts.append(prompt)
                    i = stub.calls.get(name, 0)
                    stub.calls[name] = i + 1
                try:
                    if name in stub.scripts:
                        script = stub.scripts[name]
                        action = script[min(i, len(script) - 1)]
                    else:
                        action = stub.decide(prompt)
                    self._act(action)
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def _act(self, action):
                kind, code, headers = action[0], 200, {}
                if kind == "sleep":
                    time.sleep(action[1])
                    kind, action = "text", ("text", action[2])
                if kind == "text":
                    out = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": action[1]},
                         "finish_reason": "stop"}]}).encode()
                elif kind == "status":
                    code = action[1]
                    err = action[2] if len(action) > 2 else {"error": {"message": "stub", "type": "x", "code": code}}
                    out = json.dumps(err).encode()
                elif kind == "redirect":
                    code, out, headers = 307, b"", {"Location": action[1]}
                else:
                    out = action[1]
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(out)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}{prefix}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

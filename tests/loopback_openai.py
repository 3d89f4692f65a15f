"""A chat-completions server on loopback, shared by the HTTP sampler's unit tests and the `r1lab
sample` / `r1lab distill` integration tests (importable because pytest puts tests/, the directory of
the root conftest, on sys.path).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def ok_body(body: dict, reasoning: str | None = "2+2 is 4", content: str = "\\boxed{4}") -> dict:
    """A well-formed chat completion with as many choices as the request's n (DeepSeek-style reasoning)."""
    n = body.get("n", 1)
    msg = {"role": "assistant", "content": content}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    choices = [{"index": i, "message": msg, "finish_reason": "stop"} for i in range(n)]
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": choices,
        "usage": {"completion_tokens": 10 * n},
    }


class FakeOpenAI:
    """A threaded loopback server; `behave(body, call_number)` picks each response.

    A behaviour is one of: ("json", status, obj, headers), ("raw", status, text), ("hang", seconds),
    ("drop",) which closes the connection without answering.
    """

    def __init__(self, behave: Callable[[dict, int], tuple]):
        self.behave = behave
        self.calls: list[tuple[float, dict, str | None]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = threading.Event()  # set at teardown so hung handlers end
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    number = len(server.calls)
                    server.calls.append((time.monotonic(), body, self.headers.get("Authorization")))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(server.behave(body, number))
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, action: tuple):
                kind = action[0]
                if kind == "hang":
                    server.release.wait(action[1])
                    return
                if kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, payload = action[1], action[2]
                data = (json.dumps(payload) if kind == "json" else payload).encode()
                self.send_response(status)
                for k, v in (action[3] if kind == "json" and len(action) > 3 else {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

"""Run the server in a background thread of this process (tests, benchmarks, notebooks).

    with serve_in_thread(app) as base_url:      # e.g. "http://127.0.0.1:53121"
        OpenAI(base_url=base_url + "/v1", api_key="x").models.list()

It binds 127.0.0.1 on a free port (bound before uvicorn starts, so nobody can take it in between),
waits until uvicorn accepts connections (and the engine worker has started), and shuts both down on
exit.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(
    app, host: str = "127.0.0.1", port: int | None = None, start_timeout: float = 30.0
) -> Iterator[str]:
    # Bound here and handed to uvicorn: a port picked first and bound later could be taken between.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port or 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="r1lab-serve-http", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

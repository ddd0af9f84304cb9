"""The app on a real socket in a background thread: tests and benchmarks/screenshot_serve.py talk to it
over loopback exactly as a browser or curl would.

    with running(app) as base_url:       # "http://127.0.0.1:<free port>"
        httpx.get(base_url + "/health")
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

STARTUP_TIMEOUT_S = 30.0
POLL_S = 0.02
GRACEFUL_S = 3  # open caption streams (SSE, WebSocket) are cut after this at shutdown


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def running(app, host: str = "127.0.0.1", port: int | None = None, verbose: bool = False) -> Iterator[str]:
    """Serve ``app`` with uvicorn until the block exits (lifespan included); yields the base URL."""
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info" if verbose else "warning",
                                           access_log=verbose, lifespan="on",
                                           timeout_graceful_shutdown=GRACEFUL_S))
    thread = threading.Thread(target=server.run, name="favor-serve-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(POLL_S)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(STARTUP_TIMEOUT_S)

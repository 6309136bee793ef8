"""A real uvicorn server on 127.0.0.1 in a background thread, for tests and benchmarks.

with serve_in_thread(Settings(model_dir=...)) as (base_url, server):
    httpx.get(f"{base_url}/v1/models")
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from service.config import Settings
from service.server import FlashServer, build_server


@contextmanager
def serve_in_thread(settings: Settings, ready_timeout: float = 60.0) -> Iterator[tuple[str, FlashServer]]:
    """Bind a free port, serve until the block ends, wait for /health/ready first."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build_server(settings.model_copy(update={"host": "127.0.0.1", "port": port}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, ready_timeout, thread)
        yield base_url, server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_ready(base_url: str, timeout: float, thread: threading.Thread | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the server thread exited before it was ready")
        try:
            r = httpx.get(f"{base_url}/health/ready", timeout=5)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.TransportError as e:
            last = repr(e)
        time.sleep(0.05)
    raise TimeoutError(f"{base_url} not ready after {timeout} s: {last}")

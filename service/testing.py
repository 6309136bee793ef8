"""Real servers on 127.0.0.1 for tests and benchmarks: in a background thread
(`serve_in_thread`) or as its own process (`serve_in_process`, `python -m service`).

with serve_in_thread(Settings(model_dir=...)) as (base_url, server):
    httpx.get(f"{base_url}/v1/models")
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_process(
    model: Path, env: dict[str, str] | None = None, timeout: float = 300,
    command: Callable[[int], list[str]] | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m service --model MODEL` on a free loopback port (FLASH_* overrides in `env`),
    or `command(port)` instead (a server that wraps the service and binds 127.0.0.1:port);
    yields (url, process) once /health/ready is 200; SIGTERM (drain) at the end."""
    port = free_port()
    if command is not None:
        cmd = command(port)
    else:
        cmd = [sys.executable, "-m", "service", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready after {timeout} s")
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

"""Backpressure and failures: 429 when the queue is full, 504 past the deadline, a failing
batch that fails only its own requests, clients that hang up, and SIGTERM draining."""

import asyncio
import signal
import socket
import threading
import time

import httpx
import pytest
import torch

from flash.tiny import write_tiny_family
from service.config import Settings
from service.testing import serve_in_thread


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_tiny_family(tmp_path_factory.mktemp("service_bp") / "tiny")


@pytest.fixture(scope="module")
def server(family):
    settings = Settings(
        model_dir=family,
        queue_size=1,
        max_batch_size=1,
        max_wait_ms=0,
        request_timeout_s=1.0,
        log_level="warning",
    )
    with serve_in_thread(settings) as (url, srv):
        yield url, srv.config.app


class Patched:
    """Swap a student's U-Net call for a slow, failing or NaN one; counts the calls."""

    def __init__(self, app, steps, monkeypatch):
        self.backend = app.state.engine.models.students[steps].backend
        self.real, self.calls = self.backend.denoise, 0
        self.delay, self.error, self.nan = 0.0, None, False
        monkeypatch.setattr(self.backend, "denoise", self)

    def __call__(self, x, t, cond):
        self.calls += 1
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        out = self.real(x, t, cond)
        return torch.full_like(out, float("nan")) if self.nan else out


def body(steps=3, **kw):
    return {"prompt": "a shape", "model": f"flash-{steps}step", "seed": 1, **kw}


def counter(app, name, reason):
    app.state.metrics.flush()
    return app.state.metrics.registry.get_sample_value(name, {"reason": reason}) or 0.0


def test_a_full_queue_answers_429_with_retry_after(server, monkeypatch):
    url, app = server
    patched = Patched(app, 3, monkeypatch)
    patched.delay = 0.05

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            first = asyncio.create_task(c.post("/v1/images/generations", json=body(seed=0)))
            while patched.calls == 0:  # the device holds the first request; the queue (size 1) is empty
                await asyncio.sleep(0.005)
            rest = await asyncio.gather(*[c.post("/v1/images/generations", json=body(seed=i)) for i in range(1, 8)])
            return [await first, *rest]

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    # the running request and the one queued behind it succeed; the other six find the queue full
    assert codes[0] == 200 and sorted(codes[1:]) == [200] + [429] * 6, codes
    full = next(r for r in responses if r.status_code == 429)
    assert full.headers["retry-after"] == "1"
    assert full.json()["error"]["code"] == "queue_full" and full.json()["error"]["type"] == "rate_limit_error"
    assert counter(app, "flash_requests_rejected_total", "queue_full") == codes.count(429)


def test_a_request_past_its_deadline_gets_504_and_the_next_one_succeeds(server, monkeypatch):
    url, app = server
    slow = Patched(app, 3, monkeypatch)
    slow.delay = 0.7  # 3 steps: 2.1 s against a 1 s deadline
    start = time.monotonic()
    r = httpx.post(f"{url}/v1/images/generations", json=body(), timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - start < 1.6  # answered at the deadline, not when the work would end
    slow.delay = 0.0
    time.sleep(0.9)  # the step in progress ends; the abandoned job is dropped before the next one
    assert httpx.post(f"{url}/v1/images/generations", json=body(), timeout=30).status_code == 200


@pytest.mark.parametrize("failure", ["exception", "non_finite"])
def test_a_failing_batch_fails_only_its_own_requests(server, monkeypatch, failure):
    url, app = server
    broken = Patched(app, 3, monkeypatch)
    broken.delay = 0.2
    if failure == "exception":
        broken.error = RuntimeError("CUDA error: device-side assert")
    else:
        broken.nan = True
    before = counter(app, "flash_requests_failed_total", failure)

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            bad = asyncio.ensure_future(c.post("/v1/images/generations", json=body(3)))
            while broken.calls == 0:
                await asyncio.sleep(0.005)
            other = await c.post("/v1/images/generations", json=body(1))  # queued behind the failing call
            return await bad, other

    bad, other = asyncio.run(go())
    assert other.status_code == 200
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["code"] == "generation_failed" and error["type"] == "server_error"
    assert ("device-side assert" if failure == "exception" else "non-finite") in error["message"]
    assert counter(app, "flash_requests_failed_total", failure) == before + 1
    broken.error, broken.nan, broken.delay = None, False, 0.0
    r = httpx.post(f"{url}/v1/images/generations", json=body(3), timeout=30)
    assert r.status_code == 200  # the device thread survived


def test_a_client_that_hangs_up_is_dropped_from_the_queue(server, monkeypatch):
    url, app = server
    slow = Patched(app, 3, monkeypatch)
    slow.delay = 0.15
    port = int(url.rsplit(":", 1)[1])
    dropped = app.state.engine.batcher.stats.dropped

    first = threading.Thread(
        target=httpx.post, args=(f"{url}/v1/images/generations",), kwargs={"json": body()}
    )
    first.start()
    while slow.calls == 0:  # the device is busy with the first request
        time.sleep(0.005)
    payload = b'{"prompt": "never mind", "model": "flash-3step"}'
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        time.sleep(0.1)  # queued behind the first one; then hang up
    first.join(timeout=30)
    time.sleep(0.3)
    assert counter(app, "flash_requests_rejected_total", "client_disconnected") == 1
    assert app.state.engine.batcher.stats.dropped == dropped + 1
    assert slow.calls == 3  # only the first request's three steps ran


def test_sigterm_stops_accepting_and_finishes_in_flight_work(family, monkeypatch):
    settings = Settings(model_dir=family, log_level="warning", drain_timeout_s=10)
    with serve_in_thread(settings) as (url, srv):
        app = srv.config.app
        slow = Patched(app, 3, monkeypatch)
        slow.delay = 0.2
        result = {}
        worker = threading.Thread(
            target=lambda: result.update(
                r=httpx.post(f"{url}/v1/images/generations", json=body(), timeout=30)
            )
        )
        worker.start()
        while slow.calls == 0:
            time.sleep(0.005)
        srv.handle_exit(signal.SIGTERM, None)
        engine = app.state.engine
        assert engine.draining
        worker.join(timeout=30)
        assert result["r"].status_code == 200  # the in-flight request finished
        deadline = time.monotonic() + 10
        while engine.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.alive  # then the device thread stopped
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health/live", timeout=2)

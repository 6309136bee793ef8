"""Faults and bad input not covered elsewhere (the full list is in docs/reliability.md):
a client that hangs up mid-trajectory leaks nothing, reloads of folders with missing
weights keep the old version, a broken family is refused at start with a clear message,
kill -9 then a restart on the same port, a real SIGTERM drains a real process, and
malformed requests by hand. The other faults are in test_service_backpressure.py and
test_service_ops.py."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from flash.tiny import write_tiny_family
from service import errors
from service.app import create_app
from service.config import Settings
from service.routes import until_disconnect
from service.testing import serve_in_thread, wait_ready

ROOT = Path(__file__).resolve().parents[1]
GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_tiny_family(tmp_path_factory.mktemp("reliability") / "tiny")


@pytest.fixture(scope="module")
def server(family):
    settings = Settings(model_dir=family, admin_token="adm", max_batch_size=4, log_level="error")
    with serve_in_thread(settings) as (url, srv):
        yield url, srv


def assert_error(r, status, code=None, *needles):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    for needle in needles:
        assert needle in body["error"]["message"], body["error"]["message"]
    return body["error"]


def counter(app, name, **labels):
    app.state.metrics.flush()
    return app.state.metrics.registry.get_sample_value(name, labels) or 0.0


def tasks_on(srv) -> int:
    """Tasks alive on the server's event loop (the one counting excluded)."""

    async def count():
        return len(asyncio.all_tasks()) - 1

    return asyncio.run_coroutine_threadsafe(count(), srv._loop).result(timeout=10)


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


# -- a client that disconnects mid-request ------------------------------------------------------


def test_a_client_that_hangs_up_mid_trajectory_leaks_nothing(server, monkeypatch):
    url, srv = server
    app, port = srv.config.app, int(url.rsplit(":", 1)[1])
    engine = app.state.engine
    backend = engine.models.students[3].backend
    real, calls = backend.denoise, []

    def slow(x, t, cond):
        calls.append(len(x))
        time.sleep(0.25)
        return real(x, t, cond)

    monkeypatch.setattr(backend, "denoise", slow)
    httpx.post(f"{url}{GEN}", json={"prompt": "warm", "model": "flash-3step"}, timeout=30)  # steady state
    tasks, threads = tasks_on(srv), threading.active_count()
    gone = counter(app, "flash_requests_rejected_total", reason="client_disconnected")

    for round_ in range(3):
        calls.clear()
        payload = b'{"prompt": "hang up", "model": "flash-3step", "n": 2}'
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            wait_until(lambda: len(calls) >= 1, what="the first U-Net call")  # mid-trajectory now
        wait_until(lambda: not engine.batcher.has_work(), what="the batcher to drop the job")
        assert len(calls) < 3, f"round {round_}: all three steps ran for a client that had left"
        assert engine.pending() == 0 and engine._in_flight == 0
        assert not engine.batcher.waiting and not engine.batcher.groups

    wait_until(lambda: tasks_on(srv) <= tasks, what="request tasks to end")
    assert threading.active_count() == threads
    assert counter(app, "flash_requests_rejected_total", reason="client_disconnected") == gone + 3
    assert counter(app, "flash_pending_requests") == 0
    r = httpx.post(f"{url}{GEN}", json={"prompt": "still fine", "model": "flash-3step"}, timeout=30)
    assert r.status_code == 200


# The watch itself (routes.until_disconnect): one task per request, whose callback cancels the handler.


class FakeRequest:
    """`receive()` reports a disconnect once `hang_up` is set."""

    def __init__(self):
        self.hang_up = asyncio.Event()

    async def receive(self):
        await self.hang_up.wait()
        return {"type": "http.disconnect"}


def test_the_result_comes_back_and_a_later_hang_up_cancels_nothing():
    async def main():
        request = FakeRequest()
        result = await until_disconnect(request, asyncio.sleep(0.01, result="done"))
        request.hang_up.set()  # after the answer: must not cancel this task
        await asyncio.sleep(0.02)
        return result, asyncio.current_task().cancelling()

    assert asyncio.run(main()) == ("done", 0)


def test_a_hang_up_cancels_the_work_and_raises_client_gone():
    async def main():
        request, cancelled = FakeRequest(), asyncio.Event()

        async def work():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        asyncio.get_running_loop().call_later(0.01, request.hang_up.set)
        with pytest.raises(errors.ClientGone):
            await until_disconnect(request, work())
        assert cancelled.is_set()
        assert asyncio.current_task().cancelling() == 0  # our own cancel is taken back
        await asyncio.sleep(0.01)  # and the task goes on without a stray cancellation

    asyncio.run(main())


def test_a_cancel_from_elsewhere_stays_a_cancel():
    async def main():
        task = asyncio.ensure_future(until_disconnect(FakeRequest(), asyncio.sleep(10)))
        await asyncio.sleep(0.01)
        task.cancel()  # e.g. the server shutting down: not a client that left
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


# -- broken model folders ----------------------------------------------------------------------


@pytest.mark.parametrize("breakage", ["weights_removed", "folder_missing", "student_folder_emptied"])
def test_reload_with_missing_weights_keeps_the_old_version(server, family, tmp_path, breakage):
    url, _ = server
    admin = {"Authorization": "Bearer adm"}
    broken = tmp_path / "broken"
    if breakage == "folder_missing":
        needle = "not a diffusers text-to-image folder"
    else:
        shutil.copytree(family, broken)
        if breakage == "weights_removed":
            (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
            needle = "has no .safetensors weights"
        else:
            shutil.rmtree(broken / "students" / "2-step")
            (broken / "students" / "2-step").mkdir()
            (broken / "students" / "2-step" / "flash.json").write_text("{}")
            needle = "invalid"
    before = httpx.get(f"{url}/health/ready", timeout=10).json()["version"]
    r = httpx.post(f"{url}/admin/reload", json={"model_dir": str(broken)}, headers=admin, timeout=120)
    error = assert_error(r, 422, "reload_failed", needle, f"still serving version {before}")
    assert "Traceback" not in error["message"]
    status = httpx.get(f"{url}/admin/reload", headers=admin, timeout=10).json()
    assert status["state"] == "failed" and needle in status["error"]
    assert httpx.get(f"{url}/health/ready", timeout=10).json() == {"status": "ready", "version": before}
    assert httpx.post(f"{url}{GEN}", json={"prompt": "old model"}, timeout=60).status_code == 200


@pytest.mark.parametrize("body", [b"null", b"[]", b'{"wait": "later"}'])
def test_reload_refuses_a_body_that_is_not_its_object(server, body):
    url, _ = server
    admin = {"Authorization": "Bearer adm", **JSON}
    before = httpx.get(f"{url}/health/ready", timeout=10).json()["version"]
    assert_error(httpx.post(f"{url}/admin/reload", content=body, headers=admin, timeout=30), 422, "invalid_value")
    assert httpx.get(f"{url}/health/ready", timeout=10).json() == {"status": "ready", "version": before}


@pytest.mark.parametrize("breakage", ["pickle", "truncated"])
def test_a_broken_family_is_refused_at_start_with_a_clear_message(family, tmp_path, breakage):
    broken = tmp_path / "broken"
    shutil.copytree(family, broken)
    unet = broken / "unet" / "diffusion_pytorch_model.safetensors"
    if breakage == "pickle":
        unet.unlink()
        (broken / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickled")
        needle = "holds pickled weights (diffusion_pytorch_model.bin); only safetensors are loaded"
    else:
        unet.write_bytes(unet.read_bytes()[:1000])
        needle = "corrupt or truncated weights file"
    app = create_app(Settings(model_dir=broken, log_level="critical"))

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                deadline = time.monotonic() + 30
                while app.state.engine.load_error is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                return await c.get("/health/ready"), await c.post(GEN, json={"prompt": "x"})

    ready, gen = asyncio.run(go())
    assert_error(ready, 503, "not_ready", needle)
    assert_error(gen, 503, "not_ready", needle)


# -- bad input by hand -------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "body, headers, status, code, needle",
    [
        (b"", JSON, 422, "invalid_value", "JSON"),
        (b'{"prompt": ""}', JSON, 422, "invalid_value", "not blank"),
        (b'{"prompt": " \\t\\n\\u3000 "}', JSON, 422, "invalid_value", "not blank"),
        (b'{"prompt": "' + b"x" * 5000 + b'"}', JSON, 422, "invalid_value", "got 5000"),
        (b'{"prompt": "' + b"x" * 100_000 + b'"}', JSON, 413, "request_too_large", "byte limit"),
        (b'{"prompt": "caf\xe9 \xff\xfe"}', JSON, 422, "invalid_value", "JSON"),
        (b"\xff\xfe{\x00", JSON, 422, "invalid_value", "JSON"),
        (b'{"prompt": "\\ud800"}', JSON, 422, "invalid_value", "JSON"),
        (b'{"prompt": "x", "model": "teacher", "guidance_scale": NaN}', JSON, 422, None, "finite"),
        (b'{"prompt": "x", "model": "teacher", "guidance_scale": Infinity}', JSON, 422, None, "finite"),
        (b'{"prompt": "x", "model": "teacher", "guidance_scale": -1}', JSON, 422, None, "greater than"),
        (b'{"prompt": "x", "n": -3}', JSON, 422, "invalid_value", "allowed: 1 to 4"),
        (b'{"prompt": "x", "n": 1e308}', JSON, 422, "invalid_value", "n"),
        (b'{"prompt": "x", "n": 2.5}', JSON, 422, "invalid_value", "n"),
        (b'{"prompt": "x", "steps": 99999999999999999999999}', JSON, 422, "invalid_value", "steps"),
        (b'{"prompt": "x", "seed": 1e400}', JSON, 422, "invalid_value", "finite"),
        (b'{"prompt": "x", "seed": 18446744073709551616}', JSON, 422, "invalid_value", "less than"),
        (b'{"prompt": "x", "seed": NaN}', JSON, 422, "invalid_value", "seed"),
        (b'{"prompt": 42}', JSON, 422, "invalid_value", "string"),
        (b"[" * 5000, JSON, 422, "invalid_value", "JSON"),
        (b'["prompt"]', JSON, 422, "invalid_value", None),
        (b"null", JSON, 422, "invalid_value", None),
        (
            b"prompt=x",
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
            "unsupported_media_type",
            "application/json",
        ),
        (b'{"prompt": "x"}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type", "text/plain"),
        (
            b'{"prompt": "x"}',
            {"Content-Type": "multipart/form-data; boundary=x"},
            415,
            "unsupported_media_type",
            None,
        ),
    ],
)
def test_bad_input_gets_a_4xx_in_the_error_shape(server, body, headers, status, code, needle):
    url, _ = server
    r = httpx.post(f"{url}{GEN}", content=body, headers=headers, timeout=30)
    assert_error(r, status, code, *([needle] if needle else []))


def test_odd_but_valid_prompts_generate(server):
    url, _ = server
    for prompt in ["a\x00b", "🦊" * 200, "\u202e reversed", "x" * 1000, "<script>alert(1)</script>"]:
        r = httpx.post(f"{url}{GEN}", json={"prompt": prompt, "model": "flash-1step"}, timeout=60)
        assert r.status_code == 200, (prompt[:20], r.text)
    assert math.isfinite(r.json()["timings"]["total_ms"])


# -- the load test script, briefly -------------------------------------------------------------


def test_the_load_test_runs_briefly_and_refuses_other_hosts(server, tmp_path, load_bench):
    """Two seconds, eight clients: the full figures come from `bench/load_test.py` itself."""
    url, _ = server
    lt = load_bench("load_test")
    out = tmp_path / "report.json"
    argv = ["--url", url, "--pid", str(os.getpid()), "--clients", "8", "--duration", "2"]
    assert lt.main([*argv, "--mix", "flash-1step=1,flash-3step=1,teacher:2=1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["requests"] == report["completed"] > 0 and report["statuses"].keys() == {"200"}
    assert set(report["latency_ms"]) >= {"p50", "p95", "p99"} and report["rss_growth"] is not None
    assert [e.steps for e in lt.parse_mix("flash-1step=2,teacher:4")] == [None, 4]
    for host in ("http://10.0.0.1:8000", "http://example.com", "http://192.168.1.2"):
        with pytest.raises(SystemExit, match="only loopback"):
            lt.require_loopback(host)
    lt.require_loopback("http://[::1]:8000")


# -- real processes: SIGTERM, kill -9, restart on the same port --------------------------------


def start(family: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--model",
        str(family),
        "--port",
        str(port),
        "--log-level",
        "error",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLASH_DRAIN_TIMEOUT_S": "20"}
    with log.open("ab") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pending(url: str) -> float:
    m = re.search(r"^flash_pending_requests (\S+)$", httpx.get(f"{url}/metrics", timeout=10).text, re.M)
    return float(m[1]) if m else 0.0


def teacher(guidance: float) -> dict:
    """About 0.7 s of work on the tiny family; different guidance scales never share a batch."""
    return {"prompt": "in flight", "model": "teacher", "steps": 100, "guidance_scale": guidance, "seed": 1}


@pytest.mark.timeout(180)
def test_kill_9_then_a_clean_restart_on_the_same_port_then_sigterm_drains(family, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    procs = []
    try:
        # 1. kill -9 with requests in flight: their clients see a transport error, not a hang.
        # Three requests that cannot share a batch; the kill comes once one of them is seen
        # waiting, so at least that one is unanswered however fast the machine is.
        procs.append(first := start(family, port, log))
        wait_ready(url, 120)
        outcomes = []

        def doomed(guidance: float):
            try:
                outcomes.append(httpx.post(f"{url}{GEN}", json=teacher(guidance), timeout=60).status_code)
            except httpx.TransportError as e:
                outcomes.append(type(e).__name__)

        victims = [threading.Thread(target=doomed, args=(g,)) for g in (1.0, 1.25, 1.5)]
        for v in victims:
            v.start()
        wait_until(lambda: pending(url) >= 1, timeout=30, what="a request waiting for the device")
        first.kill()
        assert first.wait(timeout=10) == -signal.SIGKILL
        for v in victims:
            v.join(timeout=30)
        assert not any(v.is_alive() for v in victims), "a client hung after kill -9"
        assert len(outcomes) == 3 and all(o == 200 or isinstance(o, str) for o in outcomes), outcomes
        assert any(isinstance(o, str) for o in outcomes), outcomes  # the waiting one got an error

        # 2. A new process binds the same port at once, serves, and starts from a clean slate.
        procs.append(second := start(family, port, log))
        wait_ready(url, 120)
        r = httpx.post(f"{url}{GEN}", json={"prompt": "after the crash", "seed": 2}, timeout=60)
        assert r.status_code == 200
        assert "flash_pending_requests 0.0" in httpx.get(f"{url}/metrics", timeout=10).text

        # 3. A real SIGTERM with three requests in flight: all finish with 200, then it exits.
        results = []
        workers = [
            threading.Thread(
                target=lambda g=g: results.append(httpx.post(f"{url}{GEN}", json=teacher(g), timeout=60))
            )
            for g in (1.5, 2.5, 3.5)
        ]
        for w in workers:
            w.start()
        wait_until(lambda: pending(url) >= 2, timeout=30, what="two requests waiting behind the first")
        second.send_signal(signal.SIGTERM)
        in_flight = 3 - len(results)
        for w in workers:
            w.join(timeout=60)
        assert in_flight >= 2 and [r.status_code for r in results] == [200, 200, 200]
        assert second.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health/live", timeout=2)
        assert "Traceback" not in log.read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)

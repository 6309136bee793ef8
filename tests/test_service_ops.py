"""Operations: the official openai client, API keys, admin reload (good and broken folders,
SIGHUP), and a Prometheus exposition that `promtool check metrics` accepts."""

import asyncio
import base64
import io
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from flash.models import FamilyCard, write_card
from flash.tiny import write_tiny_family
from service.app import create_app
from service.config import Settings
from service.testing import serve_in_thread

KEY, ADMIN = "sk-test-key", "admin-secret"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_tiny_family(tmp_path_factory.mktemp("service_ops") / "tiny")


@pytest.fixture(scope="module")
def server(family):
    settings = Settings(model_dir=family, api_keys=[KEY], admin_token=ADMIN, log_level="warning")
    with serve_in_thread(settings) as (url, srv):
        yield url, srv


def auth(token=KEY):
    return {"Authorization": f"Bearer {token}"}


def reload(url, token=ADMIN, **body):
    headers = auth(token) if token else {}
    return httpx.post(f"{url}/admin/reload", json=body, headers=headers, timeout=120)


def served_version(url):
    return httpx.get(f"{url}/v1/models", headers=auth(), timeout=10).json()["version"]


def generate_ok(url):
    r = httpx.post(
        f"{url}/v1/images/generations", json={"prompt": "still here", "seed": 1}, headers=auth(), timeout=60
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_the_official_openai_client_works(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    result = client.images.generate(
        model="flash",
        prompt="a red circle",
        response_format="b64_json",
        size="32x32",
        extra_body={"steps": 2},
    )
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "PNG" and image.size == (32, 32)
    assert result.model_extra["steps"] == 2 and result.model_extra["model"] == "flash-2step"
    assert len(result.model_extra["seeds"]) == 1

    two = client.images.generate(model="flash-1step", prompt="two", n=2, extra_body={"seed": 40})
    assert len(two.data) == 2 and two.model_extra["seeds"] == [40, 41]
    assert {m.id for m in client.models.list()} >= {"flash-1step", "flash-2step", "flash-3step", "teacher"}

    with pytest.raises(openai.UnprocessableEntityError, match="allowed: flash, flash-1step"):
        client.images.generate(model="dall-e-3", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")


def test_admin_endpoints_need_the_admin_token(server, family):
    url, _ = server
    assert reload(url, token=None).status_code == 401
    assert reload(url, token=KEY).status_code == 401  # an API key is not the admin token
    r = httpx.get(f"{url}/admin/reload", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

    disabled = create_app(Settings(model_dir=family))  # no admin token configured

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=disabled), base_url="http://t") as c:
            return await c.post("/admin/reload", headers=auth(ADMIN))

    r = asyncio.run(go())
    assert r.status_code == 403 and "FLASH_ADMIN_TOKEN" in r.json()["error"]["message"]


def test_reload_swaps_in_a_new_version(server, tmp_path):
    url, _ = server
    new = write_tiny_family(tmp_path / "v2", seed=1)
    write_card(new, FamilyCard(name="tiny", version="tiny-1"))
    before = served_version(url)
    r = reload(url, model_dir=str(new))
    assert r.status_code == 200, r.text
    assert r.json() == {"state": "ok", "version": "tiny-1", "model_dir": str(new), "error": None}
    assert before != "tiny-1" and served_version(url) == "tiny-1"
    assert generate_ok(url)["version"] == "tiny-1"
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'version="tiny-1"' in metrics


@pytest.mark.parametrize("breakage", ["pickle", "truncated"])
def test_reload_of_a_broken_folder_keeps_serving_the_old_version(server, family, tmp_path, breakage):
    url, _ = server
    broken = tmp_path / "broken"
    shutil.copytree(family, broken)
    if breakage == "pickle":
        (broken / "students" / "2-step" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickled")
        needle = "pickled weights"
    else:
        weights = broken / "students" / "1-step" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        needle = "truncated"
    before = served_version(url)
    r = reload(url, model_dir=str(broken))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "reload_failed" and needle in error["message"]
    assert f"still serving version {before}" in error["message"]
    assert served_version(url) == before
    generate_ok(url)
    status = httpx.get(f"{url}/admin/reload", headers=auth(ADMIN), timeout=10).json()
    assert status["state"] == "failed" and needle in status["error"] and status["version"] == before


def wait_reload_done(url, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/admin/reload", headers=auth(ADMIN), timeout=10).json()
        if status["state"] in ("ok", "failed"):
            return status
        time.sleep(0.05)
    raise TimeoutError("reload did not finish")


def test_reload_in_the_background_and_on_sighup(server, family):
    url, srv = server
    r = reload(url, model_dir=str(family), wait=False)
    assert r.status_code == 202 and r.json()["state"] == "loading"
    assert wait_reload_done(url) == {
        "state": "ok",
        "version": "tiny-0",
        "model_dir": str(family),
        "error": None,
    }

    # SIGHUP reaches the server's handler on the main thread in production; call it directly
    # here (the test server runs in a thread, where signals cannot be installed).
    srv._on_sighup(signal.SIGHUP, None)
    time.sleep(0.1)
    assert wait_reload_done(url)["state"] == "ok"
    generate_ok(url)


def test_metrics_pass_promtool(server):
    url, _ = server
    generate_ok(url)
    httpx.post(f"{url}/v1/images/generations", json={"prompt": ""}, headers=auth(), timeout=10)  # a rejection
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'flash_requests_rejected_total{reason="invalid"}' in text
    assert 'flash_requests_rejected_total{reason="unauthorized"}' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); the exposition was not linted")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
        check.stdout + check.stderr
    )


def test_models_load_on_a_thread_that_exits(family):
    """Loading on a pooled thread (asyncio.to_thread) would keep an OpenMP team alive next to the
    device thread's, and libgomp then stops spinning: 2x per U-Net step on 2 cores."""
    from service.engine import in_own_thread, load_model_set

    seen = []

    def loader(settings, path):
        seen.append(threading.current_thread())
        return load_model_set(settings, path)

    async def run():
        models = await in_own_thread(loader, Settings(model_dir=family), family)
        with pytest.raises(ValueError, match="boom"):
            await in_own_thread(lambda: (_ for _ in ()).throw(ValueError("boom")))
        return models

    assert asyncio.run(run()).students
    (thread,) = seen
    thread.join(timeout=10)
    assert thread.name == "flash-loader" and thread is not threading.main_thread() and not thread.is_alive()


def test_service_timeline_bench_marks_every_stage_of_a_request(load_bench, tmp_path):
    """bench/service_timeline.py: the service in its own process with time marks, one client."""
    fam = write_tiny_family(tmp_path / "fam")
    bench = load_bench("service_timeline")
    out = bench.main(["--model", str(fam), "--requests", "24"])
    assert out["n"] == 4 and len(out["parts_ms"]) == len(bench.MARKS) + 1
    parts = list(out["parts_ms"].values())
    # the last part can be ~0 or below: the server marks "body sent" when its send returns, and the
    # client, on the other core, may hold the bytes by then
    assert all(v > 0 for v in parts[:-1])
    assert 0 < out["generation_ms"] < out["total_ms"]  # the marks bracket the generation, the client the whole


def test_bench_service_takes_its_compared_latencies_in_turns(load_bench, monkeypatch):
    """The p50 ratio's two sides alternate request by request (and which goes first), so a
    machine that slows down for a minute slows both; so do the teacher's and the student's."""
    bench = load_bench("bench_service")
    order, sent = [], []

    async def senders(url, k, stack):
        async def send(payload):
            order.append(("http", payload["seed"]))
            sent.append((payload["model"], payload.get("steps")))
            return 200, json.dumps({"timings": {"compute_ms": 1.5 + payload["seed"]}}).encode()

        return [send] * k

    monkeypatch.setitem(bench.CLIENTS, "fake", senders)
    out = bench.paired_latencies("http://test", 4, "fake", lambda ids: order.append(("local", *ids)), 0)
    assert order == [("http", 0), ("local", 0), ("local", 1), ("http", 1),
                     ("http", 2), ("local", 2), ("local", 3), ("http", 3)]  # fmt: skip
    assert len(out.http) == len(out.local) == 4 and min(out.http + out.local) >= 0
    assert out.server_compute == [0.0015, 0.0025, 0.0035, 0.0045]  # each response's own timings, in s

    sent.clear()
    teacher, student = bench.teacher_and_student_latencies("http://test", 3, "fake", 0)
    assert [m for m, _ in sent] == ["teacher", "flash-3step", "flash-3step", "teacher", "teacher", "flash-3step"]
    assert {steps for m, steps in sent if m == "teacher"} == {25} and len(teacher) == len(student) == 3


def recording_senders(sent: list):
    """A fake bench client: every request's (model, steps, seed) goes to `sent`, answered 200."""

    async def senders(url, k, stack):
        async def send(payload):
            sent.append((payload["model"], payload.get("steps"), payload["seed"]))
            return 200, b"{}"

        return [send] * k

    return senders


def test_bench_service_times_the_teacher_under_load_with_teacher_requests(load_bench, monkeypatch):
    """http_throughput sends the bodies it is given from every client (the teacher's warm-up window)."""
    bench, sent = load_bench("bench_service"), []
    monkeypatch.setitem(bench.CLIENTS, "fake", recording_senders(sent))
    rate, _ = bench.http_throughput("http://test", 6, 3, "fake", **bench.TEACHER)
    assert sorted(sent) == [("teacher", 25, i) for i in range(6)] and rate > 0


def test_bench_service_takes_the_teacher_and_student_windows_under_load_in_turns(load_bench, monkeypatch):
    """Row 5's two sides: a window of teacher requests and one of 3-step requests, in turns."""
    bench, sent = load_bench("bench_service"), []
    monkeypatch.setitem(bench.CLIENTS, "fake", recording_senders(sent))
    teacher, student = bench.teacher_and_student_under_load("http://test", 2, 3, 2, "fake", rounds=2, gap_s=0)
    assert sent == [("teacher", 25, 0), ("teacher", 25, 1), *[("flash-3step", None, i) for i in range(3)],
                    *[("flash-3step", None, i) for i in range(3, 6)], ("teacher", 25, 2), ("teacher", 25, 3)]  # fmt: skip
    assert teacher > 0 and student > 0


def test_bench_service_takes_the_throughput_ratio_in_turns(load_bench, monkeypatch):
    """The throughput ratio alternates a window of concurrent requests with the same number of
    in-process images at the clients' batch size, round by round (which goes first alternates)."""
    bench = load_bench("bench_service")
    order = []

    async def senders(url, k, stack):
        async def send(payload):
            order.append(("http", payload["seed"]))
            return 200, b"{}"

        return [send] * k

    monkeypatch.setitem(bench.CLIENTS, "fake", senders)
    http, local = bench.throughput_in_turns("http://test", 4, 2, "fake", lambda ids: order.append(("local", *ids)),
                                            rounds=2, gap_s=0)  # fmt: skip
    assert order == [*[("http", i) for i in range(4)], ("local", 0, 1), ("local", 2, 3),
                     ("local", 0, 1), ("local", 2, 3), *[("http", i) for i in range(4, 8)]]  # fmt: skip
    assert http > 0 and local > 0


def test_bench_service_prints_the_six_ratios_on_a_tiny_family(load_bench, tmp_path):
    bench = load_bench("bench_service")
    out = bench.main(["--tiny", "--requests", "4", "--concurrency", "2", "--teacher-requests", "1",
                      "--teacher-load-requests", "2", "--throughput-rounds", "2", "--client", "raw",
                      "--json", str(tmp_path / "r.json")])  # fmt: skip
    rows = [v for v in out.values() if isinstance(v, dict)]
    assert len(rows) == 6 and all(r["service"] > 0 and r["baseline"] > 0 for r in rows)
    assert all(r["ratio"] == pytest.approx(r["service"] / r["baseline"]) for r in rows)
    http_p50 = out["p50 latency, 3-step, 1 client (ms)"]["service"]
    assert 0 < out["p50 server generation ms (timings.compute_ms)"] < http_p50
    assert 0 < out["p50 HTTP minus server generation ms"] < http_p50
    assert (tmp_path / "r.json").is_file()


def test_service_stages_reads_per_image_stage_times_from_the_served_metrics(load_bench):
    """bench/service_stages.py splits the served image's time by stage from /metrics: seconds per
    image, and images per call (per U-Net call from the batch histogram, per text-encoder and
    decoder call from the images sent)."""
    from service.metrics import Metrics

    stages = load_bench("service_stages")
    m = Metrics()
    before = stages.stage_seconds(m.exposition().decode())
    for _ in range(3):  # three U-Net calls of 4 images: one request group of 4, 3-step
        m.record_stage("unet", 0.020, 4, "flash-3step")
    m.record_stage("text_encoder", 0.004, 4, "flash-3step")
    m.record_stage("vae_decode", 0.008, 4, "flash-3step")
    m.record_stage("unet", 1.0, 2, "teacher")  # another model's calls count in its stage time only
    after = stages.stage_seconds(m.exposition().decode())
    assert after["images"] == (12.0, 3.0)
    rows = stages.per_image(before, after, images=4)
    assert rows["text_encoder"] == pytest.approx((1.0, 4.0))
    assert rows["vae_decode"] == pytest.approx((2.0, 4.0))
    assert rows["unet"] == pytest.approx(((0.060 + 1.0) / 4 * 1e3, 12 / 4))


def test_open_loop_arrivals_are_poisson_and_requests_go_out_on_their_own_clock(load_bench, family):
    """bench/open_loop.py: exponential gaps of mean 1 / rate inside the duration, the same for a
    seed; each arrival is sent when due, on a free connection, whether or not others answered."""
    bench = load_bench("open_loop")
    times = bench.arrival_times(rate=200.0, duration=10.0, seed=3)
    assert times == sorted(times) and 0 < times[0] and times[-1] < 10.0
    assert len(times) == pytest.approx(2000, rel=0.1)
    assert statistics.mean(b - a for a, b in itertools.pairwise(times)) == pytest.approx(1 / 200, rel=0.1)
    assert bench.arrival_times(200.0, 10.0, seed=3) == times != bench.arrival_times(200.0, 10.0, seed=4)

    due = [0.0, 0.0, 0.0, 0.3]  # three at once: three connections busy together
    with serve_in_thread(Settings(model_dir=family, log_level="warning")) as (url, _):
        latencies, rate = asyncio.run(bench.open_loop(url, due, connections=3))
    assert len(latencies) == 4 and all(t > 0 for t in latencies)
    assert rate < 4 / 0.3  # the last one waited for its time


def test_thread_cpu_bench_splits_a_servers_cpu_by_thread(load_bench, tmp_path):
    """bench/thread_cpu.py: per-thread CPU from /proc, per request; the main thread is the event loop."""
    bench = load_bench("thread_cpu")
    me = os.getpid()
    now = bench.thread_cpu(me)
    assert me in now and all(cpu >= 0 for cpu in now.values())
    before = {me: 1.0, 11: 2.0, 12: 2.0}
    after = {me: 1.2, 11: 4.0, 12: 3.9, 13: 0.1}
    ms = bench.per_request(before, after, me, 100)  # a thread that started in between counts from 0
    assert ms == pytest.approx({"event loop": 2.0, "busiest other": 20.0, "second other": 19.0, "the rest": 1.0})

    fam = write_tiny_family(tmp_path / "fam")
    out = bench.main(["--model", str(fam), "--requests", "48", "--concurrency", "4", "--trials", "1"])
    (tree,) = out
    assert Path(tree) == Path(bench.ROOT) and len(out[tree]["images per second"]) == 1
    assert out[tree]["images per second"][0] > 0 and out[tree]["event loop ms per request"][0] >= 0

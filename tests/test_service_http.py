"""End-to-end HTTP: every endpoint of a real uvicorn server on 127.0.0.1 serving a tiny family."""

import asyncio
import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from flash.models import load_family
from flash.pipeline import TextToImage
from flash.tiny import write_tiny_family
from service.app import create_app
from service.config import Settings
from service.testing import serve_in_thread

SIZE = 32  # the tiny family's images


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_tiny_family(tmp_path_factory.mktemp("service_http") / "tiny")


@pytest.fixture(scope="module")
def server(family):
    settings = Settings(model_dir=family, max_batch_size=8, max_wait_ms=5, log_level="warning")
    with serve_in_thread(settings) as (url, srv):
        yield url, srv.config.app


def png(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def post(url, body, path="/v1/images/generations", **kw):
    return httpx.post(f"{url}{path}", json=body, timeout=60, **kw)


async def post_many(url, bodies):
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        return await asyncio.gather(*[c.post("/v1/images/generations", json=b) for b in bodies])


def assert_error(r, status, code, *needles):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    for needle in needles:
        assert needle in body["error"]["message"], body["error"]["message"]
    return body["error"]


def test_ready_is_503_until_loaded_and_warm_then_200(family):
    app = create_app(Settings(model_dir=family, log_level="warning"), seed_source=lambda: 1234)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert_error(await c.get("/health/ready"), 503, "not_ready", "loading")
            assert (await c.get("/health/live")).status_code == 200
            assert_error(await c.post("/v1/images/generations", json={"prompt": "x"}), 503, "not_ready")
            async with app.router.lifespan_context(app):
                deadline = time.monotonic() + 30
                while (r := await c.get("/health/ready")).status_code != 200 and time.monotonic() < deadline:
                    assert_error(r, 503, "not_ready")
                    await asyncio.sleep(0.02)
                assert r.json() == {"status": "ready", "version": "tiny-0"}
                r = await c.post("/v1/images/generations", json={"prompt": "no seed given", "n": 2})
                assert r.json()["seeds"] == [1234, 1235]  # drawn from the injected source
            assert_error(await c.get("/health/ready"), 503, "not_ready", "draining")

    asyncio.run(go())


def test_api_keys_are_required_when_configured(family):
    app = create_app(Settings(model_dir=family, api_keys="k1, k2"))  # comma-separated, as in FLASH_API_KEYS

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {"prompt": "x"}
            assert_error(await c.post("/v1/images/generations", json=body), 401, "invalid_api_key")
            bad = {"Authorization": "Bearer k3"}
            assert_error(
                await c.post("/v1/images/generations", json=body, headers=bad), 401, "invalid_api_key"
            )
            assert_error(await c.get("/v1/models", headers={"Authorization": "k1"}), 401, "invalid_api_key")
            good = {"Authorization": "Bearer k2"}  # passes auth; the models are not loaded in this app
            assert_error(await c.post("/v1/images/generations", json=body, headers=good), 503, "not_ready")
            assert (await c.get("/health/live")).status_code == 200  # probes stay open

    asyncio.run(go())


def test_models_lists_students_teacher_steps_and_size(server):
    url, _ = server
    body = httpx.get(f"{url}/v1/models").json()
    cards = {m["id"]: m for m in body["data"]}
    assert set(cards) == {"flash", "flash-1step", "flash-2step", "flash-3step", "teacher"}
    assert body["version"] == "tiny-0" and body["backend"] == "torch"
    assert body["decoder"] == "full"  # the tiny family ships no fast decoder
    assert cards["flash-2step"]["steps"] == [2] and cards["flash"]["steps"] == [1, 2, 3]
    assert cards["flash"]["default_steps"] == 3
    assert cards["teacher"]["steps"] is None and cards["teacher"]["max_steps"] == 100
    assert cards["teacher"]["default_steps"] == 25
    assert all(m["sizes"] == [f"{SIZE}x{SIZE}"] and m["object"] == "model" for m in cards.values())


def test_generation_returns_pngs_with_steps_seeds_and_timings(server):
    url, _ = server
    r = post(url, {"prompt": "a red circle", "n": 2, "seed": 11, "size": "32x32", "user": "u1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "flash-3step" and body["steps"] == 3  # model omitted: the 3-step student
    assert body["seeds"] == [11, 12] and [d["seed"] for d in body["data"]] == [11, 12]
    assert isinstance(body["created"], int) and body["version"] == "tiny-0"
    assert set(body["timings"]) == {"queue_ms", "compute_ms", "total_ms"}
    assert body["timings"]["total_ms"] >= body["timings"]["compute_ms"] > 0
    images = [png(d["b64_json"]) for d in body["data"]]
    assert all(im.shape == (SIZE, SIZE, 3) for im in images)

    r = post(url, {"prompt": "a red circle", "model": "flash", "steps": 1, "seed": 11})
    assert r.json()["model"] == "flash-1step" and r.json()["steps"] == 1

    r = post(
        url, {"prompt": "a red circle", "model": "teacher", "steps": 3, "guidance_scale": 2.0, "seed": 5}
    )
    assert r.status_code == 200, r.text
    assert (r.json()["model"], r.json()["steps"], r.json()["guidance_scale"]) == ("teacher", 3, 2.0)
    assert png(r.json()["data"][0]["b64_json"]).shape == (SIZE, SIZE, 3)


def test_generate_returns_a_png_directly(server):
    url, _ = server
    r = post(url, {"prompt": "a blue square", "model": "flash-2step", "seed": 3}, path="/v1/generate")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert (r.headers["x-model"], r.headers["x-steps"], r.headers["x-seed"]) == ("flash-2step", "2", "3")
    assert np.asarray(Image.open(io.BytesIO(r.content))).shape[:2] == (SIZE, SIZE)
    same = post(url, {"prompt": "a blue square", "model": "flash-2step", "seed": 3})
    np.testing.assert_array_equal(
        png(same.json()["data"][0]["b64_json"]), np.asarray(Image.open(io.BytesIO(r.content)))
    )
    assert_error(
        post(url, {"prompt": "x", "n": 2}, path="/v1/generate"), 422, "invalid_value", "allowed: 1 to 1"
    )


@pytest.mark.parametrize(
    "body, param, needles",
    [
        (
            {"prompt": "x", "model": "dall-e-3"},
            "model",
            ["flash, flash-1step, flash-2step, flash-3step, teacher"],
        ),
        ({"prompt": "x", "model": "flash-3step", "steps": 2}, "steps", ["allowed: 3"]),
        ({"prompt": "x", "steps": 4}, "steps", ["allowed: 1, 2, 3"]),
        ({"prompt": "x", "model": "teacher", "steps": 101}, "steps", ["allowed: 1 to 100"]),
        ({"prompt": ""}, "prompt", ["1 to 1000 characters"]),
        ({"prompt": "   "}, "prompt", ["1 to 1000 characters"]),
        ({"prompt": "x" * 1001}, "prompt", ["1 to 1000 characters", "got 1001"]),
        ({"prompt": "x", "n": 0}, "n", ["allowed: 1 to 4"]),
        ({"prompt": "x", "n": 5}, "n", ["allowed: 1 to 4"]),
        ({"prompt": "x", "size": "1024x1024"}, "size", ["allowed: 32x32"]),
        ({"prompt": "x", "guidance_scale": 3.0}, "guidance_scale", ["'teacher' only"]),
        ({"prompt": "x", "response_format": "url"}, "response_format", ["b64_json"]),
        ({"prompt": "x", "seed": -1}, "seed", ["greater than or equal to 0"]),
        ({"prompt": "x", "colour": "red"}, "colour", ["Extra inputs"]),
        ({"model": "flash"}, "prompt", ["Field required"]),
    ],
)
def test_invalid_requests_get_422_naming_the_allowed_values(server, body, param, needles):
    url, _ = server
    error = assert_error(post(url, body), 422, "invalid_value", *needles)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_every_error_has_the_one_shape(server):
    url, _ = server
    bad_json = httpx.post(f"{url}/v1/images/generations", content=b"{not json", timeout=10)
    assert_error(bad_json, 422, "invalid_value", "JSON")
    assert_error(httpx.get(f"{url}/v1/nothing-here", timeout=10), 404, "http_error")
    assert_error(httpx.get(f"{url}/v1/images/generations", timeout=10), 405, "http_error")


def test_concurrent_requests_all_succeed_and_share_u_net_calls(server):
    url, app = server
    stats = app.state.engine.batcher.stats
    before = stats.unet_calls
    bodies = [{"prompt": f"shape {i}", "model": "flash-3step", "seed": i} for i in range(8)]
    responses = asyncio.run(post_many(url, bodies))
    assert [r.status_code for r in responses] == [200] * 8
    assert [r.json()["seeds"] for r in responses] == [[i] for i in range(8)]
    assert stats.unet_calls - before < 8 * 3  # fewer calls than images x steps
    m = app.state.metrics
    m.flush()
    sizes = m.registry.get_sample_value("flash_batch_size_images_sum", {"model": "flash-3step"})
    calls = m.registry.get_sample_value("flash_batch_size_images_count", {"model": "flash-3step"})
    assert sizes > calls  # at least one U-Net call carried more than one image


def test_a_seed_gives_the_same_image_alone_and_inside_a_batch_mid_trajectory(server, family, monkeypatch):
    url, app = server
    prompt, seed = "a green triangle", 1234
    alone = png(
        post(url, {"prompt": prompt, "seed": seed, "model": "flash-3step"}).json()["data"][0]["b64_json"]
    )

    # The same generation in-process, through the project's own pipeline.
    fam = load_family(family)
    s = fam.students[3]
    t2i = TextToImage(fam.teacher)
    want = t2i.decode(t2i.student_latents(s.unet, [prompt], [seed], s.card.timesteps))[0]
    assert np.abs(alone.astype(int) - want.astype(int)).max() <= 1

    # Slow the U-Net down so the seeded request arrives while others are mid-trajectory.
    engine = app.state.engine
    backend = engine.models.students[3].backend
    fast = backend.denoise

    def slow(x, t, cond):
        time.sleep(0.05)
        return fast(x, t, cond)

    monkeypatch.setattr(backend, "denoise", slow)
    mixed_before = engine.batcher.stats.mixed_step_calls

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            others = [
                asyncio.ensure_future(
                    c.post("/v1/images/generations", json={"prompt": f"other {i}", "seed": i, "n": 2})
                )
                for i in range(2)
            ]
            calls = engine.batcher.stats.unet_calls
            while engine.batcher.stats.unet_calls == calls:  # the others have started
                await asyncio.sleep(0.005)
            mine = await c.post(
                "/v1/images/generations", json={"prompt": prompt, "seed": seed, "model": "flash-3step"}
            )
            return mine, await asyncio.gather(*others)

    mine, others = asyncio.run(go())
    assert mine.status_code == 200 and all(o.status_code == 200 for o in others)
    assert engine.batcher.stats.mixed_step_calls > mixed_before  # it really shared a call with others
    batched = png(mine.json()["data"][0]["b64_json"])
    assert np.abs(batched.astype(int) - alone.astype(int)).max() <= 1  # at most 1/255 per pixel


def test_metrics_endpoint_serves_the_exposition(server):
    url, _ = server
    post(url, {"prompt": "for the metrics", "seed": 1})
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in (
        "flash_request_duration_seconds_bucket",
        "flash_queue_wait_seconds_bucket",
        'flash_compute_duration_seconds_count{stage="text_encoder"}',
        'flash_compute_duration_seconds_count{stage="unet"}',
        'flash_compute_duration_seconds_count{stage="vae_decode"}',
        "flash_batch_size_images_bucket",
        "flash_pending_requests",
        "flash_images_generated_total",
        'flash_model_info{backend="torch"',
    ):
        assert name in r.text, name


def test_live_and_ready_once_serving(server):
    url, _ = server
    assert httpx.get(f"{url}/health/live", timeout=10).json() == {"status": "live"}
    assert httpx.get(f"{url}/health/ready", timeout=10).json() == {"status": "ready", "version": "tiny-0"}


def test_the_hot_path_stays_on_the_event_loop_and_runs_in_inference_mode(server, monkeypatch):
    import fastapi.dependencies.utils as fastapi_deps
    import torch

    url, app = server
    # FastAPI runs a plain `def` dependency through run_in_threadpool: a hop to a worker
    # thread and back on every request. The /v1 dependencies are async and never hop.
    hops, to_thread = [], fastapi_deps.run_in_threadpool
    monkeypatch.setattr(fastapi_deps, "run_in_threadpool", lambda f, *a, **k: hops.append(f) or to_thread(f, *a, **k))
    backend = app.state.engine.models.students[3].backend
    seen, fast = [], backend.denoise
    monkeypatch.setattr(
        backend, "denoise", lambda x, t, c: seen.append(torch.is_inference_mode_enabled()) or fast(x, t, c)
    )
    assert post(url, {"prompt": "a red circle", "model": "flash-3step"}).status_code == 200
    assert hops == []
    assert seen and all(seen)  # the device thread runs in inference mode


def test_png_compress_level_trades_bytes_for_time_and_keeps_the_pixels(family, server):
    """FLASH_PNG_COMPRESS_LEVEL: the same image, stored (0) or deflated (the default 1, 9), on both
    generation endpoints."""
    url, _ = server
    body = {"prompt": "a red circle", "model": "flash-3step", "seed": 4}
    default = png(post(url, body).json()["data"][0]["b64_json"])
    raw = SIZE * SIZE * 3
    for level in (0, 9):
        with serve_in_thread(Settings(model_dir=family, png_compress_level=level, log_level="warning")) as (other, _):
            pngs = [base64.b64decode(post(other, body).json()["data"][0]["b64_json"]),
                    post(other, body, path="/v1/generate").content]  # fmt: skip
        for data in pngs:
            assert len(data) > raw if level == 0 else len(data) < raw  # stored: the pixels plus headers
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), default)

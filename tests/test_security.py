"""Security controls (docs/security.md): constant-time key checks, a separate admin token,
per-key rate limits, the body size limit, model names and folders that cannot leave the
model store, no pickle loading, CORS off by default, and no tracebacks in responses."""

from __future__ import annotations

import ast
import asyncio
import hmac
import pickle
from pathlib import Path

import httpx
import pytest
import torch

from flash.tiny import write_tiny_family
from service import app as app_module
from service.app import create_app
from service.config import Settings
from service.engine import load_model_set
from service.guards import TokenBuckets, confine
from service.testing import serve_in_thread

KEY, OTHER_KEY, ADMIN = "sk-first", "sk-second", "admin-token"
ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("flash", "distill", "export", "service", "teacher", "deploy", "bench")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A model store with one family in it."""
    root = tmp_path_factory.mktemp("security_store")
    write_tiny_family(root / "tiny")
    return root


@pytest.fixture(scope="module")
def server(store):
    settings = Settings(
        model_dir=store / "tiny",
        model_root=store,
        api_keys=[KEY, OTHER_KEY],
        admin_token=ADMIN,
        rate_limit_per_s=0.5,
        rate_limit_burst=3,
        log_level="error",
    )
    with serve_in_thread(settings) as (url, srv):
        yield url, srv.config.app


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def assert_error(r, status, code, *needles):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code, body
    for needle in needles:
        assert needle in body["error"]["message"], body["error"]["message"]
    return body["error"]


def rejected(app, reason):
    app.state.metrics.flush()
    return (
        app.state.metrics.registry.get_sample_value("flash_requests_rejected_total", {"reason": reason}) or 0
    )


def asgi(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


# -- authentication ----------------------------------------------------------------------------


def test_every_key_is_compared_in_full_whatever_matches(monkeypatch, store):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: calls.append(b) or real(a, b))
    app = create_app(Settings(model_dir=store / "tiny", api_keys=[KEY, OTHER_KEY, "sk-third"]))

    async def go():
        async with asgi(app) as c:
            for token in (KEY, "sk-wrong", "sk-third"):
                calls.clear()
                await c.get("/v1/models", headers=auth(token))
                assert sorted(calls) == sorted(k.encode() for k in (KEY, OTHER_KEY, "sk-third")), token

    asyncio.run(go())


def test_the_admin_token_and_api_keys_are_not_interchangeable(server):
    url, _ = server
    assert_error(httpx.get(f"{url}/v1/models", headers=auth(ADMIN), timeout=10), 401, "invalid_api_key")
    assert_error(httpx.get(f"{url}/admin/reload", headers=auth(KEY), timeout=10), 401, "invalid_api_key")
    assert httpx.get(f"{url}/admin/reload", headers=auth(ADMIN), timeout=10).status_code == 200


# -- rate limits -------------------------------------------------------------------------------


def test_token_buckets_refill_at_the_rate_and_cap_at_the_burst():
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0], max_callers=2)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token every 0.5 s
    assert buckets.take("b") == 0.0  # another caller has its own bucket
    now[0] = 0.25
    assert buckets.take("a") == pytest.approx(0.25)
    now[0] = 100.0  # long idle: refills to the burst, no more
    assert [buckets.take("a") for _ in range(4)][-1] > 0
    buckets.take("c")  # a third caller: the full bucket of "b" is forgotten, the table stays bounded
    assert len(buckets) == 2
    with pytest.raises(ValueError, match="rate must be > 0"):
        TokenBuckets(rate=0, burst=1)


def test_each_api_key_has_its_own_rate_limit(server):
    url, app = server
    before = rejected(app, "rate_limited")
    codes = [httpx.get(f"{url}/v1/models", headers=auth(KEY), timeout=10) for _ in range(4)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200]  # the burst
    limited = codes[3]
    assert_error(limited, 429, "rate_limit_exceeded", "rate limit")
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert httpx.get(f"{url}/v1/models", headers=auth(OTHER_KEY), timeout=10).status_code == 200
    assert rejected(app, "rate_limited") == before + 1
    # a wrong key is refused before it can spend anyone's tokens
    assert_error(httpx.get(f"{url}/v1/models", headers=auth("sk-x"), timeout=10), 401, "invalid_api_key")


def test_rate_limits_are_off_by_default():
    assert Settings().rate_limit_per_s == 0


# -- body size ---------------------------------------------------------------------------------


def test_a_body_over_the_limit_gets_413_before_any_handler(server):
    url, app = server
    before = rejected(app, "too_large")
    big = {"prompt": "x" * 100_000}
    r = httpx.post(f"{url}/v1/images/generations", json=big, headers=auth(OTHER_KEY), timeout=10)
    assert_error(r, 413, "request_too_large", "65536 byte limit")

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(100):
            yield b"x" * 1024

    r = httpx.post(f"{url}/v1/generate", content=chunks(), headers=auth(OTHER_KEY), timeout=10)
    assert_error(r, 413, "request_too_large")
    r = httpx.post(
        f"{url}/admin/reload", content=b"{" + b" " * 70_000 + b"}", headers=auth(ADMIN), timeout=10
    )
    assert_error(r, 413, "request_too_large")
    assert rejected(app, "too_large") == before + 3


def test_a_malformed_content_length_is_refused(store):
    app = create_app(Settings(model_dir=store / "tiny"))
    sent = []

    async def go():
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/generate",
            "headers": [(b"content-length", b"-1")],
            "query_string": b"",
            "root_path": "",
            "scheme": "http",
            "server": ("t", 80),
            "client": ("c", 1),
        }

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)

    asyncio.run(go())
    assert sent[0]["status"] == 422 and b"invalid Content-Length header" in sent[1]["body"]


def test_the_body_limit_is_a_setting():
    assert Settings().max_body_bytes == 65_536
    with pytest.raises(ValueError, match="greater than or equal to 1024"):
        Settings(max_body_bytes=10)


# -- model names and folders -------------------------------------------------------------------


ESCAPES = ["../../etc/passwd", "/etc/passwd", "flash-3step/../teacher", "..", "teacher\x00", "%2e%2e%2f"]


def test_a_model_name_is_only_ever_a_catalog_name(store, monkeypatch):
    app = create_app(Settings(model_dir=store / "tiny", log_level="error"))
    opened = []
    real_open = Path.open

    async def go():
        async with app.router.lifespan_context(app), asgi(app) as c:
            while (await c.get("/health/ready")).status_code != 200:
                await asyncio.sleep(0.05)
            monkeypatch.setattr(Path, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
            return [await c.post("/v1/images/generations", json={"prompt": "x", "model": m}) for m in ESCAPES]

    for model, r in zip(ESCAPES, asyncio.run(go()), strict=True):
        error = assert_error(r, 422, "invalid_value", "allowed: flash, flash-1step")
        assert error["param"] == "model", model
    assert not opened  # rejected by name: no file was touched


def test_confine_keeps_reload_folders_inside_the_store(tmp_path):
    root = tmp_path / "store"
    (root / "v1").mkdir(parents=True)
    (root / "current").symlink_to("v1")
    (root / "escape").symlink_to(tmp_path)
    assert confine("v1", root) == root / "v1"
    assert confine(str(root / "current"), root) == root / "current"  # kept as given: the link
    assert confine("/anywhere", None) == Path("/anywhere")  # no store configured: any folder
    for bad in ("../outside", "/etc", "v1/../../outside", "escape", "escape/x"):
        with pytest.raises(Exception, match="outside the model store"):
            confine(bad, root)
    with pytest.raises(Exception, match="NUL"):
        confine("v1\x00", root)


def test_reload_refuses_folders_outside_the_model_store(server, store):
    url, _ = server
    version = httpx.get(f"{url}/health/ready", timeout=10).json()["version"]
    for model_dir in ("../", "/etc", "tiny/../../"):
        r = httpx.post(f"{url}/admin/reload", json={"model_dir": model_dir}, headers=auth(ADMIN), timeout=60)
        error = assert_error(r, 403, "forbidden", "outside the model store")
        assert error["param"] == "model_dir"
    r = httpx.post(f"{url}/admin/reload", json={"model_dir": "tiny"}, headers=auth(ADMIN), timeout=120)
    assert r.status_code == 200 and r.json()["model_dir"] == str(store / "tiny")  # relative to the store
    assert httpx.get(f"{url}/health/ready", timeout=10).json()["version"] == version


# -- no pickles --------------------------------------------------------------------------------


def test_loading_and_serving_a_family_never_unpickles(store, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle loading attempted")

    for target, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(target, name, refuse)
    models = load_model_set(Settings(model_dir=store / "tiny"), store / "tiny")
    assert set(models.students) == {1, 2, 3}


def test_no_source_file_can_unpickle():
    """No import of pickle-based loaders, no torch.load, no allow_pickle=True in the code we ship."""
    banned_modules = {"pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}
    found = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.Import):
                    found += [where for a in node.names if a.name.split(".")[0] in banned_modules]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                    found.append(where)
                elif isinstance(node, ast.Attribute) and node.attr == "load":
                    if isinstance(node.value, ast.Name) and node.value.id == "torch":
                        found.append(where)
                elif isinstance(node, ast.keyword) and node.arg in ("allow_pickle", "weights_only"):
                    found.append(where)
    assert not found, found


# -- CORS and error bodies ---------------------------------------------------------------------


def test_cors_is_off_by_default_and_opt_in(store):
    origin = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}

    async def go(app):
        async with asgi(app) as c:
            preflight = await c.options("/v1/images/generations", headers=origin)
            simple = await c.get("/v1/models", headers={"Origin": "https://evil.example"})
            allowed = await c.get("/v1/models", headers={"Origin": "https://app.example"})
            return preflight, simple, allowed

    preflight, simple, allowed = asyncio.run(go(create_app(Settings(model_dir=store / "tiny"))))
    for r in (preflight, simple, allowed):
        assert not any(h.startswith("access-control-") for h in r.headers), r.headers
    assert_error(preflight, 405, "http_error")

    opted = create_app(Settings(model_dir=store / "tiny", cors_origins="https://app.example"))
    preflight, simple, allowed = asyncio.run(go(opted))
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in simple.headers and preflight.status_code == 400
    with pytest.raises(ValueError, match="must be scheme://host"):
        Settings(cors_origins="app.example/path")


def test_an_unexpected_error_answers_500_without_details(server, monkeypatch):
    url, app = server

    async def explode(job):
        raise KeyError("/home/flash/.secrets token=abc123")

    monkeypatch.setattr(app.state.engine, "generate", explode)
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x"}, headers=auth(OTHER_KEY), timeout=10)
    error = assert_error(r, 500, "internal_error")
    assert error["message"] == "internal server error"
    assert "Traceback" not in r.text and "secrets" not in r.text and "KeyError" not in r.text

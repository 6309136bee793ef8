"""`create_app(settings)`: the FastAPI app. Models load in the lifespan, in the background.

Errors become HTTP answers here, all in OpenAI's shape:
{"error": {"message", "type", "param", "code"}}. The /v1 handlers are in routes.py, the
body size limit, rate limits and model-store confinement in guards.py (docs/security.md).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors
from service.config import Settings
from service.engine import Engine
from service.guards import BodySizeLimit, TokenBuckets, confine, rate_limited
from service.metrics import CONTENT_TYPE, Metrics
from service.routes import check_json_content_type, json_body, v1_router
from service.schemas import ErrorBody, ErrorResponse, ReloadRequest, ReloadStatus, error_responses

log = logging.getLogger(__name__)

# error -> (HTTP status, OpenAI error type)
STATUS: dict[type[errors.ServiceError], tuple[int, str]] = {
    errors.InvalidRequest: (422, "invalid_request_error"),
    errors.Unauthorized: (401, "authentication_error"),
    errors.AdminDisabled: (403, "permission_error"),
    errors.Forbidden: (403, "permission_error"),
    errors.PayloadTooLarge: (413, "invalid_request_error"),
    errors.UnsupportedMediaType: (415, "invalid_request_error"),
    errors.NotReady: (503, "service_unavailable"),
    errors.QueueFull: (429, "rate_limit_error"),
    errors.RateLimited: (429, "rate_limit_error"),
    errors.DeadlineExceeded: (504, "timeout_error"),
    errors.GenerationFailed: (500, "server_error"),
    errors.ReloadInProgress: (409, "conflict_error"),
    errors.ReloadFailed: (422, "invalid_request_error"),
    errors.ClientGone: (499, "client_closed_request"),  # nginx's code; nobody reads it, the metrics do
}
GENERATION_PATHS = ("/v1/images/generations", "/v1/generate")
STATIC_DIR = Path(__file__).parent / "static"  # the playground page (docs/playground.md)


def error_response(
    status: int, message: str, type_: str, code: str | None = None, param: str | None = None, headers=None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def service_error_response(e: errors.ServiceError) -> JSONResponse:
    status, type_ = STATUS.get(type(e), (500, "server_error"))
    headers = None
    if isinstance(e, errors.QueueFull | errors.RateLimited):
        headers = {"Retry-After": str(e.retry_after_s)}
    elif isinstance(e, errors.Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    return error_response(status, e.message, type_, e.code, e.param, headers)


def validation_response(e: ValidationError | RequestValidationError) -> JSONResponse:
    """422 naming the field; our own checks' messages already name the allowed values."""
    messages, param = [], None
    for err in e.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        param = param or loc or None
        own = err.get("type") == "invalid_value"
        messages.append(err["msg"] if own or not loc else f"{loc}: {err['msg']}")
    return error_response(422, "; ".join(messages), "invalid_request_error", "invalid_value", param)


class RequestLatency:
    """Pure ASGI middleware: latency of generation requests by model, steps and status.
    The handler puts (model, steps) in request.state.labels once the request is valid."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            model, steps = scope.get("state", {}).get("labels", ("invalid", ""))
            self.metrics.request_latency.labels(model, steps, str(status)).observe(
                time.perf_counter() - start
            )
            self.metrics.flush()


def create_app(settings: Settings, seed_source: Callable[[], int] | None = None) -> FastAPI:
    """The service. /health/ready turns 200 once the models are loaded and warmed up.
    `seed_source` draws the seed of requests without one (default: the OS's randomness)."""
    metrics = Metrics()
    engine = Engine(settings, metrics)
    draw_seed = seed_source or (lambda: random.SystemRandom().randrange(2**32))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(engine.start())  # serve /health/* while loading
        try:
            yield
        finally:
            loading.cancel()
            await engine.stop(settings.drain_timeout_s)

    app = FastAPI(title="Imagine Flash", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.engine = settings, metrics, engine
    buckets = (
        TokenBuckets(settings.rate_limit_per_s, settings.rate_limit_burst)
        if settings.rate_limit_per_s > 0
        else None
    )

    def reject(e: errors.ServiceError) -> JSONResponse:
        """For errors found before routing (middleware): counted and shaped like the others."""
        metrics.count_error(e)
        return service_error_response(e)

    # Outermost last: [CORS ->] body size limit -> latency -> FastAPI's exception handlers -> routes.
    app.add_middleware(RequestLatency, metrics=metrics)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, reject=reject)
    if settings.cors_origins:  # off by default: browsers on other origins get no CORS headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            allow_credentials=False,
        )

    @app.exception_handler(errors.ServiceError)
    async def _service_error(request: Request, e: errors.ServiceError):
        metrics.count_error(e)
        if isinstance(e, errors.GenerationFailed):
            log.error("%s %s failed: %s", request.method, request.url.path, e.message)
        return service_error_response(e)

    @app.exception_handler(ValidationError)
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e):
        metrics.rejected.labels("invalid").inc()
        return validation_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error_response(
            e.status_code, str(e.detail), "invalid_request_error", "http_error", headers=e.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        """The traceback goes to the log, never to the client."""
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "server_error", "internal_error")

    # async: a plain `def` dependency costs every request a hop to the thread pool and back
    async def require_api_key(request: Request) -> None:
        """Authenticate, then spend one token of the caller's bucket (when rate limits are on)."""
        keys = [k.get_secret_value() for k in settings.api_keys]
        caller = None
        if keys:
            index = matching_bearer(request, keys)
            if index is None:
                raise errors.Unauthorized("missing or invalid API key (Authorization: Bearer <key>)")
            caller = f"key-{index}"  # never the key itself: it could end up in a log
        if buckets is not None:
            caller = caller or f"addr-{request.client.host if request.client else 'unknown'}"
            wait = buckets.take(caller)
            if wait > 0:
                raise rate_limited(wait)

    async def require_admin(request: Request) -> None:
        if settings.admin_token is None:
            raise errors.AdminDisabled("admin endpoints are disabled; set FLASH_ADMIN_TOKEN to enable them")
        if matching_bearer(request, [settings.admin_token.get_secret_value()]) is None:
            raise errors.Unauthorized("missing or invalid admin token (Authorization: Bearer <token>)")

    app.include_router(v1_router(engine, metrics, settings, draw_seed, require_api_key))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        """The playground: plain HTML/JS over /v1 (no key needed for the page itself)."""
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health/live", responses=error_responses(503))
    async def live():
        """The process answers; 503 if the device thread died."""
        if engine.started and not engine.alive and not engine.draining:
            return error_response(503, "the device thread has stopped", "service_unavailable", "not_live")
        return {"status": "live"}

    @app.get("/health/ready", responses=error_responses(503))
    async def ready():
        """200 once loaded and warmed up; 503 before, while draining, or if the device thread died."""
        if engine.ready and engine.alive and not engine.draining:
            return {"status": "ready", "version": engine.models.version}
        if engine.draining:
            reason = "draining"
        elif engine.started and not engine.alive:
            reason = "the device thread has stopped"
        else:
            reason = engine.load_error or "loading models"
        return error_response(503, f"not ready: {reason}", "service_unavailable", "not_ready")

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    admin_errors = error_responses(401, 403, 413, 422)

    @app.post(
        "/admin/reload",
        dependencies=[Depends(require_admin)],
        response_model=ReloadStatus,
        responses={202: {"model": ReloadStatus}, **admin_errors, **error_responses(409, 415)},
        openapi_extra=json_body(ReloadRequest, required=False),
    )
    async def reload(request: Request):
        """Load a family folder, warm it up and swap it in; the old version serves meanwhile
        and stays if the new one fails. `wait: false` answers 202 at once (then GET it).
        With FLASH_MODEL_ROOT set, only folders inside it load."""
        check_json_content_type(request.headers.get("content-type"))
        raw = (await request.body()).strip()
        # no body: the defaults; anything else must be the documented object (`null` too is refused)
        body = ReloadRequest.model_validate_json(raw) if raw else ReloadRequest()
        model_dir = confine(body.model_dir, settings.model_root) if body.model_dir is not None else None
        if not body.wait:
            engine.reload_in_background(model_dir)
            await asyncio.sleep(0)  # let it start, so the status says "loading"
            return JSONResponse(engine.reload_status.model_dump(), status_code=202)
        await engine.reload(model_dir)
        return engine.reload_status

    @app.get(
        "/admin/reload",
        dependencies=[Depends(require_admin)],
        response_model=ReloadStatus,
        responses=error_responses(401, 403),
    )
    async def reload_status() -> ReloadStatus:
        return engine.reload_status

    return app


def matching_bearer(request: Request, secrets: list[str]) -> int | None:
    """Index of the secret the bearer token equals, or None. Constant time: every secret is
    compared in full (hmac.compare_digest), with no early exit on the first match."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode()
    matches = [hmac.compare_digest(given, s.encode()) for s in secrets]
    if scheme.lower() != "bearer" or not any(matches):
        return None
    return matches.index(True)

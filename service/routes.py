"""/v1: the OpenAI-compatible API. Handlers validate, enqueue and await; nothing else."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from service import errors
from service.batching import Job, JobResult
from service.catalog import Catalog
from service.config import Settings
from service.engine import Engine
from service.metrics import Metrics
from service.png import encode_png
from service.schemas import (
    MAX_SEED,
    GenerationRequest,
    ImageData,
    ImagesResponse,
    ModelCard,
    ModelList,
    Timings,
    ValidationContext,
    error_responses,
)

# Every /v1 call may meet these; generation adds its own below.
V1_ERRORS = error_responses(401, 429, 503)
GENERATION_ERRORS = error_responses(401, 413, 415, 422, 429, 499, 500, 503, 504)
JSON_TYPES = ("application/json", "text/json")


def v1_router(
    engine: Engine, metrics: Metrics, settings: Settings, draw_seed: Callable[[], int], auth: Callable
) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    async def generate(request: Request, max_n: int) -> tuple[Job, JobResult]:
        models = engine.models
        if models is None or not engine.ready:
            raise errors.NotReady(engine.load_error or "the models are not loaded yet")
        limits = ValidationContext(models.catalog, settings.max_prompt_chars, max_n)
        check_json_content_type(request.headers.get("content-type"))
        req = GenerationRequest.model_validate_json(await request.body(), context={"limits": limits})
        job = make_job(req, models.catalog, settings.request_timeout_s, draw_seed)
        request.state.labels = (job.model, str(job.steps))  # for the latency histogram
        result = await until_disconnect(request, engine.generate(job))
        metrics.count_done(job.model, len(result.images), result.queue_s)
        return job, result

    @router.post(
        "/images/generations",
        response_model=ImagesResponse,
        openapi_extra=json_body(GenerationRequest),
        responses=GENERATION_ERRORS,
    )
    async def images_generations(request: Request) -> JSONResponse:
        """OpenAI Images API: PNGs as base64, plus the steps, seeds and timings used."""
        start = time.perf_counter()
        job, result = await generate(request, settings.max_n)
        data = [
            ImageData(b64_json=base64.b64encode(encode_png(im, settings.png_compress_level)).decode(), seed=seed)
            for im, seed in zip(result.images, job.seeds, strict=True)
        ]
        height, width = result.images[0].shape[:2]
        body = ImagesResponse(
            created=int(time.time()),
            data=data,
            model=job.model,
            steps=job.steps,
            seeds=job.seeds,
            size=f"{width}x{height}",
            guidance_scale=job.guidance_scale,
            version=result.version,
            timings=timings(result, start),
        )
        return JSONResponse(body.model_dump())

    @router.post(
        "/generate",
        response_class=Response,
        openapi_extra=json_body(GenerationRequest),
        responses={200: {"content": {"image/png": {}}, "description": "One PNG"}, **GENERATION_ERRORS},
    )
    async def generate_png(request: Request) -> Response:
        """One image as image/png, for `curl -o`: the same body, with n = 1."""
        start = time.perf_counter()
        job, result = await generate(request, max_n=1)
        headers = {
            "X-Model": job.model,
            "X-Steps": str(job.steps),
            "X-Seed": str(job.seeds[0]),
            "X-Model-Version": result.version,
            "X-Total-Ms": f"{timings(result, start).total_ms:.1f}",
        }
        return Response(
            encode_png(result.images[0], settings.png_compress_level), media_type="image/png", headers=headers
        )

    @router.get("/models", response_model=ModelList, responses=V1_ERRORS)
    async def list_models() -> ModelList:
        """The names served, their step counts and image size."""
        if engine.models is None:
            raise errors.NotReady(engine.load_error or "the models are not loaded yet")
        return model_list(engine.models.catalog)

    return router


def check_json_content_type(content_type: str | None) -> None:
    """A body sent as anything but JSON is refused (415); no Content-Type is read as JSON."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise errors.UnsupportedMediaType(
            f"Content-Type {media or '(empty)'!r} is not supported; send application/json"
        )


def make_job(req: GenerationRequest, catalog: Catalog, timeout_s: float, draw_seed: Callable[[], int]) -> Job:
    """Resolve aliases and defaults; image i gets seed + i."""
    model, steps = catalog.resolve(req.model, req.steps)
    spec = catalog.models[model]
    seed = req.seed if req.seed is not None else draw_seed()
    guidance = None
    if spec.kind == "teacher":
        guidance = req.guidance_scale if req.guidance_scale is not None else spec.default_guidance
    now = time.monotonic()
    seeds = [(seed + i) % (MAX_SEED + 1) for i in range(req.n)]
    return Job(
        model, spec.kind, req.prompt, seeds, steps, guidance, deadline=now + timeout_s, enqueued_at=now
    )


async def until_disconnect(request: Request, work: Awaitable[JobResult]) -> JobResult:
    """Await `work` in this task; if the client hangs up first, cancel it (the job leaves the
    queue) and raise ClientGone. One watcher task per request, not a task for each side and an
    `asyncio.wait`: this runs on the event loop, which shares the cores with the device thread."""
    handler = asyncio.current_task()
    hung_up = finished = False

    def on_gone(watcher: asyncio.Future) -> None:
        nonlocal hung_up
        if finished or watcher.cancelled():
            return
        watcher.exception()  # retrieved: a failed watch counts as a hang-up, as a finished one does
        hung_up = True
        handler.cancel()

    gone = asyncio.ensure_future(_disconnected(request))
    gone.add_done_callback(on_gone)
    try:
        return await work
    except asyncio.CancelledError:
        if hung_up and handler.uncancel() == 0:  # our cancel, and nobody else's
            raise errors.ClientGone("the client disconnected before its result was ready") from None
        raise
    finally:
        finished = True
        gone.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def model_list(cat: Catalog) -> ModelList:
    created = int(time.time())
    specs = [s for s in [cat.alias_spec(), *cat.models.values()] if s is not None]
    cards = [
        ModelCard(
            id=s.name,
            created=created,
            kind=s.kind,
            steps=list(s.steps) if s.kind == "student" else None,
            min_steps=min(s.steps),
            max_steps=max(s.steps),
            default_steps=s.default_steps,
            sizes=[cat.size],
            version=s.version,
        )
        for s in specs
    ]
    return ModelList(data=cards, version=cat.version, backend=cat.backend, decoder=cat.decoder)


def timings(result: JobResult, start: float) -> Timings:
    return Timings(
        queue_ms=round(result.queue_s * 1000, 3),
        compute_ms=round(result.compute_s * 1000, 3),
        total_ms=round((time.perf_counter() - start) * 1000, 3),
    )


def json_body(model, required: bool = True) -> dict:
    """Document a body that the handler validates itself (the checks need the served catalog)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}

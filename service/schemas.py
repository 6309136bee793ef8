"""Request and response bodies, and the one error shape (OpenAI's).

The generation request is OpenAI's Images API body plus `steps`, `seed` and
`guidance_scale`. What is allowed depends on the family being served (model names,
step counts, size), so the checks read a `ValidationContext` passed to pydantic:

    GenerationRequest.model_validate_json(body, context={"limits": ValidationContext(...)})

Every rejection message names the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from service.catalog import TEACHER, Catalog

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ValidationContext:
    catalog: Catalog
    max_prompt_chars: int
    max_n: int


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def _limits(info: ValidationInfo) -> ValidationContext | None:
    return (info.context or {}).get("limits")


class GenerationRequest(BaseModel):
    """POST /v1/images/generations and /v1/generate."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to draw.")
    model: str | None = Field(
        None, description="flash (default; `steps` picks the student), flash-Nstep or teacher."
    )
    steps: int | None = Field(
        None, description="Sampling steps: a student's own count, or 1..max for the teacher."
    )
    n: int = Field(1, description="Images to generate; image i uses seed + i.")
    size: str | None = Field(None, description="WIDTHxHEIGHT; only the family's native size is served.")
    response_format: Literal["b64_json"] = "b64_json"
    user: str | None = Field(None, max_length=256, description="Opaque end-user id (logged, not used).")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed of the first image; random when omitted."
    )
    guidance_scale: float | None = Field(
        None, ge=0, le=30, allow_inf_nan=False, description="Classifier-free guidance (teacher only)."
    )
    # OpenAI fields that clients send and that do not change what this server draws.
    stream: Literal[False] = False
    output_format: Literal["png"] = "png"
    quality: str | None = None
    style: str | None = None
    moderation: str | None = None
    safety_identifier: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_length(cls, v: str, info: ValidationInfo) -> str:
        limit = _limits(info).max_prompt_chars if _limits(info) else None
        if not v.strip() or (limit is not None and len(v) > limit):
            allowed = f"1 to {limit}" if limit is not None else "at least 1"
            raise _invalid(f"prompt must be {allowed} characters (not blank), got {len(v)}")
        return v

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str | None, info: ValidationInfo) -> str | None:
        ctx = _limits(info)
        if ctx and v is not None and ctx.catalog.spec(v) is None:
            raise _invalid(f"unknown model {v!r}; allowed: {', '.join(ctx.catalog.names())}")
        return v

    @field_validator("steps")
    @classmethod
    def _allowed_steps(cls, v: int | None, info: ValidationInfo) -> int | None:
        ctx = _limits(info)
        if ctx is None or v is None or "model" not in info.data:
            return v
        spec = ctx.catalog.spec(info.data["model"])
        if v not in spec.steps:
            hint = f" (model {TEACHER!r} takes other counts)" if spec.kind == "student" else ""
            raise _invalid(
                f"steps={v} is not available for model {spec.name!r}; allowed: {spec.describe_steps()}{hint}"
            )
        return v

    @field_validator("n")
    @classmethod
    def _n_in_range(cls, v: int, info: ValidationInfo) -> int:
        high = _limits(info).max_n if _limits(info) else None
        if v < 1 or (high is not None and v > high):
            raise _invalid(f"n={v} is out of range; allowed: 1 to {high}")
        return v

    @field_validator("size")
    @classmethod
    def _native_size(cls, v: str | None, info: ValidationInfo) -> str | None:
        ctx = _limits(info)
        if ctx and v is not None and v not in (ctx.catalog.size, "auto"):
            raise _invalid(f"size {v!r} is not served; allowed: {ctx.catalog.size}")
        return v

    @field_validator("guidance_scale")
    @classmethod
    def _teacher_only(cls, v: float | None, info: ValidationInfo) -> float | None:
        ctx = _limits(info)
        if ctx and v is not None and "model" in info.data:
            spec = ctx.catalog.spec(info.data["model"])
            if spec.kind != "teacher":
                raise _invalid(f"guidance_scale applies to model {TEACHER!r} only, not {spec.name!r}")
        return v


class ImageData(BaseModel):
    b64_json: str
    seed: int
    revised_prompt: str | None = None


class Timings(BaseModel):
    queue_ms: float = Field(description="Waiting for the device.")
    compute_ms: float = Field(description="From the first model call to the last image.")
    total_ms: float = Field(description="Accepted to answered, inside the server.")


class ImagesResponse(BaseModel):
    """OpenAI's ImagesResponse plus what was used to draw the images."""

    created: int
    data: list[ImageData]
    model: str
    steps: int
    seeds: list[int]
    size: str
    guidance_scale: float | None = None
    version: str
    timings: Timings
    output_format: Literal["png"] = "png"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "imagine-flash"
    kind: Literal["student", "teacher"]
    steps: list[int] | None = Field(description="The step counts accepted (null: any from min to max).")
    min_steps: int
    max_steps: int
    default_steps: int
    sizes: list[str]
    version: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    version: str
    backend: str
    decoder: Literal["full", "tiny"] = Field(
        "full", description="The VAE decoder every image goes through: the family's full one, or its fast one."
    )


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(None, description="Family folder to load; default: the one being served.")
    wait: bool = Field(
        True, description="Answer when the new version serves (or failed); false answers 202 at once."
    )


class ReloadStatus(BaseModel):
    state: Literal["idle", "loading", "ok", "failed"]
    version: str | None = None
    model_dir: str | None = None
    error: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every non-2xx answer: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorBody


ERROR_DESCRIPTIONS = {
    400: "Malformed request",
    401: "Missing or wrong bearer token",
    403: "Not allowed (admin endpoints disabled, or a folder outside the model store)",
    409: "A reload is already running",
    413: "Request body over FLASH_MAX_BODY_BYTES",
    415: "Body is not application/json",
    422: "Invalid request; the message names the allowed values",
    429: "Queue full or per-key rate limit; see Retry-After",
    499: "The client disconnected before its result was ready",
    500: "Generation failed (or an unexpected error; no details are sent)",
    503: "Not ready: loading, draining or stopped",
    504: "No result within FLASH_REQUEST_TIMEOUT_S",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for errors: each in the one shape, ErrorResponse."""
    return {s: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}

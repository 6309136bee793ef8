"""Service settings: one typed object, read from `FLASH_*` environment variables.

    FLASH_MODEL_DIR=models/shapes64 FLASH_MAX_BATCH_SIZE=16 FLASH_API_KEYS=key1,key2 make serve

Every field below is an environment variable: the field name upper-cased with the
`FLASH_` prefix (`max_wait_ms` -> `FLASH_MAX_WAIT_MS`). Lists take a comma-separated
string or a JSON list. A `.env` file is not read: the environment is the one source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from flash.models import TINY_VAE, Decoder
from flash.pipeline import CompileMode

DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
FULL_DECODER_ONLY = ("tensorrt",)  # backends without the fast decoder: the engines carry the full one only


class Settings(BaseSettings):
    """Everything `make serve` can be told; validated when built."""

    model_config = SettingsConfigDict(env_prefix="FLASH_", extra="forbid", frozen=True)

    model_dir: Path = Field(
        Path("models/shapes64"),
        description="Family folder to serve: a teacher with its students under students/ (made by distill/).",
    )
    host: str = Field(
        "127.0.0.1", description="Interface to bind; 0.0.0.0 exposes the server to the network."
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    device: str = Field("cpu", description="Torch device that runs the models: cpu, cuda, cuda:N or mps.")
    backend: str = Field(
        "auto",
        description="Inference backend (service.backends.BACKENDS): torch, onnxruntime, tensorrt, or auto: onnxruntime "
        "on cpu where the family has a usable export (onnx_dir, default <model_dir>/onnx), else torch; decided at "
        "every load.",
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="Most images in one U-Net call.")
    max_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="How long an idle device waits after a first teacher request for others to share its "
        "trajectory (student requests join a running batch at its next U-Net call and never wait).",
    )
    queue_size: int = Field(
        64, ge=1, le=100_000, description="Requests that may wait for the device; more get 429."
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="Deadline of one request, queueing included; past it 504."
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After header sent with 429.")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight work may take to finish."
    )
    max_prompt_chars: int = Field(1000, ge=1, description="Longest prompt accepted, in characters.")
    max_n: int = Field(4, ge=1, le=64, description="Most images per request.")
    max_teacher_steps: int = Field(
        100, ge=1, le=1000, description="Most sampling steps a teacher request may ask."
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys accepted on /v1/*; empty means no authentication. Comma-separated or JSON list.",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /admin/*; unset disables the admin endpoints."
    )
    rate_limit_per_s: float = Field(
        0.0,
        ge=0,
        description="Requests a second each API key (each client address without keys) may make "
        "on /v1/*; more get 429. 0 turns the limit off.",
    )
    rate_limit_burst: int = Field(
        10, ge=1, description="Requests a key may make at once before rate_limit_per_s applies."
    )
    max_body_bytes: int = Field(
        65_536, ge=1024, le=64 * 2**20, description="Largest request body accepted; larger gets 413."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (CORS); empty (default) sends no "
        "CORS headers. Comma-separated or JSON list.",
    )
    model_root: Path | None = Field(
        None,
        description="When set, POST /admin/reload only loads folders inside it (the model store); "
        "relative model_dir values are taken from it.",
    )
    onnx_dir: Path | None = Field(
        None, description="Folder made by `flash export onnx` (backend onnxruntime); default <model_dir>/onnx."
    )
    engine_dir: Path | None = Field(
        None, description="Folder made by `flash export tensorrt` (backend tensorrt); default <model_dir>/tensorrt."
    )
    ort_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: its default).")
    png_compress_level: int = Field(
        1, ge=0, le=9,
        description="deflate level of the PNGs sent (0 stores the pixels: least CPU per request, about twice the "
        "bytes of 1; 1-3 deflate with ISA-L, 4-9 with zlib; 9: smallest, slowest).",
    )
    trt_cuda_graphs: bool = Field(False, description="Capture CUDA graphs per batch-size bucket (tensorrt).")
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights and activations of the torch backend; auto is float16 on cuda, else float32."
    )
    torch_compile: CompileMode = Field(
        "off",
        description="torch.compile mode for the torch backend's U-Nets (reduce-overhead adds CUDA graphs); "
        "batches are padded to power-of-two buckets so each compiles once, during warm-up.",
    )
    decoder: Literal["auto", "full", "tiny"] = Field(
        "auto",
        description="auto: the family's fast decoder where it ships one (vae_tiny/) and the backend runs it "
        "(torch, onnxruntime), else its full VAE decoder; full: the family's VAE decoder; tiny: its fast decoder (made by "
        "`flash distill-decoder`; a few ms cheaper per image, its quality in docs/results.md; onnxruntime: an "
        "export made while the family had vae_tiny/).",
    )
    warmup: bool = Field(True, description="Run every model once before reporting ready.")
    log_level: str = Field("info", description="uvicorn log level: critical, error, warning, info, debug.")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if isinstance(v, str):
            v = v.strip()
            keys = json.loads(v) if v.startswith("[") else v.split(",")
            return [k.strip() for k in keys if k.strip()]
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origin_form(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
                raise ValueError(f"cors origin {origin!r} must be scheme://host[:port] or *")
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not DEVICE_PATTERN.match(v):
            raise ValueError(f"unknown device {v!r}; allowed: cpu, cuda, cuda:N, mps")
        return v

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from service.backends import BACKENDS

        if v not in BACKENDS:
            raise ValueError(f"unknown backend {v!r}; allowed: {', '.join(sorted(BACKENDS))}")
        return v

    def served_decoder(self, model_dir: str | Path) -> Decoder:
        """The decoder a family folder is served with: the setting, or for auto the fast one where
        the family ships it and the backend runs it (re-read on every load: a reload may bring one)."""
        if self.decoder != "auto":
            return self.decoder
        ships_tiny = (Path(model_dir) / TINY_VAE).is_dir()
        return "tiny" if ships_tiny and self.backend not in FULL_DECODER_ONLY else "full"

    @model_validator(mode="after")
    def _tiny_decoder_not_on_tensorrt(self) -> Settings:
        if self.decoder == "tiny" and self.backend in FULL_DECODER_ONLY:
            raise ValueError(
                "decoder=tiny runs on the torch and onnxruntime backends (the tensorrt engines have the full "
                "decoder only); use backend=torch, backend=onnxruntime or decoder=full"
            )
        return self

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if v.lower() not in levels:
            raise ValueError(f"unknown log_level {v!r}; allowed: {', '.join(levels)}")
        return v.lower()

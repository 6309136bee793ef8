"""Prometheus metrics, one `CollectorRegistry` per app (never the global one), so
several apps can live in one process (tests) without clashing.

The device thread never touches prometheus: `record_stage` only appends a tuple to a
deque (atomic under the GIL, no lock, no I/O); the asyncio side folds the backlog in
with `flush()` after each request and before each scrape.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service import errors

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
COMPUTE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("text_encoder", "unet", "vae_decode")
CONTENT_TYPE = CONTENT_TYPE_LATEST
REJECTED = {  # error -> `reason` label of flash_requests_rejected_total
    errors.InvalidRequest: "invalid",
    errors.Unauthorized: "unauthorized",
    errors.NotReady: "not_ready",
    errors.QueueFull: "queue_full",
    errors.RateLimited: "rate_limited",
    errors.PayloadTooLarge: "too_large",
    errors.UnsupportedMediaType: "unsupported_media_type",
    errors.DeadlineExceeded: "deadline",
    errors.ClientGone: "client_disconnected",
}


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.request_latency = Histogram(
            "flash_request_duration_seconds",
            "Generation requests, accepted to answered, by model, steps and HTTP status.",
            ["model", "steps", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "flash_queue_wait_seconds",
            "Time a request waited for the device.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "flash_compute_duration_seconds",
            "Device time of one call, by stage (text_encoder, unet, vae_decode).",
            ["stage"],
            buckets=COMPUTE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "flash_batch_size_images",
            "Images advanced by one U-Net call (one teacher trajectory).",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.pending = Gauge(
            "flash_pending_requests", "Requests accepted and waiting for the device.", registry=r
        )
        self.images = Counter("flash_images_generated", "Images returned to clients.", ["model"], registry=r)
        self.rejected = Counter(
            "flash_requests_rejected",
            "Requests turned away before running, by reason.",
            ["reason"],
            registry=r,
        )
        self.failed = Counter(
            "flash_requests_failed", "Requests that failed while running, by reason.", ["reason"], registry=r
        )
        self.model_info = Info("flash_model", "The model version being served, its backend and decoder.", registry=r)
        self._stages: deque[tuple[str, float, int, str]] = deque()
        for stage in STAGES:
            self.compute.labels(stage)  # expose every stage from the start

    def record_stage(self, stage: str, seconds: float, size: int, model: str) -> None:
        """Called on the device thread: an append, nothing else."""
        self._stages.append((stage, seconds, size, model))

    def flush(self) -> None:
        while self._stages:
            stage, seconds, size, model = self._stages.popleft()
            self.compute.labels(stage).observe(seconds)
            if stage == "unet":
                self.batch_size.labels(model).observe(size)

    def count_error(self, e: errors.ServiceError) -> None:
        if isinstance(e, errors.GenerationFailed):
            self.failed.labels(e.reason).inc()
        elif type(e) in REJECTED:
            self.rejected.labels(REJECTED[type(e)]).inc()

    def count_done(self, model: str, images: int, queue_s: float) -> None:
        self.queue_wait.labels(model).observe(queue_s)
        self.images.labels(model).inc(images)

    def set_model(self, version: str, backend: str, family: str, model_dir: str, decoder: str = "full") -> None:
        self.model_info.info(
            {"version": version, "backend": backend, "family": family, "model_dir": model_dir, "decoder": decoder}
        )

    def exposition(self) -> bytes:
        self.flush()
        return generate_latest(self.registry)

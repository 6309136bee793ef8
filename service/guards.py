"""Request guards that run before a handler: body size, per-key rate, model-store confinement.

None of them knows HTTP statuses: they raise or hand `service.errors` to a `reject`
callable, and `app.py` maps those to the one error shape, as for every other error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from service import errors

BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


class BodySizeLimit:
    """Pure ASGI middleware: a request body over `max_bytes` gets 413 before any handler runs.

    The Content-Length header is checked first (no byte is read); a body without one
    (chunked) is read as it streams and refused as soon as it passes the limit. An
    accepted body is held (at most `max_bytes`) and replayed to the app, so no handler
    ever sees more than the limit. `reject(error)` builds the ASGI response to send.
    """

    def __init__(self, app, max_bytes: int, reject: Callable[[errors.ServiceError], Callable]):
        self.app, self.max_bytes, self.reject = app, max_bytes, reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        too_large = errors.PayloadTooLarge(f"request body is larger than the {self.max_bytes} byte limit")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                return await self.reject(errors.InvalidRequest("invalid Content-Length header"))(
                    scope, receive, send
                )
            if declared > self.max_bytes:
                return await self.reject(too_large)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending: nobody to answer
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self.reject(too_large)(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[dict], receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
    """`receive` that returns `messages` first, then the connection's own (disconnect)."""
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One token bucket per caller: `rate` tokens a second, at most `burst` saved up.

    `take(who)` spends a token and returns 0.0, or returns the seconds until one is
    available (nothing spent). Callers whose bucket is full again are forgotten once
    more than `max_callers` are tracked, so the table stays bounded.
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic, max_callers: int = 10_000
    ):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate, self.burst, self.clock, self.max_callers = rate, burst, clock, max_callers
        self._buckets: dict[str, _Bucket] = {}

    def take(self, who: str) -> float:
        now = self.clock()
        b = self._buckets.get(who)
        if b is None:
            if len(self._buckets) >= self.max_callers:
                self._forget_full(now)
            b = self._buckets[who] = _Bucket(float(self.burst), now)
        b.tokens = min(float(self.burst), b.tokens + (now - b.updated) * self.rate)
        b.updated = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)

    def _forget_full(self, now: float) -> None:
        for who, b in list(self._buckets.items()):
            if b.tokens + (now - b.updated) * self.rate >= self.burst:
                del self._buckets[who]


def rate_limited(wait_s: float) -> errors.RateLimited:
    retry = max(1, math.ceil(wait_s))
    return errors.RateLimited(f"rate limit exceeded for this API key; retry in {retry} s", retry)


def confine(model_dir: str, root: Path | None) -> Path:
    """The folder an admin reload may load: anything when `root` is None, else a folder
    inside `root` (relative names are taken from `root`; `..` and symlinks are resolved
    before the check, so neither can lead outside)."""
    if "\x00" in model_dir:
        raise errors.InvalidRequest("model_dir must not contain NUL characters", "model_dir")
    path = Path(model_dir)
    if root is None:
        return path
    given = Path(root) / path  # an absolute `path` replaces `root` here
    base = Path(root).resolve()
    if not given.resolve().is_relative_to(base):
        raise errors.Forbidden(f"model_dir {model_dir!r} is outside the model store {base}", "model_dir")
    return given  # as given, so a `current` link is followed again at the next reload

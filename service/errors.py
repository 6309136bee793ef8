"""The service's own exceptions. They say what went wrong, not which HTTP status it
is: `app.py` maps them to statuses and to the one JSON error shape at the boundary."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class; `param` names the request field at fault, if any."""

    code = "error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServiceError):
    code = "invalid_value"


class Unauthorized(ServiceError):
    code = "invalid_api_key"


class AdminDisabled(ServiceError):
    code = "admin_disabled"


class NotReady(ServiceError):
    code = "not_ready"


class Forbidden(ServiceError):
    """Authenticated, but asking for something no one may have (a folder outside the store)."""

    code = "forbidden"


class PayloadTooLarge(ServiceError):
    code = "request_too_large"


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"


class QueueFull(ServiceError):
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(ServiceError):
    """This API key spent its token bucket (FLASH_RATE_LIMIT_PER_S, FLASH_RATE_LIMIT_BURST)."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServiceError):
    code = "deadline_exceeded"


class GenerationFailed(ServiceError):
    """A batch raised, returned the wrong number of outputs, or non-finite values."""

    code = "generation_failed"

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class ReloadInProgress(ServiceError):
    code = "reload_in_progress"


class ReloadFailed(ServiceError):
    code = "reload_failed"


class ClientGone(ServiceError):
    """The client hung up before its result was ready; its job was dropped."""

    code = "client_disconnected"

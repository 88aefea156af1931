"""Domain exceptions that carry their HTTP status, rendered as one JSON shape."""

from __future__ import annotations


class ConfigError(Exception):
    """The service cannot start with this configuration."""


class ProgressError(Exception):
    status_code = 500
    code = "internal"

    def __init__(self, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}


class InvalidInput(ProgressError):
    status_code = 400
    code = "invalid_input"


class Unauthorized(ProgressError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ProgressError):
    status_code = 403
    code = "forbidden"


class JobNotFound(ProgressError):
    status_code = 404
    code = "not_found"


class Conflict(ProgressError):
    status_code = 409
    code = "conflict"


class JobFinished(Conflict):
    code = "job_finished"


class StaleAttempt(Conflict):
    code = "stale_attempt"


class BodyTooLarge(ProgressError):
    status_code = 413
    code = "body_too_large"


class UnsupportedMediaType(ProgressError):
    status_code = 415
    code = "unsupported_media_type"


class TooManyStreams(ProgressError):
    status_code = 429
    code = "too_many_streams"


class Unavailable(ProgressError):
    status_code = 503
    code = "unavailable"

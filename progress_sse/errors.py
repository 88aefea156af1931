"""Domain exceptions that carry their HTTP status, and the one renderer of the JSON
error shape (`{"error": {"code", "message", "field"?}}`) every refusal uses: the route
handlers', the security layer's, and the request limits' (as bytes, below uvicorn)."""

from __future__ import annotations

import structlog
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .codec import dumps

log = structlog.get_logger("progress_sse.http")


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


class Refused(ProgressError):
    """A refusal named by its status and code: a foreign Host, the router's 404 and 405."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.status_code = status
        self.code = code


class CrossOrigin(Forbidden):
    code = "cross_origin"


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    """The error shape's bytes, with the newline a terminal wants after it."""
    err: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return dumps({"error": err}).encode() + b"\n"


def error_response(exc: ProgressError) -> Response:
    """The answer for one of our errors: its status, the error shape, its headers."""
    return Response(error_body(exc.code, exc.message, exc.field), status_code=exc.status_code,
                    media_type="application/json", headers=exc.headers or None)


class BugAnswer:
    """Any exception that is not one of ours (a bug) answered with a JSON 500, logged
    with its traceback. Inside the request log and security layers, unlike Starlette's
    ServerErrorMiddleware (outside them all), so the answer carries the request id and
    the security headers like any other, and the log line its status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if started:
                raise  # part of an answer is out: nothing to add to it
            log.exception("request.failed", path=scope["path"])
            await error_response(ProgressError("internal error; see the server log"))(
                scope, receive, send)

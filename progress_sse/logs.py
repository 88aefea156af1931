"""structlog set-up and a pure ASGI middleware that logs one line per request."""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .request_headers import header

log = structlog.get_logger("progress_sse.http")

# the request a log line is written for. One variable set per request instead of
# structlog's bind_contextvars, which measured 4% of a worker post's CPU; a request's
# task starts from a copy of the server's context, so the value is its own
_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "progress_sse_request_id", default=None)


def _add_request_id(logger: Any, method: str, event: MutableMapping[str, Any]
                    ) -> MutableMapping[str, Any]:
    request_id = _REQUEST_ID.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event

REDACTED_PARAMS = ("access_token", "token")


def json_logs(fmt: str) -> bool:
    """Whether the log is JSON lines: asked for, or stderr is not a terminal."""
    return fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog; JSON when stderr is not a terminal, readable otherwise."""
    use_json = json_logs(fmt)
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_request_id,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,  # structlog's advice for speed: no rebind per call
    )


def redact_query(query: str) -> str:
    """Hide credentials carried in the query string before it reaches a log line."""
    if not query:
        return query
    parts = []
    for part in query.split("&"):
        key = part.split("=", 1)[0]
        parts.append(f"{key}=REDACTED" if key in REDACTED_PARAMS else part)
    return "&".join(parts)


class RequestLogMiddleware:
    """Bind a request id, answer with it (`X-Request-Id`), and log one line per request
    (a stream's when it opens); each request's end is also `observe`d (metrics)."""

    def __init__(self, app: ASGIApp,
                 observe: Callable[[Scope, int, float], None] = lambda *_: None) -> None:
        self.app = app
        self._observe = observe  # each request's end: scope, status, seconds
        self._prefix = os.urandom(4).hex()  # per process; a counter makes the rest unique
        self._counter = itertools.count(1)
        # the logger behind the module's lazy proxy, taken at the first request's end
        # (as the proxy keeps it once used: cache_logger_on_first_use); through the
        # proxy every call built a bound logger first, 1.7% of a post's CPU
        self._log: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _incoming_request_id(scope) or f"{self._prefix}{next(self._counter):08x}"
        _REQUEST_ID.set(request_id)
        answered_id = request_id.encode()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", answered_id)]}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._end(scope, status, start)

    def _end(self, scope: Scope, status: int, start: float) -> None:
        seconds = time.perf_counter() - start
        self._observe(scope, status, seconds)
        if self._log is None:
            self._log = log.bind()
        if self._log.is_enabled_for(logging.INFO):  # else skip building the line's fields
            _log_request(self._log, scope, status, seconds)


def _log_request(logger: Any, scope: Scope, status: int, seconds: float) -> None:
    query = scope.get("query_string", b"").decode("latin-1")
    logger.info(
        "request",
        method=scope["method"],
        path=scope["path"],
        query=redact_query(query) or None,
        status=status,
        duration_ms=round(seconds * 1000, 2),
    )


def _incoming_request_id(scope: Scope) -> str | None:
    rid = header(scope, b"x-request-id")
    return rid if rid is not None and 0 < len(rid) <= 64 and rid.isprintable() else None

"""create_app(settings): the Starlette application, its lifespan, routes and error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from . import api, control, openapi, tokens
from .codec import dumps
from .context import Context
from .errors import ProgressError
from .fastpath import HotRoutes
from .hub import Hub
from .logs import RequestLog, RequestLogMiddleware
from .metrics import Metrics
from .security import DashboardLogin, Policy, SecurityMiddleware, StreamQuota
from .settings import Settings
from .store import guard
from .store.lock import DatabaseLock
from .store.sqlite import SQLiteStore
from .streams import STREAM_HOST, StreamHost

log = structlog.get_logger("progress_sse.app")

_HERE = Path(__file__).resolve().parent
# a wheel carries the dashboard inside the package (setup.cfg); a checkout has it at its top
WEB_DIR = _HERE / "_web" if (_HERE / "_web").is_dir() else _HERE.parent / "web"


class Service(Starlette):
    """The application. Its outermost layer serves the hot routes itself (see fastpath),
    and runs streams once the layers that started them have returned (see
    streams.StreamHost)."""

    def __init__(self, *, hot: HotRoutes, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hot = hot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        host = scope[STREAM_HOST] = StreamHost(send)
        try:
            endpoint = self.hot.match(scope)
            if endpoint is None:
                await super().__call__(scope, receive, send)
            else:
                scope["app"] = self
                await self.hot.serve(endpoint, scope, receive, send)
        except BaseException:
            if host.stream is not None:
                host.stream.release()
            raise
        stream, host.stream = host.stream, None
        if stream is not None:
            # the request's own caches (headers, identity) are done with; a stream lives on
            for key in [k for k in scope if k.startswith("progress_sse.")]:
                del scope[key]
            await stream.run(receive, send)


class WebMount(Mount):
    """The dashboard's files at "/", claiming only what could be one of them. A mount at
    "/" matches every path, so without this a POST to a mistyped API path
    (`/api/jobs/X/progres`) reached StaticFiles and was answered 405, and a GET to an
    API path of another method (POST only) 404: the router's own answers are the
    right ones (404 for no such path, 405 with `Allow` for another method's route)."""

    def __init__(self, files: StaticFiles, app: ASGIApp) -> None:
        super().__init__("/", app, name="web")
        self.files = files

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path: str = scope.get("path", "")
        if path == "/api" or path.startswith("/api/"):
            return Match.NONE, {}
        if scope.get("method", "GET") not in ("GET", "HEAD") and not self._exists(path):
            return Match.NONE, {}
        return super().matches(scope)

    def _exists(self, path: str) -> bool:
        """A file or folder of the dashboard (a stat; only for methods it does not serve)."""
        relative = os.path.normpath(os.path.join(*path.split("/")))
        return self.files.lookup_path(relative)[1] is not None


def create_app(settings: Settings | None = None, *, lock: DatabaseLock | None = None
               ) -> Starlette:
    """Build one independent service instance (nothing shared between instances).
    `lock`: the database, already locked and migrated by guard.prepare (the command
    line does it before the server starts, to refuse without a traceback)."""
    settings = settings or Settings()
    settings.validate_security()  # no unauthenticated service on a public address
    if settings.auth == "none" and not settings.loopback:
        log.warning("auth.disabled_on_public_address", host=settings.host,
                    hint="anyone who can reach this address can read and control every job")
    metrics = Metrics()  # this app's own registry
    store = SQLiteStore(settings.db, synchronous=settings.synchronous,
                        retention_events=settings.retention_events,
                        estimate_every_s=settings.estimate_every_s,
                        write_timeout_s=settings.write_timeout_s,
                        on_commit=metrics.commit_landed)
    hub = Hub(settings.tail_size, settings.tail_bytes)
    ctx = Context(settings=settings, store=store, hub=hub, metrics=metrics)
    metrics.watch(ctx)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # one service per file, not a damaged one; migrated (see store/guard.py)
        held = lock if lock is not None else await asyncio.to_thread(guard.prepare,
                                                                     settings.db)
        try:
            head = await store.start(hub.publish)
        except BaseException:
            held.release()
            raise
        hub.reset(head)
        stalls = asyncio.create_task(control.watch_stalls(ctx), name="progress-sse-stalls")
        ticks = asyncio.create_task(hub.keep_alive(settings.keepalive_s / 3),
                                    name="progress-sse-keepalive")
        log.info("service.started", db=settings.db, head=head, auth=settings.auth)
        try:
            yield
        finally:
            hub.close()
            for task in (stalls, ticks):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await store.close()
            held.release()
            log.info("service.stopped", head=hub.head)

    routes: list[BaseRoute] = [*api.routes(), *control.routes(), *tokens.routes(),
                               *openapi.routes()]
    if WEB_DIR.is_dir():
        files = StaticFiles(directory=WEB_DIR, html=True)
        routes.append(WebMount(files, DashboardLogin(files, settings)))
    requests = RequestLog(metrics.request_done)
    policy = Policy(settings)
    app = Service(
        hot=HotRoutes(api.hot_routes(), requests, policy, error_answer),
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(RequestLogMiddleware, requests=requests),
                    Middleware(SecurityMiddleware, policy=policy)],
        exception_handlers={
            ProgressError: _progress_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
    # a path with a slash too many is no such path (404), as when the dashboard's mount
    # answered every path; not a redirect to the route without it
    app.router.redirect_slashes = False
    app.state.ctx = ctx
    # one user without authentication: a per-user cap would cap the whole service
    app.state.stream_quota = StreamQuota(settings.max_streams_per_user
                                         if settings.auth == "jwt" else 0)
    return app


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    err: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return Response(dumps({"error": err}) + "\n", status_code=status,
                    media_type="application/json", headers=headers)


def progress_error_response(exc: ProgressError) -> Response:
    return error_response(exc.status_code, exc.code, exc.message, exc.field, exc.headers)


async def _progress_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProgressError)
    return progress_error_response(exc)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if exc.status_code != 404 else f"no such path: {request.url.path}"
    return error_response(exc.status_code, code, str(message),
                          headers=dict(exc.headers) if exc.headers else None)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("request.failed", path=request.url.path)
    return error_answer(exc)


def error_answer(exc: Exception) -> Response:
    """Our errors as they are; anything else is a bug, answered with a 500."""
    if isinstance(exc, ProgressError):
        return progress_error_response(exc)
    return error_response(500, "internal", "internal error; see the server log")

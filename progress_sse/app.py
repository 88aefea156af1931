"""create_app(settings): the Starlette application, its lifespan, routes and error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.httpsredirect import HTTPSRedirectMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from . import api, control, openapi, worker_tokens
from .app_context import Context
from .errors import BugAnswer, ProgressError, Refused, error_response
from .hub import Hub
from .logs import RequestLogMiddleware
from .metrics import Metrics
from .notify.service import Notifications
from .security import (
    CORS_EXPOSE,
    CORS_HEADERS,
    CORS_METHODS,
    DashboardLogin,
    Policy,
    SecurityMiddleware,
)
from .settings import Settings
from .store import Event, factory
from .store.lock import DatabaseLock
from .store.postgres_schema import Migrated, redacted
from .streams import STREAM_HOST, StreamHost
from .uvicorn_direct import check as check_direct_writes

log = structlog.get_logger("progress_sse.app")

_HERE = Path(__file__).resolve().parent
# a wheel carries the dashboard inside the package (setup.cfg); a checkout has it at its top
WEB_DIR = _HERE / "_web" if (_HERE / "_web").is_dir() else _HERE.parent / "web"


# middleware that only add headers to a response's start (or answer before the app):
# a stream may write its body past them (see Service). Any other middleware could
# transform bodies (gzip, tracing), so with one in the stack streams run through it.
START_ONLY_MIDDLEWARE: frozenset[object] = frozenset({
    RequestLogMiddleware, SecurityMiddleware, CORSMiddleware, BugAnswer,
    TrustedHostMiddleware, HTTPSRedirectMiddleware})


def leaves_bodies(middleware: Middleware) -> bool:
    """Whether this middleware leaves response bodies alone: one of ours or Starlette's
    known to (START_ONLY_MIDDLEWARE), or a class that says so with `leaves_bodies = True`."""
    cls: object = middleware.cls
    return cls in START_ONLY_MIDDLEWARE or getattr(cls, "leaves_bodies", False) is True


class Service(Starlette):
    """The application: one request pipeline for every route, streams included.

    A stream starts like any answer, through every layer (their headers, the request's
    log line), and then, when every middleware in the stack leaves bodies alone, runs
    once they have all returned, with the server's own `send` (streams.StreamHost): an
    idle stream keeps six suspended frames instead of eleven, and its live chunks can
    be written straight to uvicorn's connection (uvicorn_direct). With a middleware
    that may transform bodies in the stack, streams run inside it like any response,
    every chunk through its `send`, so it works; the start-up log says so."""

    streams_after_layers = True

    def build_middleware_stack(self) -> ASGIApp:
        transforming = [m.cls.__name__ for m in self.user_middleware  # type: ignore[attr-defined]
                        if not leaves_bodies(m)]
        self.streams_after_layers = not transforming
        if transforming:
            log.warning("streams.through_middleware", middleware=transforming,
                        why="it may transform bodies: each stream chunk goes through its "
                            "send (slower); set leaves_bodies = True on a middleware "
                            "that only adds headers")
        return super().build_middleware_stack()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        if not self.streams_after_layers:
            await super().__call__(scope, receive, send)
            return
        host = scope[STREAM_HOST] = StreamHost(send)
        try:
            await super().__call__(scope, receive, send)
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


def create_app(settings: Settings | None = None, *,
               lock: DatabaseLock | Migrated | None = None
               ) -> Starlette:
    """Build one independent service instance (nothing shared between instances).
    `lock`: the database, already locked and migrated by guard.prepare (the command
    line does it before the server starts, to refuse without a traceback)."""
    settings = settings or Settings()
    settings.validate_all()  # no unauthenticated service on a public address, no unsigned webhook
    if settings.auth == "none" and not settings.loopback:
        log.warning("auth.disabled_on_public_address", host=settings.host,
                    hint="anyone who can reach this address can read and control every job")
    metrics = Metrics()  # this app's own registry
    store = factory.open_store(settings, on_commit=metrics.commit_landed)
    hub = Hub(settings.tail_size, settings.tail_bytes)
    why_not = check_direct_writes()
    if why_not is not None:  # streams use uvicorn's public send alone: slower, as lossless
        log.warning("streams.direct_writes_off", why=why_not)
    notes = Notifications(settings, store)
    ctx = Context(settings=settings, store=store, hub=hub, metrics=metrics,
                  direct_writes=why_not is None, notifications=notes)
    metrics.watch(ctx)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # one service per file, not a damaged one; migrated (see store/guard.py)
        held = lock if lock is not None else await asyncio.to_thread(factory.prepare,
                                                                     settings.db)

        def publish(events: Sequence[Event]) -> None:
            hub.publish(events)
            notes.committed(events)  # a finish may be due for delivery

        try:
            head = await store.start(publish)
        except BaseException:
            held.release()
            raise
        hub.reset(head)
        stalls = asyncio.create_task(control.watch_stalls(ctx), name="progress-sse-stalls")
        ticks = asyncio.create_task(hub.keep_alive(settings.keepalive_s / 3),
                                    name="progress-sse-keepalive")
        notes.start()
        log.info("service.started", db=redacted(settings.db), head=head, auth=settings.auth)
        try:
            yield
        finally:
            hub.close()
            await notes.stop()
            for task in (stalls, ticks):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await store.close()
            held.release()
            log.info("service.stopped", head=hub.head)

    routes: list[BaseRoute] = [*api.routes(), *control.routes(), *worker_tokens.routes(),
                               *openapi.routes()]
    if WEB_DIR.is_dir():
        files = StaticFiles(directory=WEB_DIR, html=True)
        routes.append(WebMount(files, DashboardLogin(files, settings)))
    middleware = [Middleware(RequestLogMiddleware, observe=metrics.request_done),
                  Middleware(SecurityMiddleware, policy=Policy(settings)),
                  Middleware(BugAnswer)]
    if settings.cors_origin_list:  # else no layer: nothing to add to any answer
        middleware.insert(2, Middleware(
            CORSMiddleware, allow_origins=[o.lower() for o in settings.cors_origin_list],
            allow_credentials=True, allow_methods=CORS_METHODS, allow_headers=CORS_HEADERS,
            expose_headers=CORS_EXPOSE, max_age=600))
    app = Service(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={
            ProgressError: _progress_error,
            HTTPException: _http_error,
        },
    )
    # a path with a slash too many is no such path (404), as when the dashboard's mount
    # answered every path; not a redirect to the route without it
    app.router.redirect_slashes = False
    app.state.ctx = ctx
    return app


async def _progress_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProgressError)
    return error_response(exc)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such path, another method) in our error shape."""
    assert isinstance(exc, HTTPException)
    message = exc.detail if exc.status_code != 404 else f"no such path: {request.url.path}"
    return error_response(Refused(exc.status_code, _HTTP_CODES.get(exc.status_code,
                                                                   "http_error"),
                                  str(message), dict(exc.headers or {})))

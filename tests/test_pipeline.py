"""One request pipeline: a middleware added to the app sees every request, worker
posts and streams included, and streams work behind one that transforms bodies."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Callable
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from progress_sse import uvicorn_direct
from progress_sse.app import Service as App
from progress_sse.settings import Settings
from progress_sse.streams import EventStream

from .helpers import Service, create_job, start_service, wait_for
from .stored import db_events

SSE = {"Accept": "text/event-stream"}
TAG = b": tagged\n"


class Tagging:
    """Body-transforming middleware, as tracing or compression is: each chunk of a
    stream gets a comment line in front (valid SSE, visible on the wire)."""

    def __init__(self, app: ASGIApp, seen: list[str]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.seen.append(f"{scope['method']} {scope['path']}")
        stream = False

        async def tagging(message: Message) -> None:
            nonlocal stream
            if message["type"] == "http.response.start":
                stream = (b"content-type", b"text/event-stream; charset=utf-8") in \
                    message["headers"]
            elif stream and message.get("body"):
                message = {**message, "body": TAG + message["body"]}
            await send(message)

        await self.app(scope, receive, tagging)


class HeadersOnly(Tagging):
    """The same, declared to leave bodies alone (it does not, which the test sees)."""

    leaves_bodies = True


def adding(cls: type, **options: Any) -> Callable[[ASGIApp], ASGIApp]:
    def wrap(app: ASGIApp) -> ASGIApp:
        assert isinstance(app, App)
        app.add_middleware(cls, **options)
        return app
    return wrap


async def read_live(svc: Service, posts: int) -> tuple[bytes, list[int], int]:
    """A stream's raw bytes and event ids while `posts` progress posts go out, one at a
    time once it is live; and the job's id list as stored."""
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c:
        job = await create_job(c)
        raw = b""
        async with c.stream("GET", f"/api/jobs/{job['id']}/events", headers=SSE) as r:
            chunks = r.aiter_raw()
            while b"event: snapshot" not in raw:
                raw += await anext(chunks)
            for i in range(posts):
                await wait_for(lambda: svc.ctx.hub.live == 1, what="the stream is live")
                p = await c.post(f"/api/jobs/{job['id']}/progress", json={"progress": i})
                assert p.status_code == 200
                event_id = p.json()["event_id"]
                async with asyncio.timeout(5):
                    while f"id: {event_id}\n".encode() not in raw:
                        raw += await anext(chunks)
    ids = [int(line[4:]) for line in raw.decode().splitlines() if line.startswith("id: ")]
    stored = [e["id"] for e in await db_events(svc.settings.db) if e["job_id"] == job["id"]]
    return raw, ids, stored[-1]


async def test_a_body_transforming_middleware_sees_every_stream_chunk(
        settings: Settings) -> None:
    """With a middleware that may transform bodies, streams run inside it: every chunk,
    live pushes included, passes its send; nothing is lost; posts pass it too."""
    seen: list[str] = []
    svc = await start_service(settings, wrap=adding(Tagging, seen=seen))
    try:
        raw, ids, last = await read_live(svc, 5)
        pieces = raw.split(TAG)
        assert pieces[0] == b"" and all(pieces[1:]), "a chunk went past the middleware"
        assert len(pieces) - 1 >= 6  # the snapshot's chunk and each of the five posts
        assert ids[-1] == last and ids == sorted(set(ids))
        assert any(s.endswith("/progress") and s.startswith("POST") for s in seen)
        assert any(s.endswith("/events") for s in seen)
    finally:
        await svc.stop()


async def test_a_middleware_that_leaves_bodies_alone_keeps_the_direct_path(
        settings: Settings) -> None:
    """`leaves_bodies = True` (and our own layers): streams run past the middleware
    once started, and live chunks go straight to uvicorn's connection."""
    seen: list[str] = []
    svc = await start_service(settings, wrap=adding(HeadersOnly, seen=seen))
    try:
        raw, ids, last = await read_live(svc, 5)
        assert TAG not in raw  # it said so: its send is not on a stream's body path
        assert ids[-1] == last
        assert svc.ctx.hub.catch_ups == 1
        assert any(s.startswith("POST") and s.endswith("/progress") for s in seen)
    finally:
        await svc.stop()


async def test_streams_and_answers_behind_starlettes_gzip(settings: Settings) -> None:
    """Starlette's GZipMiddleware compresses JSON answers and leaves event streams as
    they are (it excludes text/event-stream); streams work behind it."""
    svc = await start_service(settings, wrap=adding(GZipMiddleware, minimum_size=100))
    try:
        raw, ids, last = await read_live(svc, 3)
        assert ids[-1] == last and b"event: snapshot" in raw  # not compressed
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c:
            for i in range(5):
                await create_job(c, title=f"a job with a title long enough {i}")
            r = await c.get("/api/jobs", headers={"Accept-Encoding": "gzip"})
            assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
            assert len(r.json()["jobs"]) == 6
    finally:
        await svc.stop()


async def test_without_direct_writes_streams_use_the_public_send(settings: Settings) -> None:
    """The fallback when uvicorn_direct's start-up check fails: every push is sent by a
    catch-up task through uvicorn's send, and readers get every event in order."""
    def no_direct(app: ASGIApp) -> ASGIApp:
        assert isinstance(app, App)
        app.state.ctx.direct_writes = False
        return app

    svc = await start_service(settings, wrap=no_direct)
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c, \
                contextlib.AsyncExitStack() as stack:
            job = await create_job(c)
            sources = [(await stack.enter_async_context(
                aconnect_sse(c, "GET", "/api/events", headers=SSE))).aiter_sse()
                for _ in range(3)]
            for events in sources:
                assert (await anext(events)).event == "snapshot"
            await wait_for(lambda: svc.ctx.hub.live == 3, what="3 live streams")
            gc.collect()
            assert all(o._writer is None for o in gc.get_objects()
                       if isinstance(o, EventStream))
            posted = [str((await c.post(f"/api/jobs/{job['id']}/progress",
                                        json={"progress": i})).json()["event_id"])
                      for i in range(1, 21)]
            for events in sources:
                got = [(await anext(events)).id for _ in range(20)]
                assert got == posted
        assert svc.ctx.hub.catch_ups > 3 + 20
    finally:
        await svc.stop()


def test_the_direct_path_checks_uvicorns_version_and_attributes() -> None:
    """On the installed uvicorn (inside setup.cfg's range) the check passes; a version
    outside the range is refused with the reason, and the service uses the public send."""
    assert uvicorn_direct.check() is None
    low, high = uvicorn_direct.SUPPORTED
    assert uvicorn_direct.check(f"{low[0]}.{low[1]}.0") is None
    assert uvicorn_direct.check(f"{high[0]}.{high[1] - 1}.9") is None
    for outside in (f"{high[0]}.{high[1]}.0", f"{low[0]}.{low[1] - 1}.9", "1.0.0"):
        why = uvicorn_direct.check(outside)
        assert why is not None and outside in why and "outside the range" in why

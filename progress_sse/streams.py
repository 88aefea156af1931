"""SSE endpoints: cursor, resume, snapshot, keep-alive, 204 once a job has finished.

A stream registers for wake-ups before it reads, reads from its cursor (the hub's
tail, or the store when the cursor is older than the tail), sends what is newer
than the cursor, and waits. Everything it sends comes from the store's log, so a
reconnect with the last id it saw continues with exactly the next event.

The response is our own small ASGI callable rather than sse-starlette's
EventSourceResponse, which runs four tasks per stream and a cancel scope and lock
per chunk: measured here at 70 us of server CPU per delivered event and 50 KiB per
idle stream. This one keeps the request's own task waiting for the client to
leave, catches up in a task only while it is behind, and is pushed live events by
the hub (see EventStream); keep-alives come from the hub's periodic tick, so an
idle stream owns no timer and no task but its request's.

A stream may outlive the layers that started it: `EventStream.__call__` sends the
response start through all of them (security headers, request id, the request's
log line), then, when the app lends a `StreamHost` (every middleware leaves bodies
alone: see app.Service), leaves the stream there to run once they have all
returned, with the server's own `send`. So an idle stream keeps six suspended
coroutine frames instead of eleven, and its live chunks can go straight to
uvicorn's connection (uvicorn_direct).

At about 420 lines this module is over the size we aim for: it is one response's
life (start, catch-up, live pushes, the end), and the invariants that keep a stream
lossless (the cursor never moves back, pushes at or below it are dropped, a
subscription follows a read with no await between) hold across all of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from .app_context import Context
from .auth import identify
from .errors import InvalidInput, JobNotFound
from .jobs import Job
from .request_headers import header
from .store import Event, Filter
from .uvicorn_direct import ChunkWriter, chunk_writer

log = structlog.get_logger("progress_sse.streams")


@dataclass(frozen=True)
class StreamSpec:
    flt: Filter
    cursor: int | None  # None: a fresh connection, starting with a snapshot
    job_id: str | None = None  # a per-job stream, which ends after the job's finished event


def parse_last_event_id(request: Request) -> int | None:
    """The resume point from the header, else from ?last_event_id=; a bad one is a 400."""
    raw = header(request.scope, b"last-event-id")
    field = "Last-Event-ID"
    if raw is None:
        raw = request.query_params.get("last_event_id")
        field = "last_event_id"
    if raw is None or raw.strip() == "":
        return None
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:  # not '²', which int() refuses
        raise InvalidInput(
            f"{field} must be a non-negative integer event id, got {raw[:40]!r}", field=field
        )
    return int(raw)


STREAM_HOST = "progress_sse.stream_host"


@dataclass(slots=True)
class StreamHost:
    """What the app's outermost layer (`app.Service`) lends a stream when every layer
    leaves bodies alone: the server's own send, and a slot to leave a started stream
    in, to run once every layer inside it (Starlette's, ours, the route's) has returned."""

    send: Send
    stream: EventStream | None = None


async def job_stream(request: Request, ctx: Context, job: Job, flt: Filter) -> Response:
    """The SSE stream of one job; 204 when the caller has already seen its end."""
    cursor = parse_last_event_id(request)
    if cursor is not None and job.final_event_id is not None and cursor >= job.final_event_id:
        return Response(status_code=204)
    spec = StreamSpec(flt=flt, cursor=cursor, job_id=job.id)
    return open_stream(request, ctx, spec)


def open_stream(request: Request, ctx: Context, spec: StreamSpec) -> Response:
    release = ctx.stream_quota.acquire(identify(request).subject)  # 429 when full
    client = request.client.host if request.client else None
    return EventStream(ctx, spec, client, on_close=release)


_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store, no-transform"),  # no proxy may compress it (and stall it)
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer this response
]


class EventStream(Response):
    """A text/event-stream response that runs one stream of `spec` until it ends.

    The request's task only waits for the client to leave (or for `stop`). Catching
    up (snapshot, replay from the tail or the store) runs in a task of its own until
    the cursor reaches the head; then the stream subscribes to the hub, which pushes
    each new event to it as it is published, and no task of this stream is left
    running. A push is written at once, straight to the connection, where
    `uvicorn_direct` can (uvicorn's httptools protocol, no middleware wrapping the
    send). When it cannot, or the connection cannot take it now, the stream
    unsubscribes and catches up again in a task from its cursor, which sends through
    the public `send`: a slow reader waits alone and loses nothing.
    """

    media_type = "text/event-stream"

    def __init__(self, ctx: Context, spec: StreamSpec, client: str | None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = _HEADERS
        self.ctx, self.spec, self.client = ctx, spec, client
        self.on_close = on_close
        flt = spec.flt
        # a stream of one job is pushed only that job's events; several jobs or kinds: all
        self.key = spec.job_id if spec.job_id is not None else (
            next(iter(flt.job_ids)) if flt.job_ids is not None and len(flt.job_ids) == 1
            else None)
        self.everything = flt == Filter()
        # a plain tuple: hashed and compared in C, unlike the dataclass, once per push
        self.share_key = (flt.owner, flt.job_ids, flt.kinds, flt.statuses)
        self.quiet = ctx.settings.keepalive_s * 2 / 3  # the hub ticks every third of it
        self.cursor = 0
        self.sent = 0
        self.last_write = 0.0
        self.ending: str | None = None  # why it ends: finished, shutdown, error
        self._started = False  # the first catch-up (cursor check, snapshot) has run
        self._ping = False  # a keep-alive is due and could not be written at once
        self._listening = False  # the request's task waits for the client to leave
        self._writer: ChunkWriter | None = None  # live chunks straight to the connection
        self._send: Send = _not_started
        self._task: asyncio.Task[Any] | None = None
        self._pump: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Start the response through every layer (their headers, the request's log
        line), then leave the stream to the host to run, or run it here if none."""
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                self.release()
                return
        except BaseException:
            self.release()
            raise
        host: StreamHost | None = scope.get(STREAM_HOST)
        if host is not None:
            host.stream = self
        else:
            await self.run(receive, send)

    async def run(self, receive: Receive, send: Send) -> None:
        """The stream's life: catch up, go live, end when told or when the client leaves."""
        hub = self.ctx.hub
        try:
            self._send = send
            self._writer = chunk_writer(send, self.ctx.direct_writes)
            self._task = task = asyncio.current_task()
            assert task is not None
            started = time.monotonic()
            log.info("stream.opened", job_id=self.spec.job_id, resume_from=self.spec.cursor,
                     client=self.client)
            hub.opened(self)
            self._resume()
            self._listening = True
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except asyncio.CancelledError:
                if self.ending is None:
                    raise  # not our own stop: the server cancels the request
                task.uncancel()
            finally:
                self._listening = False
                hub.released(self, self.key)
                if self._pump is not None:
                    self._pump.cancel()
                log.info("stream.closed", job_id=self.spec.job_id, events=self.sent,
                         seconds=round(time.monotonic() - started, 3), shutdown=hub.closed,
                         ended=self.ending or "client left")
            # else the client left: nobody to tell; at shutdown, a reader that is not
            # reading is not waited for
            if self.ending is not None and not (self.ending == "shutdown"
                                                and self._writer is not None
                                                and self._writer.paused):
                await self._send({"type": "http.response.body", "body": b"",
                                  "more_body": False})
        finally:
            self.release()

    def release(self) -> None:
        """Give back what the stream holds outside itself (its quota slot); once."""
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()

    def stop(self, why: str) -> None:
        """End the stream: its request's task stops waiting and ends the response."""
        if self.ending is not None:
            return
        self.ending = why
        self.ctx.hub.unsubscribe(self, self.key)
        if self._listening and self._task is not None:
            self._task.cancel()

    # ---- live: called by the hub, in its publish or tick

    def push(self, events: Sequence[Event], shared: dict[Any, Any]) -> None:
        # streams with the same filter (a thousand dashboards of one owner) share one
        # chunk per publish: the filter runs and the chunk is built once for them all
        if events[0].id <= self.cursor:
            # subscribed ahead of the hub (its snapshot saw these): not sent twice
            events = [e for e in events if e.id > self.cursor]
            if not events:
                return
            shared = {}
        hit = shared.get(self.share_key)
        if hit is None:
            matched = self._matching(events)
            hit = (_chunk(b"".join([e.frame for e in matched])) if matched else b"", matched)
            shared[self.share_key] = hit
        chunk, matched = hit
        if not matched:
            return
        writer = self._writer
        if writer is None or len(chunk) > self.ctx.settings.stream_buffer_bytes:
            # through the public send (a task), or a big publish: sent in pieces instead
            self.fall_behind(events[0].id - 1)
            return
        try:
            written = writer.write(chunk)
        except Exception:
            log.exception("stream.failed", job_id=self.spec.job_id)
            self.stop("error")
            return
        if not written:
            self.fall_behind(events[0].id - 1)
            return
        self.sent += len(matched)
        self.last_write = time.monotonic()
        if self.spec.job_id is not None and _finished(matched, self.spec.job_id):
            self.stop("finished")

    def keep_alive(self, now: float) -> None:
        if now - self.last_write < self.quiet:
            return
        try:
            written = self._writer is not None and self._writer.write(_KEEP_ALIVE_CHUNK)
        except Exception:
            log.exception("stream.failed", job_id=self.spec.job_id)
            self.stop("error")
            return
        if written:
            self.last_write = now
        else:
            self._ping = True
            self.fall_behind(self.ctx.hub.head)

    def fall_behind(self, cursor: int) -> None:
        self.ctx.hub.unsubscribe(self, self.key)
        # never back: a stream that subscribed ahead of the hub has sent up to its cursor
        self.cursor = max(self.cursor, cursor)
        self._resume()

    def _matching(self, events: Sequence[Event]) -> Sequence[Event]:
        if self.everything:
            return events
        flt = self.spec.flt
        return [e for e in events if flt.matches(e)]

    # ---- catching up: a task from the cursor to the head

    def _resume(self) -> None:
        if self.ending is None:
            self.ctx.hub.catch_ups += 1
            self._pump = asyncio.create_task(self._catch_up())
            self._pump.add_done_callback(self._caught_up)

    def _caught_up(self, task: asyncio.Task[None]) -> None:
        if self._pump is task:
            self._pump = None
        if not task.cancelled() and task.exception() is not None:
            log.error("stream.failed", job_id=self.spec.job_id, exc_info=task.exception())
            self.stop("error")

    async def _catch_up(self) -> None:
        """Send what is newer than the cursor, then subscribe; the first run starts the
        stream (cursor check, snapshot, retry hint).

        What it holds at once is bounded: each step reads at most `stream_buffer_bytes`
        of events (or one, if larger) and sends them as one chunk, and the server's send
        waits for the connection to drain before it takes the next; so a client that
        does not read holds a chunk and the connection's buffer, not a replay."""
        ctx, spec, send = self.ctx, self.spec, self._send
        hub, store, flt = ctx.hub, ctx.store, spec.flt
        batch = ctx.settings.replay_batch
        budget = ctx.settings.stream_buffer_bytes
        cursor = self.cursor
        prefix = b""
        if not self._started:
            self._started = True
            # the retry hint rides on the first frame's block; a stream that starts idle
            # sends it at once with no blank line after it, so it ends no block alone
            # (clients such as httpx-sse would hand the user an event without data)
            prefix = f"retry: {ctx.settings.retry_ms}\n".encode()
            start = spec.cursor
            if start is not None:
                oldest, head = await store.bounds()
                if start > head or (oldest is not None and start < oldest - 1):
                    start = None  # older than retention kept, or unknown here: start over
            if start is not None:
                cursor = start
            else:
                fresh = await self._start_over(prefix, reset=spec.cursor is not None)
                if fresh is None:
                    return
                prefix = b""
                cursor = fresh
        while not hub.closed:
            events = hub.after(cursor, batch)
            if events is None:  # behind the tail: read on from the store
                page = await store.events_after(cursor, hub.head, flt, batch, budget)
                if page.reset:  # pruned under this reader: start over, never skip
                    log.info("stream.reset", job_id=spec.job_id, cursor=cursor)
                    fresh = await self._start_over(prefix, reset=True, fresh=True)
                    if fresh is None:
                        return
                    prefix = b""
                    cursor = max(cursor, fresh)
                    continue
                matched: Sequence[Event] = page.events
                cursor = page.upto
                del page
            elif events:
                events = _within(events, budget)
                cursor = events[-1].id
                matched = self._matching(events)
            else:
                if prefix or self._ping:
                    await send(_body(prefix) if prefix else _KEEP_ALIVE)
                    prefix, self._ping = b"", False
                    self.last_write = time.monotonic()
                    continue
                # no await since reading the head: none missed. The cursor may be ahead
                # of the hub (a snapshot read sees a commit before it is published):
                # pushes up to it are dropped (see push)
                self.cursor = cursor
                hub.subscribe(self, self.key)
                return
            del events
            if matched:
                self.sent += len(matched)
                chunk = _body(prefix + b"".join([e.frame for e in matched]))
                finished = spec.job_id is not None and _finished(matched, spec.job_id)
                del matched  # only the chunk is held while the client drains
                await send(chunk)
                del chunk
                prefix = b""
                self.last_write = time.monotonic()
                if finished:
                    self.stop("finished")
                    return
        self.stop("shutdown")

    async def _start_over(self, prefix: bytes, reset: bool, fresh: bool = False
                          ) -> int | None:
        """Send a snapshot (`fresh`: read now, not shared with streams that opened
        earlier); its head, or None when the stream's job ended in it (stopped)."""
        snap = await self.ctx.snapshots.take(self.spec.flt, reset=reset, fresh=fresh)
        await self._send(_body(prefix + snap.frame))
        self.last_write = time.monotonic()
        if self.spec.job_id is not None and self.spec.job_id in snap.finished:
            self.stop("finished")
            return None
        return snap.head  # and not the snapshot: up to a few hundred KiB, no idle stream's


def _within(events: list[Event], budget: int) -> list[Event]:
    """The first of `events` up to `budget` bytes of frames (at least one)."""
    size = 0
    for i, e in enumerate(events):
        size += len(e.frame)
        if size >= budget:
            return events[:i + 1]
    return events


async def _not_started(message: Message) -> None:
    raise RuntimeError("the stream has not started")


def _chunk(body: bytes) -> bytes:
    """`body` framed as one chunk of a chunked response, as uvicorn writes it."""
    return b"%x\r\n%b\r\n" % (len(body), body)


def _body(chunk: bytes) -> Message:
    return {"type": "http.response.body", "body": chunk, "more_body": True}


# a comment line alone, with no blank line: a blank line after an event with an id
# comes out of httpx-sse and sseclient as an event without data. The next event's
# block simply starts with the comment, which every client skips.
_KEEP_ALIVE = _body(b": keep-alive\n")
_KEEP_ALIVE_CHUNK = _chunk(b": keep-alive\n")


def _finished(events: Sequence[Event], job_id: str) -> bool:
    return any(e.type == "finished" and e.job_id == job_id for e in events)


async def visible_job(ctx: Context, job_id: str, owner: str | None) -> Job:
    """The job, if it exists and the caller may see it; else 404 (never 403: no leak)."""
    job = await ctx.store.get_job(job_id)
    if job is None or (owner is not None and job.owner != owner):
        raise JobNotFound(f"no job {job_id!r}")
    return job

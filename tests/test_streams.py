"""SSE semantics over a real server: snapshot, resume, reset, 204, keep-alive, headers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from progress_sse.settings import Settings

from .helpers import (
    SEPARATORS,
    Service,
    create_job,
    metric,
    relay_send,
    start_service,
    wait_for,
)

STORES = ("sqlite", "postgres")  # every test asking for `db` runs on both (conftest.py)
SSE = {"Accept": "text/event-stream"}


async def take(events: AsyncIterator[ServerSentEvent], n: int,
               timeout: float = 5.0) -> list[ServerSentEvent]:
    out: list[ServerSentEvent] = []
    async with asyncio.timeout(timeout):
        async for ev in events:
            assert ev.data and ev.id, f"an event without data or id: {ev}"
            out.append(ev)
            if len(out) == n:
                break
    return out


async def post(client: httpx.AsyncClient, job_id: str, what: str = "progress",
               **body: Any) -> dict[str, Any]:
    r = await client.post(f"/api/jobs/{job_id}/{what}", json=body)
    assert r.status_code < 300, r.text
    result: dict[str, Any] = r.json()
    return result


async def test_fresh_connection_gets_snapshot_then_live(client: httpx.AsyncClient) -> None:
    """A fresh stream starts with a snapshot whose id is the head, then live events."""
    job = await create_job(client, kind="video", title="a")
    await post(client, job["id"], progress=10)
    async with aconnect_sse(client, "GET", f"/api/jobs/{job['id']}/events",
                            headers=SSE) as src:
        assert src.response.headers["content-type"].startswith("text/event-stream")
        assert src.response.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in src.response.headers
        events = src.aiter_sse()
        [snap] = await take(events, 1)
        assert snap.event == "snapshot"
        assert snap.id == "2"
        assert snap.retry == 1000
        data = json.loads(snap.data)
        assert [j["progress"] for j in data["jobs"]] == [10.0]
        assert "reset" not in data
        await post(client, job["id"], progress=20, message="half")
        [live] = await take(events, 1)
        assert (live.event, live.id) == ("progress", "3")
        body = json.loads(live.data)
        assert body["job"]["progress"] == 20.0
        assert body["message"] == "half"


async def test_resume_with_header_and_query(client: httpx.AsyncClient) -> None:
    """Last-Event-ID (header, or ?last_event_id=) continues with exactly the next event."""
    job = await create_job(client)
    for p in (10, 20, 30):
        await post(client, job["id"], progress=p)
    for kwargs in ({"headers": {**SSE, "Last-Event-ID": "2"}},
                   {"headers": SSE, "params": {"last_event_id": "2"}}):
        async with aconnect_sse(client, "GET", f"/api/jobs/{job['id']}/events",
                                **kwargs) as src:
            got = await take(src.aiter_sse(), 2)
            assert [e.id for e in got] == ["3", "4"]
            assert [json.loads(e.data)["job"]["progress"] for e in got] == [20.0, 30.0]


async def test_all_events_filters_by_job_and_kind(client: httpx.AsyncClient) -> None:
    """/api/events is a stream whatever Accept says, filtered by job= and kind=."""
    # separate queues: no queue-position events between the posts
    a = await create_job(client, kind="pdf", queue="qa")
    b = await create_job(client, kind="video", queue="qb")
    c = await create_job(client, kind="video", queue="qc")
    async with aconnect_sse(client, "GET", "/api/events",
                            params=[("job", a["id"]), ("job", b["id"])],
                            headers={"Accept": "application/json", "Last-Event-ID": "3"}
                            ) as by_job, \
            aconnect_sse(client, "GET", "/api/events", params={"kind": "video"},
                         headers={"Last-Event-ID": "3"}) as by_kind:
        for job in (a, b, c, a):
            await post(client, job["id"], progress=50 if job is a else 10)
        await post(client, a["id"], progress=60)
        got_job = await take(by_job.aiter_sse(), 4)
        got_kind = await take(by_kind.aiter_sse(), 2)
    assert [json.loads(e.data)["job_id"] for e in got_job] == [a["id"], b["id"], a["id"],
                                                              a["id"]]
    assert [json.loads(e.data)["job_id"] for e in got_kind] == [b["id"], c["id"]]


async def test_per_job_stream_closes_after_finished_and_resume_is_204(
        client: httpx.AsyncClient) -> None:
    """The stream ends after the finished event; reconnecting at or past it answers 204."""
    job = await create_job(client)
    await post(client, job["id"], progress=50)
    async with aconnect_sse(client, "GET", f"/api/jobs/{job['id']}/events",
                            headers={**SSE, "Last-Event-ID": "2"}) as src:
        await post(client, job["id"], "finish", status="succeeded")
        got = [e async for e in src.aiter_sse() if e.data]  # ends by itself
    assert [e.event for e in got] == ["finished"]
    final = int(got[-1].id)
    for last in (final, final + 5):
        r = await client.get(f"/api/jobs/{job['id']}/events",
                             headers={**SSE, "Last-Event-ID": str(last)})
        assert r.status_code == 204
    r = await client.get(f"/api/jobs/{job['id']}/events",
                         headers={**SSE, "Last-Event-ID": str(final - 1)})
    assert r.status_code == 200
    assert "event: finished" in r.text


async def test_fresh_stream_of_finished_job_ends_after_snapshot(
        client: httpx.AsyncClient) -> None:
    """A finished job's fresh stream sends the snapshot and ends."""
    job = await create_job(client)
    await post(client, job["id"], "finish", status="failed", error="disk full")
    r = await client.get(f"/api/jobs/{job['id']}/events", headers=SSE)
    assert r.status_code == 200
    assert r.text.count("event: snapshot") == 1
    assert '"status":"failed"' in r.text


@pytest.mark.parametrize("bad", ["abc", "-1", "1.5", "9" * 30, "0x10"])
async def test_bad_last_event_id_is_400(client: httpx.AsyncClient, bad: str) -> None:
    """An unparsable Last-Event-ID is refused, never silently a fresh start."""
    job = await create_job(client)
    for path in (f"/api/jobs/{job['id']}/events", "/api/events"):
        r = await client.get(path, headers={**SSE, "Last-Event-ID": bad})
        assert r.status_code == 400
        assert r.json()["error"]["field"] == "Last-Event-ID"
        r = await client.get(path, headers=SSE, params={"last_event_id": bad})
        assert r.status_code == 400
        assert r.json()["error"]["field"] == "last_event_id"


async def test_resume_older_than_retention_gets_reset_snapshot(settings: Settings) -> None:
    """Resuming from before the oldest kept event answers a snapshot with reset: true."""
    svc = await start_service(settings.model_copy(update={"retention_events": 20}))
    try:
        async with httpx.AsyncClient(base_url=svc.url) as client:
            job = await create_job(client)
            for i in range(40):
                await post(client, job["id"], progress=i)
            async with aconnect_sse(client, "GET", "/api/events",
                                    headers={"Last-Event-ID": "1"}) as src:
                events = src.aiter_sse()
                [snap] = await take(events, 1)
                assert snap.event == "snapshot"
                data = json.loads(snap.data)
                assert data["reset"] is True
                assert snap.id == "41"
                assert data["jobs"][0]["progress"] == 39.0
                await post(client, job["id"], progress=99)
                [nxt] = await take(events, 1)
                assert nxt.id == "42"
            # a cursor still inside what was kept resumes normally
            async with aconnect_sse(client, "GET", "/api/events",
                                    headers={"Last-Event-ID": "39"}) as src:
                got = await take(src.aiter_sse(), 3)
                assert [e.id for e in got] == ["40", "41", "42"]
    finally:
        await svc.stop()


async def test_keepalive_comment_on_idle_stream(settings: Settings) -> None:
    """An idle stream receives a keep-alive comment at the configured interval."""
    svc = await start_service(settings.model_copy(update={"keepalive_s": 0.2}))
    try:
        async with httpx.AsyncClient(base_url=svc.url) as client, \
                client.stream("GET", "/api/events") as r:
            seen = b""
            async with asyncio.timeout(5):
                async for chunk in r.aiter_bytes():
                    seen += chunk
                    if b": keep-alive" in seen:
                        break
            assert b"event: snapshot" in seen
            assert seen.index(b"event: snapshot") < seen.index(b": keep-alive")
    finally:
        await svc.stop()


async def test_stream_ended_on_shutdown_with_last_id(settings: Settings) -> None:
    """Stopping the server ends open streams promptly; the client can resume from its last id."""
    svc = await start_service(settings)
    async with httpx.AsyncClient(base_url=svc.url) as client:
        job = await create_job(client)
        await post(client, job["id"], progress=5)
        async with aconnect_sse(client, "GET", "/api/events",
                                headers={"Last-Event-ID": "0"}) as src:
            events = src.aiter_sse()
            got = await take(events, 2)
            stopping = asyncio.create_task(svc.stop(timeout=5))
            async with asyncio.timeout(5):
                rest = [e async for e in events]
    await stopping
    assert [e.id for e in got] == ["1", "2"]
    assert rest == []
    svc2 = await start_service(settings)
    try:
        async with httpx.AsyncClient(base_url=svc2.url) as client:
            await post(client, job["id"], progress=6)
            async with aconnect_sse(client, "GET", "/api/events",
                                    headers={"Last-Event-ID": got[-1].id}) as src:
                [nxt] = await take(src.aiter_sse(), 1)
                assert nxt.id == "3"
                assert json.loads(nxt.data)["job"]["progress"] == 6.0
    finally:
        await svc2.stop()


async def test_stream_counts_and_logs(client: httpx.AsyncClient, service: Service) -> None:
    """Open streams are counted (healthz, metrics) and released when clients leave."""
    async with client.stream("GET", "/api/events") as r:
        assert r.status_code == 200
        await wait_for(lambda: service.ctx.hub.streams == 1, what="stream registered")
        assert (await client.get("/healthz")).json()["streams"] == 1
    await wait_for(lambda: service.ctx.hub.streams == 0, what="stream released")


async def _three_readers_of_twenty_posts(svc: Service,
                                         while_live: Callable[[], None] = lambda: None) -> None:
    """Three caught-up readers each get twenty events, in order, as they are posted."""
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c, \
            contextlib.AsyncExitStack() as stack:
        job = await create_job(c)
        sources = [(await stack.enter_async_context(
            aconnect_sse(c, "GET", "/api/events", headers=SSE))).aiter_sse() for _ in range(3)]
        for events in sources:
            [snap] = await take(events, 1)
            assert snap.event == "snapshot"
        await wait_for(lambda: svc.ctx.hub.live == 3, what="3 live streams")
        assert metric((await c.get("/metrics")).text, "progress_sse_live_streams") == 3
        ids = [str((await post(c, job["id"], progress=i))["event_id"]) for i in range(1, 21)]
        for events in sources:
            assert [e.id for e in await take(events, 20)] == ids
        while_live()


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_live_streams_are_pushed_each_event(settings: Settings, http: str) -> None:
    """Under uvicorn's httptools protocol a caught-up stream is written each event by
    the hub's publish, straight to the connection (uvicorn_direct): it catches up (in a
    task) once, when it opens, and never again while it keeps up. Under h11 there is
    no direct path: each push is sent by a catch-up task through uvicorn's public send."""
    import gc

    from progress_sse.streams import EventStream

    def chunks_skip_send() -> None:
        gc.collect()
        streams = [o for o in gc.get_objects() if isinstance(o, EventStream)]
        assert len(streams) == 3
        assert all((s._writer is not None) == (http == "httptools") for s in streams)

    svc = await start_service(settings, http=http)
    try:
        await _three_readers_of_twenty_posts(svc, chunks_skip_send)
        assert svc.ctx.hub.catch_ups == 3 if http == "httptools" else \
            svc.ctx.hub.catch_ups >= 3 + 20
    finally:
        await svc.stop()


async def test_streams_behind_a_send_that_must_be_awaited(settings: Settings) -> None:
    """Under another server's send, each pushed event is sent by a catch-up task instead."""
    svc = await start_service(settings, wrap=relay_send)
    try:
        await _three_readers_of_twenty_posts(svc)
        assert svc.ctx.hub.catch_ups > 3 + 20
    finally:
        await svc.stop()


async def test_idle_streams_hold_no_snapshot_or_replayed_events(settings: Settings) -> None:
    """Streams that started from a snapshot or replayed from the store keep none of it
    once they are idle: live objects do not grow with the number of such streams."""
    import gc

    from progress_sse.jobs import Job
    from progress_sse.store import Event

    svc = await start_service(settings.model_copy(update={"tail_size": 16, "tail_bytes": 1 << 16}))
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c:
            jobs = [await create_job(c, title=f"t{i}") for i in range(40)]
            for i in range(200):
                last = (await post(c, jobs[i % 40]["id"], progress=i / 2))["event_id"]

            def alive() -> tuple[int, int]:
                gc.collect()
                objects = gc.get_objects()
                return (sum(isinstance(o, Job) for o in objects),
                        sum(isinstance(o, Event) for o in objects))

            before = alive()
            async with contextlib.AsyncExitStack() as stack:
                readers = []
                for i in range(20):  # half start with a snapshot, half replay from id 0
                    headers = SSE if i % 2 else {**SSE, "Last-Event-ID": "0"}
                    src = await stack.enter_async_context(
                        aconnect_sse(c, "GET", "/api/events", headers=headers))
                    readers.append(src.aiter_sse())
                for events in readers:
                    async with asyncio.timeout(10):
                        async for ev in events:
                            if ev.id and int(ev.id) >= last:
                                break
                await wait_for(lambda: svc.ctx.hub.streams == 20, what="20 open streams")
                jobs_now, events_now = alive()
            # 10 snapshots of 40 jobs and 10 replays of 240 events, were any of them kept
            assert jobs_now - before[0] < 40, (before, jobs_now)
            assert events_now - before[1] < 100, (before, events_now)
    finally:
        await svc.stop()


async def test_line_separators_are_escaped_wherever_json_is_written(
        client: httpx.AsyncClient) -> None:
    """U+2028, U+2029 and U+0085 in a message reach a stream's reader intact, and no
    document the service writes holds them raw (readers that split lines as Python's
    str.splitlines does would cut the event there)."""
    job = await create_job(client)
    raw = [s.encode() for s in ("\u2028", "\u2029", "\x85")]
    async with aconnect_sse(client, "GET", f"/api/jobs/{job['id']}/events",
                            headers={**SSE, "Last-Event-ID": "1"}) as src:
        events = src.aiter_sse()
        await post(client, job["id"], "log", message=SEPARATORS)
        [ev] = await take(events, 1)
    assert json.loads(ev.data)["message"] == SEPARATORS
    history = (await client.get(f"/api/jobs/{job['id']}/events")).content
    assert json.loads(history)["events"][-1]["message"] == SEPARATORS
    for path in (f"/api/jobs/{job['id']}/events", f"/api/jobs/{job['id']}", "/api/jobs"):
        body = (await client.get(path)).content
        assert not any(r in body for r in raw), path
    async with client.stream("GET", "/api/events", headers={"Last-Event-ID": "1"}) as r:
        async for chunk in r.aiter_bytes():
            assert not any(x in chunk for x in raw)
            if b'"type":"log"' in chunk:
                break

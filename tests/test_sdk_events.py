"""The SDK's resumable reader, `events()`, against a real server, sync and async.

Each test runs both readers: the sync one in a thread (the in-process server runs on
the test's event loop), the async one in a task. Both hand what they yield to the
test through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from progress_sse.client import (
    APIError,
    AsyncProgressClient,
    Event,
    ProgressClient,
    ServiceUnavailable,
)
from progress_sse.settings import Settings

from .helpers import (
    SEPARATORS,
    ProcessService,
    Service,
    create_job,
    free_port,
    raw_separators,
    reframed,
    start_service,
    stored_log,
    wait_for,
)

MODES = ["sync", "async"]


@dataclass
class Reader:
    """`events()` running in the background; what it yielded, and how it ended."""

    events: list[Event] = field(default_factory=list)
    error: BaseException | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Future[None] | None = None

    async def until(self, count: int, within: float = 10) -> list[Event]:
        async def enough() -> bool:
            if self.error is not None:
                raise self.error
            return len(self.events) >= count

        await wait_for(enough, timeout=within, what=f"{count} events (have {self.events})")
        return self.events[:count]

    async def end(self, within: float = 10) -> list[Event]:
        await asyncio.wait_for(self.done.wait(), within)
        if self.error is not None:
            raise self.error
        return self.events


def start_reader(mode: str, url: str, *, limit: int | None = None,
                 transport: Any = None, **kwargs: Any) -> Reader:
    """Read `events(**kwargs)` with the sync or async client until it ends (or `limit`)."""
    loop = asyncio.get_running_loop()
    reader = Reader()

    def got(event: Event) -> None:
        reader.events.append(event)

    def ended(error: BaseException | None) -> None:
        reader.error = error
        reader.done.set()

    if mode == "sync":
        def run() -> None:
            error: BaseException | None = None
            try:
                with ProgressClient(url, transport=transport) as pc:
                    for n, event in enumerate(pc.events(**kwargs), 1):
                        loop.call_soon_threadsafe(got, event)
                        if n == limit:
                            break
            except Exception as exc:
                error = exc
            loop.call_soon_threadsafe(ended, error)

        reader.task = asyncio.ensure_future(asyncio.to_thread(run))
    else:
        async def run_async() -> None:
            error: BaseException | None = None
            try:
                async with AsyncProgressClient(url, transport=transport) as pc, \
                        contextlib.aclosing(pc.events(**kwargs)) as events:
                    n = 0
                    async for event in events:
                        got(event)
                        n += 1
                        if n == limit:
                            break
            except Exception as exc:
                error = exc
            ended(error)

        reader.task = asyncio.create_task(run_async())
    return reader


def summary(events: list[Any]) -> list[tuple[int, str]]:
    """(id, type) of our events or of stored event documents."""
    return [(e.id, e.type) if isinstance(e, Event) else (e["id"], e["type"]) for e in events]


async def post(client: httpx.AsyncClient, job_id: str, what: str, **body: Any) -> int:
    r = await client.post(f"/api/jobs/{job_id}/{what}", json=body)
    assert r.status_code == 200, r.text
    event_id: int = r.json()["event_id"]
    return event_id


# ---------------------------------------------------------------- reading a job


@pytest.mark.parametrize("mode", MODES)
async def test_reads_a_job_from_its_snapshot_to_its_end(
        mode: str, service: Service, client: httpx.AsyncClient) -> None:
    """A fresh read yields the snapshot (its id the head), then each event once, in order,
    and ends by itself after the job's `finished` event."""
    job = await create_job(client, title="intro.mp4")
    reader = start_reader(mode, service.url, job=job["id"])
    [snapshot] = await reader.until(1)
    assert snapshot.type == "snapshot" and not snapshot.reset
    assert [j["id"] for j in snapshot.jobs] == [job["id"]]
    assert snapshot.id == (await client.get("/api/jobs")).json()["head"]
    await post(client, job["id"], "progress", progress=40, message="fetching")
    await post(client, job["id"], "log", message="halfway")
    await post(client, job["id"], "finish", status="succeeded", result={"ok": True})
    events = await reader.end()
    stored = await stored_log(client, job["id"], after=snapshot.id)
    assert summary(events[1:]) == summary(stored)
    assert [e.data for e in events[1:]] == stored
    assert [e.type for e in events[1:]] == ["progress", "log", "finished"]
    assert events[-1].job is not None and events[-1].job["status"] == "succeeded"
    assert all(e.job_id == job["id"] for e in events[1:])


@pytest.mark.parametrize("mode", MODES)
async def test_resumes_after_last_event_id(mode: str, service: Service,
                                           client: httpx.AsyncClient) -> None:
    """With `last_event_id`, exactly the events after it, then the end of the job."""
    job = await create_job(client)
    ids = [await post(client, job["id"], "progress", progress=p) for p in (10, 20, 30)]
    await post(client, job["id"], "finish", status="failed", error="boom")
    reader = start_reader(mode, service.url, job=job["id"], last_event_id=ids[0])
    events = await reader.end()
    assert summary(events) == summary(await stored_log(client, job["id"], after=ids[0]))
    assert [e.type for e in events] == ["progress", "progress", "finished"]


class Counting(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return super().handle_request(request)


class AsyncCounting(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await super().handle_async_request(request)


@pytest.mark.parametrize("mode", MODES)
async def test_a_job_seen_to_its_end_answers_204_and_the_reader_stops(
        mode: str, service: Service, client: httpx.AsyncClient) -> None:
    """Resuming at or past a job's `finished` event is a 204: nothing is yielded, the
    iterator ends, and it asked once (no reconnect loop)."""
    job = await create_job(client)
    finished = await post(client, job["id"], "finish", status="succeeded")
    for last in (finished, finished + 5):
        transport = Counting() if mode == "sync" else AsyncCounting()
        reader = start_reader(mode, service.url, job=job["id"], last_event_id=last,
                              transport=transport)
        assert await reader.end() == []
        assert [(r.method, r.headers["last-event-id"]) for r in transport.requests] == \
            [("GET", str(last))]


@pytest.mark.parametrize("mode", MODES)
async def test_a_finished_job_read_fresh_yields_its_snapshot_and_ends(
        mode: str, service: Service, client: httpx.AsyncClient) -> None:
    job = await create_job(client)
    await post(client, job["id"], "finish", status="cancelled")
    events = await start_reader(mode, service.url, job=job["id"]).end()
    assert [e.type for e in events] == ["snapshot"]
    assert events[0].jobs[0]["status"] == "cancelled"


@pytest.mark.parametrize("mode", MODES)
async def test_all_jobs_with_filters(mode: str, service: Service,
                                     client: httpx.AsyncClient) -> None:
    """Without `job`: /api/events, filtered by `jobs` and `kinds`, until the caller stops."""
    a = await create_job(client, kind="video")
    b = await create_job(client, kind="pdf")
    c = await create_job(client, kind="video")
    by_job = start_reader(mode, service.url, jobs=[a["id"], b["id"]], limit=3)
    by_kind = start_reader(mode, service.url, kinds=["video"], limit=3)
    await by_job.until(1)
    await by_kind.until(1)
    await post(client, c["id"], "progress", progress=5)
    await post(client, b["id"], "progress", progress=10)
    await post(client, a["id"], "log", message="a")
    events = await by_job.end()
    assert [e.type for e in events] == ["snapshot", "progress", "log"]
    assert {j["id"] for j in events[0].jobs} == {a["id"], b["id"]}
    assert [e.job_id for e in events[1:]] == [b["id"], a["id"]]
    events = await by_kind.end()
    assert [e.job_id for e in events[1:]] == [c["id"], a["id"]]


@pytest.mark.parametrize("mode", MODES)
async def test_a_refusal_raises_api_error_at_once(mode: str, service: Service) -> None:
    reader = start_reader(mode, service.url, job="no-such-job")
    with pytest.raises(APIError) as err:
        await reader.end()
    assert err.value.status_code == 404 and "no-such-job" in err.value.message


@pytest.mark.parametrize("mode", MODES)
async def test_gives_up_after_the_service_stays_unreachable(mode: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    reader = start_reader(mode, url, job="j", give_up_after=0.5)
    with pytest.raises(ServiceUnavailable):
        await reader.end()
    assert 0.5 <= time.monotonic() - started < 5


# ---------------------------------------------------------------- what is never yielded


@pytest.fixture
def settings(db_path: str) -> Settings:
    """Keep-alives five times a second, so a test sees many of them."""
    return Settings(db=db_path, keepalive_s=0.2)


def blank_line_after_hints(body: bytes) -> bytes:
    """A keep-alive and a lone retry hint each ended by a blank line (as the service did
    before): httpx-sse makes an event without data of each once an id was seen."""
    body = body.replace(b": keep-alive\n", b": keep-alive\n\n")
    return body + b"\n" if body.startswith(b"retry: ") and body.count(b"\n") == 1 else body


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("framing", ["ours", "blank lines"])
async def test_keep_alives_and_retry_hints_yield_nothing(
        mode: str, framing: str, settings: Settings) -> None:
    """Idle streams full of keep-alives (and a resumed stream's lone `retry:` hint) yield
    nothing, whether or not a blank line follows them; the next event comes through."""
    wrap = reframed(blank_line_after_hints) if framing == "blank lines" else None
    service = await start_service(settings, wrap=wrap)
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            job = await create_job(client)
            head = (await client.get("/api/jobs")).json()["head"]
            per_job = start_reader(mode, service.url, job=job["id"])
            resumed = start_reader(mode, service.url, last_event_id=head, limit=1)
            await per_job.until(1)
            async with client.stream("GET", "/api/events",
                                     headers={"Last-Event-ID": str(head)}) as raw:
                seen = b""
                async with asyncio.timeout(5):
                    async for chunk in raw.aiter_bytes():
                        seen += chunk
                        if seen.count(b": keep-alive") >= 5:
                            break
            assert seen.startswith(b"retry: ")
            await asyncio.sleep(0.3)
            assert len(per_job.events) == 1 and resumed.events == []
            finished = await post(client, job["id"], "finish", status="succeeded")
            events = await per_job.end()
            assert [(e.type, e.id) for e in events] == [("snapshot", head),
                                                          ("finished", finished)]
            assert summary(await resumed.end()) == [(finished, "finished")]
    finally:
        await service.stop()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wire", ["escaped", "raw"])
async def test_line_separators_in_a_message_arrive_intact(
        mode: str, wire: str, settings: Settings) -> None:
    """U+2028, U+2029 and U+0085 split no event, escaped on the wire (as the service
    sends them) or raw (as JSON allows): lines end at CR, LF and CRLF only."""
    wrap = reframed(raw_separators) if wire == "raw" else None
    service = await start_service(settings, wrap=wrap)
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            job = await create_job(client)
            reader = start_reader(mode, service.url, job=job["id"])
            await reader.until(1)
            await post(client, job["id"], "log", message=SEPARATORS)
            await post(client, job["id"], "progress", progress=50, message=SEPARATORS)
            await post(client, job["id"], "finish", status="failed", error=SEPARATORS)
            events = await reader.end()
    finally:
        await service.stop()
    assert [e.type for e in events] == ["snapshot", "log", "progress", "finished"]
    assert events[1].data["message"] == SEPARATORS
    assert events[2].job is not None and events[2].job["message"] == SEPARATORS
    assert events[3].job is not None and events[3].job["error"] == SEPARATORS
    if wire == "raw":
        assert "\u2028" in events[1].raw  # it did travel raw


# ---------------------------------------------------------------- across a restart


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_reconnects_across_a_kill_9_restart_with_exactly_the_missed_events(
        mode: str, tmp_path: Path) -> None:
    """The service is killed (-9) mid-stream and started again on the same port and
    database: the reader reconnects by itself with Last-Event-ID and yields exactly the
    events it missed, none twice, then ends with the job."""
    svc = ProcessService(db=str(tmp_path / "p.db"), port=free_port())
    await asyncio.to_thread(svc.start, "--retry-ms", "200")
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            job = await create_job(client)
            reader = start_reader(mode, svc.url, job=job["id"], give_up_after=30)
            [snapshot] = await reader.until(1)
            await post(client, job["id"], "progress", progress=10)
            await reader.until(2)
            svc.signal(signal.SIGKILL)
            await asyncio.to_thread(svc.wait)
            await asyncio.sleep(0.5)  # the reader fails to connect meanwhile
            await asyncio.to_thread(svc.start, "--retry-ms", "200")
            for p in (20, 30):
                await post(client, job["id"], "progress", progress=p)
            await post(client, job["id"], "finish", status="succeeded")
            events = await reader.end(within=20)
            stored = await stored_log(client, job["id"], after=snapshot.id)
    finally:
        await asyncio.to_thread(svc.stop)
    assert summary(events[1:]) == summary(stored)
    assert [e.job["progress"] for e in events[1:] if e.job] == [10, 20, 30, 100]


def test_an_event_is_a_plain_value() -> None:
    a = Event(3, "log", {"id": 3, "job_id": "j", "job": {"id": "j"}}, raw="x")
    assert a == replace(a, raw="y") and a.job_id == "j" and a.job == {"id": "j"}
    assert a.jobs == [] and not a.reset

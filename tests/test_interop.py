"""Real SSE clients against a real server: httpx-sse, sseclient-py, requests-sse,
aiohttp-sse-client and curl, each through the same scenarios.

Every scenario is written once and run for each client through a small adapter
(`SSEClientAdapter`). What each client does by itself (reconnect, what it does on a
204, what it raises when the connection drops) is declared on its adapter and checked
by the scenarios, so the README's "Clients" table states only what is measured here.
Sync clients run in a thread (`asyncio.to_thread`) and stop once the reader has what
it waits for, or when the server ends their connection.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import re
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import httpx
import httpx_sse
import pytest
import requests
import requests_sse
from starlette.types import ASGIApp, Receive, Scope, Send

from progress_sse.settings import Settings

from .helpers import (
    ProcessService,
    Service,
    create_job,
    free_port,
    metric,
    start_service,
    wait_for,
)

SEPARATORS = "line\u2028sep\u2029para\x85nel end"


@dataclass(frozen=True)
class Ev:
    """One event as a client handed it to its user."""

    id: str | None
    event: str | None
    data: str


class Stopped(Exception):
    """Raised inside a client's callback to make it give up reconnecting."""


@dataclass
class Reader:
    """One client reading one stream in the background, until `until` holds."""

    client: SSEClientAdapter
    url: str
    last_id: str | None = None
    until: Callable[[list[Ev]], bool] | None = None
    events: list[Ev] = field(default_factory=list)
    error: BaseException | None = None
    status: int | None = None
    raw: bytes = b""
    stopping: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> Reader:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        try:
            await self.client.run(self)
        except Exception as e:  # what the client raised is part of what is measured
            self.error = e

    def add(self, ev: Ev) -> None:
        self.events.append(ev)

    def done(self) -> bool:
        return self.stopping.is_set() or (self.until is not None and self.until(self.events))

    @property
    def finished(self) -> bool:
        return self.task is not None and self.task.done()

    async def result(self, timeout: float = 10.0) -> list[Ev]:
        """Wait until the client stops by itself or `until` holds; its events so far."""
        def settled() -> bool:
            return self.finished or (self.until is not None and self.until(self.events))

        try:
            await wait_for(settled, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"{self.client.name} still reading after {timeout}s, "
                                 f"ids {[e.id for e in self.events]}") from None
        return self.events

    async def close(self) -> None:
        self.stopping.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                async with asyncio.timeout(20):
                    await asyncio.gather(self.task, return_exceptions=True)
            except TimeoutError:
                pass


def until_id(target: int) -> Callable[[list[Ev]], bool]:
    return lambda events: any(e.id == str(target) for e in events)


class SSEClientAdapter:
    """How one client library connects and hands out events; what it does by itself."""

    name: ClassVar[str]
    reconnects_on_end: ClassVar[bool]  # on its own, after a stream ends cleanly
    reconnects_on_drop: ClassVar[bool]  # on its own, after the connection drops (kill -9)
    on_drop: ClassVar[type[BaseException] | None]  # raised at a kill -9, if it does not reconnect
    on_204: ClassVar[type[BaseException] | None]  # raised when a resume answers 204

    async def run(self, r: Reader) -> None:
        await asyncio.to_thread(self.run_sync, r)

    def run_sync(self, r: Reader) -> None:
        raise NotImplementedError

    def headers(self, r: Reader) -> dict[str, str]:
        h = {"Accept": "text/event-stream"}
        if r.last_id is not None:
            h["Last-Event-ID"] = r.last_id
        return h


class HttpxSSE(SSEClientAdapter):
    name = "httpx-sse"
    reconnects_on_end = False
    reconnects_on_drop = False
    on_drop = httpx.RemoteProtocolError
    on_204 = httpx_sse.SSEError  # no text/event-stream content type on a 204

    async def run(self, r: Reader) -> None:
        from httpx_sse import aconnect_sse

        async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=15)) as client, \
                aconnect_sse(client, "GET", r.url, headers=self.headers(r)) as src:
            r.status = src.response.status_code
            async for ev in src.aiter_sse():
                r.add(Ev(ev.id, ev.event, ev.data))
                if r.done():
                    return


class SseclientPy(SSEClientAdapter):
    name = "sseclient-py"
    reconnects_on_end = False
    reconnects_on_drop = False
    on_drop = requests.exceptions.ChunkedEncodingError
    on_204 = None  # an empty body: no events, no error

    def run_sync(self, r: Reader) -> None:
        import sseclient

        with requests.get(r.url, stream=True, headers=self.headers(r), timeout=(5, 15)) as resp:
            r.status = resp.status_code
            for ev in sseclient.SSEClient(resp).events():
                r.add(Ev(ev.id, ev.event, ev.data))
                if r.done():
                    return


@contextlib.contextmanager
def closing_204() -> Iterator[None]:
    """Close the answer a requests-sse error holds: it keeps its connection open."""
    try:
        yield
    except requests_sse.InvalidStatusCodeError as e:
        if e.response is not None:
            e.response.close()
        raise


class RequestsSSE(SSEClientAdapter):
    name = "requests-sse"
    reconnects_on_end = True
    reconnects_on_drop = True
    on_drop = None
    on_204 = requests_sse.InvalidStatusCodeError

    def run_sync(self, r: Reader) -> None:
        from requests_sse import EventSource

        def on_error() -> None:
            if r.stopping.is_set():
                raise Stopped

        # a session of our own: a 204 at the first connect raises from __enter__, and
        # the session EventSource would make itself is then never closed
        with requests.Session() as session, \
                closing_204(), \
                EventSource(r.url, latest_event_id=r.last_id, timeout=15, session=session,
                            on_error=on_error) as source:
            for ev in source:
                r.add(Ev(ev.last_event_id, ev.type, ev.data or ""))
                if r.done():
                    return


class AiohttpSSEClient(SSEClientAdapter):
    name = "aiohttp-sse-client"
    reconnects_on_end = True
    reconnects_on_drop = False
    on_drop = aiohttp.ClientPayloadError
    on_204 = ConnectionAbortedError

    async def run(self, r: Reader) -> None:
        from aiohttp_sse_client.client import EventSource
        from multidict import CIMultiDict

        headers: CIMultiDict[str] = CIMultiDict()
        if r.last_id is not None:
            headers["Last-Event-ID"] = r.last_id
        timeout = aiohttp.ClientTimeout(sock_connect=5, sock_read=15)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                EventSource(r.url, session=session, headers=headers) as source:
            async for ev in source:
                r.add(Ev(ev.last_event_id, ev.type, ev.data))
                if r.done():
                    return


class CurlFailed(Exception):
    """curl exited with an error."""

    def __init__(self, code: int, stderr: str) -> None:
        super().__init__(f"curl exit {code}: {stderr.strip()}")
        self.code = code


class Curl(SSEClientAdapter):
    name = "curl"
    reconnects_on_end = False
    reconnects_on_drop = False
    on_drop = CurlFailed  # exit 18: transfer closed with outstanding read data
    on_204 = None  # exit 0, nothing printed

    async def run(self, r: Reader) -> None:
        args = ["curl", "-sS", "-N", "-w", "%{stderr}HTTP %{http_code}\n"]
        for k, v in self.headers(r).items():
            args += ["-H", f"{k}: {v}"]
        proc = await asyncio.create_subprocess_exec(
            *args, r.url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        parser = SpecParser()
        try:
            while chunk := await proc.stdout.read(65536):
                r.raw += chunk
                for ev in parser.feed(chunk):
                    r.add(ev)
                    if r.done():
                        return
            code = await proc.wait()
            stderr = (await proc.stderr.read()).decode()
            if m := re.search(r"HTTP (\d+)", stderr):
                r.status = int(m[1])
            if code != 0:
                raise CurlFailed(code, stderr)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


class SpecParser:
    """The event-stream interpretation of the HTML standard, exactly: lines end at CRLF,
    CR or LF only; a blank line dispatches an event if the data buffer is not empty."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.pending = ""
        self.data: list[str] = []
        self.event = ""
        self.last_id: str | None = None

    def feed(self, chunk: bytes) -> list[Ev]:
        text = self.pending + self.decoder.decode(chunk)
        lines = re.split(r"\r\n|\r|\n", text)
        self.pending = lines.pop()
        if self.pending == "" and text.endswith("\r"):  # a CR whose LF may come next
            lines.pop()
            self.pending = "\r"
        out: list[Ev] = []
        for line in lines:
            if line.startswith("\r"):
                line = line[1:]
            ev = self.line(line)
            if ev is not None:
                out.append(ev)
        return out

    def line(self, line: str) -> Ev | None:
        if line == "":
            data, event, self.data, self.event = self.data, self.event, [], ""
            if not data:
                return None
            return Ev(self.last_id, event or "message", "\n".join(data))
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self.data.append(value)
        elif name == "event":
            self.event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None


CLIENTS: list[SSEClientAdapter] = [HttpxSSE(), SseclientPy(), RequestsSSE(),
                                   AiohttpSSEClient(), Curl()]


@pytest.fixture(params=CLIENTS, ids=lambda c: c.name)
def sse_client(request: pytest.FixtureRequest) -> SSEClientAdapter:
    client: SSEClientAdapter = request.param
    return client


@dataclass
class Counted:
    """The requests the app answered, by path: (status, Last-Event-ID)."""

    seen: list[tuple[str, int, str | None]] = field(default_factory=list)

    def wrap(self, app: ASGIApp) -> ASGIApp:
        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            headers = dict(scope["headers"])
            last = headers.get(b"last-event-id")

            async def record(message: Any) -> None:
                if message["type"] == "http.response.start":
                    self.seen.append((scope["path"], message["status"],
                                      last.decode() if last is not None else None))
                await send(message)

            await app(scope, receive, record)

        return counted

    def to(self, path: str) -> list[tuple[int, str | None]]:
        return [(status, last) for p, status, last in self.seen if p == path]


@pytest.fixture
def counted() -> Counted:
    return Counted()


@pytest.fixture
async def svc(settings: Settings, counted: Counted) -> AsyncIterator[Service]:
    s = await start_service(settings.model_copy(update={"keepalive_s": 0.3, "retry_ms": 200}),
                            wrap=counted.wrap)
    yield s
    await s.stop()


@pytest.fixture
async def api(svc: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c:
        yield c


async def post(api: httpx.AsyncClient, job_id: str, what: str = "progress",
               **body: Any) -> int:
    r = await api.post(f"/api/jobs/{job_id}/{what}", json=body)
    assert r.status_code < 300, r.text
    event_id: int = r.json()["event_id"]
    return event_id


async def stored_after(api: httpx.AsyncClient, job_id: str, after: int) -> list[dict[str, Any]]:
    r = await api.get(f"/api/jobs/{job_id}/events", params={"after": after, "limit": 1000})
    assert r.status_code == 200, r.text
    events: list[dict[str, Any]] = r.json()["events"]
    return events


def check_events(events: list[Ev]) -> None:
    """Every event has an id and JSON data naming the same id and type."""
    for ev in events:
        assert ev.data and ev.id, f"an event without data or id: {ev}"
        body = json.loads(ev.data)
        if ev.event != "snapshot":
            assert (body["id"], body["type"]) == (int(ev.id), ev.event), ev


def matches_log(events: list[Ev], stored: list[dict[str, Any]]) -> None:
    """The events are the stored log, each once, in order, with the same documents."""
    assert [(e.id, e.event) for e in events] == [(str(s["id"]), s["type"]) for s in stored]
    assert [json.loads(e.data) for e in events] == stored


async def test_fresh_connect_gets_snapshot_then_every_event_once(
        sse_client: SSEClientAdapter, svc: Service, api: httpx.AsyncClient) -> None:
    """A fresh reader gets the snapshot at the head, then every live event once, in order."""
    job = await create_job(api, title="fresh")
    await post(api, job["id"], progress=10)
    head = await post(api, job["id"], "log", message="started")
    reader = Reader(sse_client, f"{svc.url}/api/events?job={job['id']}").start()
    try:
        await wait_for(lambda: bool(reader.events) or reader.finished, what="the snapshot")
        last = 0
        for i in range(1, 6):
            last = await post(api, job["id"], progress=10 + i * 10, message=f"step {i}")
        last = await post(api, job["id"], "log", level="warning", message="almost")
        reader.until = until_id(last)
        events = await reader.result()
    finally:
        await reader.close()
    assert reader.error is None, repr(reader.error)
    check_events(events)
    snap, *live = events
    assert (snap.event, snap.id) == ("snapshot", str(head))
    assert [j["id"] for j in json.loads(snap.data)["jobs"]] == [job["id"]]
    matches_log(live, await stored_after(api, job["id"], head))


async def test_resume_by_hand_with_last_event_id(
        sse_client: SSEClientAdapter, svc: Service, api: httpx.AsyncClient) -> None:
    """Last-Event-ID set by hand gives exactly the events after it, no snapshot; resumed at
    the head (nothing pending), the next event comes alone, with nothing before it."""
    job = await create_job(api, title="resume")
    ids = [await post(api, job["id"], progress=p) for p in (10, 20, 30, 40)]
    url = f"{svc.url}/api/jobs/{job['id']}/events"
    reader = Reader(sse_client, url, last_id=str(ids[0]), until=until_id(ids[-1])).start()
    try:
        events = await reader.result()
    finally:
        await reader.close()
    assert reader.error is None, repr(reader.error)
    check_events(events)
    matches_log(events, await stored_after(api, job["id"], ids[0]))

    idle = Reader(sse_client, url, last_id=str(ids[-1])).start()
    try:
        await wait_for(lambda: svc.ctx.hub.live == 1 or idle.finished, what="a live stream")
        nxt = await post(api, job["id"], progress=50, message="next")
        idle.until = until_id(nxt)
        events = await idle.result()
    finally:
        await idle.close()
    assert idle.error is None, repr(idle.error)
    check_events(events)
    matches_log(events, await stored_after(api, job["id"], ids[-1]))


async def test_keepalives_make_no_events(
        sse_client: SSEClientAdapter, svc: Service, api: httpx.AsyncClient) -> None:
    """Keep-alives every 0.3 s on a fresh and on a resumed idle stream: the client hands
    out no event for them, only the snapshot and the next real event."""
    job = await create_job(api, title="idle")
    head = await post(api, job["id"], progress=5)
    fresh = Reader(sse_client, f"{svc.url}/api/events?job={job['id']}").start()
    resumed = Reader(sse_client, f"{svc.url}/api/events?job={job['id']}",
                     last_id=str(head)).start()
    try:
        await wait_for(lambda: svc.ctx.hub.live == 2 or fresh.finished or resumed.finished,
                       what="two live streams")
        # a stream of our own, opened after them, sees the keep-alives they are sent
        async with api.stream("GET", "/api/events", params={"job": job["id"]}) as side:
            pings = 0
            async with asyncio.timeout(5):
                async for line in side.aiter_lines():
                    pings += line == ": keep-alive"
                    if pings == 4:
                        break
        nxt = await post(api, job["id"], progress=6)
        fresh.until = resumed.until = until_id(nxt)
        got_fresh = await fresh.result()
        got_resumed = await resumed.result()
    finally:
        await fresh.close()
        await resumed.close()
    assert fresh.error is None and resumed.error is None, (fresh.error, resumed.error)
    check_events(got_fresh + got_resumed)
    assert [(e.event, e.id) for e in got_fresh] == [("snapshot", str(head)),
                                                    ("progress", str(nxt))]
    assert [(e.event, e.id) for e in got_resumed] == [("progress", str(nxt))]


async def test_line_separators_in_a_message_arrive_intact(
        sse_client: SSEClientAdapter, svc: Service, api: httpx.AsyncClient) -> None:
    """U+2028, U+2029 and U+0085 in a message and a log line arrive in one intact event."""
    job = await create_job(api, title=f"t {SEPARATORS}")
    reader = Reader(sse_client, f"{svc.url}/api/events?job={job['id']}").start()
    try:
        await wait_for(lambda: bool(reader.events) or reader.finished, what="the snapshot")
        await post(api, job["id"], progress=1, message=SEPARATORS)
        last = await post(api, job["id"], "log", message=SEPARATORS)
        reader.until = until_id(last)
        events = await reader.result()
    finally:
        await reader.close()
    assert reader.error is None, repr(reader.error)
    check_events(events)
    snap, progress, log = events
    assert json.loads(snap.data)["jobs"][0]["title"] == f"t {SEPARATORS}"
    assert json.loads(progress.data)["message"] == SEPARATORS
    assert json.loads(log.data)["message"] == SEPARATORS
    if reader.raw:  # on the wire itself, none raw: line tools (str.splitlines) cut nothing
        text = reader.raw.decode()
        assert not set(text) & set("\u2028\u2029\x85"), "a raw line separator on the wire"


async def test_per_job_stream_ends_and_the_client_stops_on_204(
        sse_client: SSEClientAdapter, svc: Service, api: httpx.AsyncClient,
        counted: Counted) -> None:
    """A per-job stream ends after `finished`; a client that reconnects by itself gets the
    204 and stops (raising what its adapter says) without trying again; a client that
    does not reconnect ends quietly, and its own reconnect at that id answers 204."""
    job = await create_job(api, title="end")
    path = f"/api/jobs/{job['id']}/events"
    await post(api, job["id"], progress=50)
    reader = Reader(sse_client, svc.url + path).start()
    try:
        await wait_for(lambda: bool(reader.events) or reader.finished, what="the snapshot")
        final = await post(api, job["id"], "finish", status="succeeded", result={"n": 1})
        events = await reader.result()
    finally:
        await reader.close()
    check_events(events)
    assert [e.event for e in events] == ["snapshot", "finished"]
    assert events[-1].id == str(final)
    if sse_client.reconnects_on_end:
        assert isinstance(reader.error, sse_client.on_204), repr(reader.error)
        assert counted.to(path) == [(200, None), (204, str(final))]  # and no more
    else:
        assert reader.error is None, repr(reader.error)
        assert counted.to(path) == [(200, None)]
    # resuming by hand at the end: the 204, as each client reports it
    again = Reader(sse_client, svc.url + path, last_id=str(final)).start()
    try:
        assert await again.result() == []
    finally:
        await again.close()
    if sse_client.on_204 is None:
        assert again.error is None, repr(again.error)
        assert again.status == 204
        assert again.raw == b""  # curl: exit 0, and nothing printed
    else:
        assert isinstance(again.error, sse_client.on_204), repr(again.error)
    assert counted.to(path)[-1] == (204, str(final))


async def live_streams(url: str) -> int:
    async with httpx.AsyncClient(timeout=5) as c:
        metrics = (await c.get(url + "/metrics")).text
    return int(metric(metrics, "progress_sse_live_streams"))


@pytest.fixture
async def proc(tmp_path: Path) -> AsyncIterator[ProcessService]:
    svc = ProcessService(db=str(tmp_path / "p.db"), port=free_port(),
                         env={"PROGRESS_SSE_RETRY_MS": "200", "PROGRESS_SSE_LOG_LEVEL": "warning"})
    svc.start()
    yield svc
    svc.stop()


@pytest.mark.slow
async def test_server_restart_after_kill_9(sse_client: SSEClientAdapter,
                                           proc: ProcessService) -> None:
    """kill -9, then a restart on the same port and database: a client that reconnects by
    itself gets exactly the events it missed; one that does not ends (raising what its
    adapter says), and its own reconnect with its last id gets exactly those events."""
    async with httpx.AsyncClient(base_url=proc.url, timeout=10) as api:
        job = await create_job(api, title="restart")
        await post(api, job["id"], progress=10)
        reader = Reader(sse_client, f"{proc.url}/api/events?job={job['id']}").start()
        try:
            await wait_for(lambda: bool(reader.events) or reader.finished, what="the snapshot")
            await wait_for(lambda: live_streams(proc.url), what="a live stream")
            before = await post(api, job["id"], progress=20)
            await wait_for(lambda: reader.events[-1].id == str(before) or reader.finished,
                           what="the event before the kill")
            proc.signal(signal.SIGKILL)
            proc.wait()
            if not sse_client.reconnects_on_drop:
                await reader.result()
                assert isinstance(reader.error, sse_client.on_drop), repr(reader.error)
                if isinstance(reader.error, CurlFailed):  # transfer closed, data outstanding
                    assert reader.error.code == 18, reader.error
            proc.start()
            missed = [await post(api, job["id"], progress=p) for p in (30, 40, 50)]
            if sse_client.reconnects_on_drop:
                reader.until = until_id(missed[-1])
                await reader.result(timeout=30)
                assert reader.error is None, repr(reader.error)
                events = reader.events
            else:
                # it did not come back by itself: none of the missed events reached it
                assert reader.events[-1].id == str(before)
                again = Reader(sse_client, f"{proc.url}/api/events?job={job['id']}",
                               last_id=str(before), until=until_id(missed[-1])).start()
                try:
                    await again.result()
                finally:
                    await again.close()
                assert again.error is None, repr(again.error)
                events = reader.events + again.events
        finally:
            await reader.close()
        check_events(events)
        assert events[0].event == "snapshot"
        after_snapshot = int(events[0].id or 0)
        matches_log(events[1:], await stored_after(api, job["id"], after_snapshot))
        assert [e.id for e in events[-3:]] == [str(i) for i in missed]

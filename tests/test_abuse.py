"""One client cannot take unbounded memory or stall the others, over a real server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse

from progress_sse.auth import mint_token
from progress_sse.settings import Settings

from .helpers import ProcessService, create_job, free_port, start_service, wait_for
from .stored import db_events

STORES = ("sqlite", "postgres")  # every test asking for `db` runs on both (conftest.py)
SECRET = "a-test-secret-that-is-long-enough-0123456789"


def bearer(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, sub, 'read create', 600)}"}


@pytest.mark.sqlite_only("the hub's wake-ups, not the store's (unknown jobs are 404 on both "
                        "stores in test_api and test_auth); 25 s a run")
async def test_long_polls_keep_nothing_for_unknown_jobs_or_junk_credentials(
        settings: Settings) -> None:
    """Long polls with junk credentials, unknown or huge ids hold no wake-up; real ones
    that time out or are answered give theirs back."""
    svc = await start_service(settings.model_copy(update={"jwt_secret": SECRET, "auth": "jwt"}))
    hub = svc.ctx.hub
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10,
                                     headers=bearer("alice")) as alice:
            r = await alice.post("/api/jobs", json={"kind": "k"})
            job = r.json()["job"]
            worker = {"X-Worker-Token": r.json()["worker_token"]}

            async def junk(i: int) -> None:
                job_id = f"{i:06d}" + "x" * 8000
                for headers in ({"X-Worker-Token": "junk"},
                                {"Authorization": "Bearer junk.junk.junk"}, {}):
                    r = await alice.get(f"/api/jobs/{job_id}/control",
                                        params={"wait": 5}, headers=headers)
                    assert r.status_code in (401, 404), r.text
                r = await alice.get(f"/api/jobs/{job['id']}/control", params={"wait": 5},
                                    headers={"X-Worker-Token": "junk"})
                assert r.status_code == 401

            for start in range(0, 600, 50):
                await asyncio.gather(*(junk(i) for i in range(start, start + 50)))
            assert hub.watched == 0 and not hub._by_job

            # a real poll holds one wake-up while it waits and gives it back after
            polls = [asyncio.create_task(alice.get(
                f"/api/jobs/{job['id']}/control", params={"wait": 0.3}, headers=worker))
                for _ in range(20)]
            await wait_for(lambda: hub.watched == 1, what="the polls waiting")
            assert [(await p).status_code for p in polls] == [200] * 20  # timed out
            assert hub.watched == 0 and not hub._by_job
            r = await alice.post(f"/api/jobs/{job['id']}/progress", json={"progress": 5},
                                 headers=worker)
            assert r.status_code == 200  # running: a cancel waits for its worker
            poll = asyncio.create_task(alice.get(
                f"/api/jobs/{job['id']}/control", params={"wait": 10}, headers=worker))
            await wait_for(lambda: hub.watched == 1, what="the poll waiting")
            assert (await alice.post(f"/api/jobs/{job['id']}/cancel")).status_code == 202
            r = await poll
            assert r.json()["control"]["cancel_requested"] is True
            assert hub.watched == 0 and not hub._by_job
    finally:
        await svc.stop()


async def _open_unread(port: int, path: str, last_event_id: int) -> asyncio.StreamWriter:
    """An SSE request whose client never reads a byte of the answer."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
                 f"Last-Event-ID: {last_event_id}\r\n\r\n".encode())
    await writer.drain()
    return writer


@pytest.mark.slow
@pytest.mark.sqlite_only("the RSS of a process on a SQLite file (ProcessService), 12 s")
async def test_streams_that_do_not_read_hold_a_bounded_amount(tmp_path: Path) -> None:
    """Thirty streams replaying a log of big events to clients that never read hold a few
    hundred KiB each in the server, not the replay; the others are served meanwhile and
    a reader that does read gets every event."""
    db = str(tmp_path / "big.db")
    svc = ProcessService(db, free_port(), env={"PROGRESS_SSE_TAIL_SIZE": "16"})
    svc.start()
    writers: list[asyncio.StreamWriter] = []
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=30) as client:
            job = await create_job(client, meta={"blob": "m" * 16000})
            blob = "d" * 16000
            for i in range(400):  # about 35 KB each: 14 MB of log
                r = await client.post(f"/api/jobs/{job['id']}/progress",
                                      json={"progress": i / 5, "message": "x" * 1000,
                                            "data": {"blob": blob, "i": i}})
                assert r.status_code == 200, r.text
            events = await db_events(db)
            assert sum(len(str(e)) for e in events) > 12_000_000
            await client.get("/healthz")
            before = svc.rss_kib()
            for _ in range(30):
                writers.append(await _open_unread(svc.port, "/api/events", 1))
            await wait_for(lambda: '"streams":30' in httpx.get(svc.url + "/healthz").text,
                           what="the streams open")
            # the replays have run into their clients' full buffers; others are served
            latencies = []
            for _ in range(40):
                t0 = time.monotonic()
                r = await client.get(f"/api/jobs/{job['id']}")
                latencies.append(time.monotonic() - t0)
                assert r.status_code == 200
                await asyncio.sleep(0.02)
            grown_mib = (svc.rss_kib() - before) / 1024
            assert grown_mib < 40, f"30 unread streams took {grown_mib:.0f} MiB"
            assert max(latencies) < 1.0, f"others waited {max(latencies):.2f} s"
            assert statistics.median(latencies) < 0.1
            # a stream that does read gets every event, in order
            seen = []
            async with aconnect_sse(client, "GET", "/api/events",
                                    headers={"Last-Event-ID": "1"}) as src:
                async for ev in src.aiter_sse():
                    assert ev.data and ev.id, f"an event without data or id: {ev}"
                    seen.append(int(ev.id))
                    if seen and seen[-1] == events[-1]["id"]:
                        break
            assert seen == [e["id"] for e in events[1:]]
    finally:
        for w in writers:
            w.close()
        svc.stop()


@pytest.mark.slow
async def test_an_open_and_close_storm_leaves_no_work_behind(settings: Settings) -> None:
    """A user with 500 jobs opens streams and drops them as their snapshots arrive, as
    fast as it can: the snapshot is read once per moment, not once per open; another
    user is served meanwhile; and the service is idle again as soon as the storm ends."""
    settings = settings.model_copy(update={"jwt_secret": SECRET, "auth": "jwt",
                                           "max_streams_per_user": 50})
    svc = await start_service(settings)
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=30,
                                     headers=bearer("bob")) as bob, \
                httpx.AsyncClient(base_url=svc.url, timeout=30,
                                  headers=bearer("alice")) as alice:
            for i in range(500):
                r = await bob.post("/api/jobs", json={"kind": "k", "title": f"job {i}",
                                                      "meta": {"note": "n" * 300}})
                assert r.status_code == 201
            mine = await create_job(alice)
            token = bob.headers["Authorization"].encode()
            request = (b"GET /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: " + token
                       + b"\r\n\r\n")
            opens = 0
            stop = time.monotonic() + 3.0

            async def open_and_drop() -> None:
                """Open a stream, wait for its snapshot to start arriving, hang up."""
                nonlocal opens
                while time.monotonic() < stop:
                    r, w = await asyncio.open_connection("127.0.0.1", svc.settings.port)
                    w.write(request)
                    got = b""
                    while b"event: snapshot" not in got and b" 429 " not in got[:20]:
                        chunk = await r.read(4096)
                        assert chunk, got[:200]
                        got += chunk
                    opens += b"event: snapshot" in got
                    w.close()
                    with contextlib.suppress(ConnectionError):
                        await w.wait_closed()

            latencies = []

            async def other_user() -> None:
                while time.monotonic() < stop:
                    t0 = time.monotonic()
                    r = await alice.get(f"/api/jobs/{mine['id']}")
                    latencies.append(time.monotonic() - t0)
                    assert r.status_code == 200
                    await asyncio.sleep(0.02)

            await asyncio.gather(*(open_and_drop() for _ in range(40)), other_user())
            reads = svc.ctx.snapshots.reads
            assert opens > 500, f"only {opens} opens"
            assert reads < opens / 5, f"{reads} snapshot reads for {opens} opens"
            p99 = statistics.quantiles(latencies, n=100)[98]
            assert p99 < 0.5, f"the other user's p99 was {p99:.2f} s"
            await wait_for(lambda: svc.ctx.hub.streams == 0, timeout=5,
                           what="every dropped stream closed")
            t0 = time.monotonic()
            r = await alice.get(f"/api/jobs/{mine['id']}")
            assert r.status_code == 200 and time.monotonic() - t0 < 0.2
    finally:
        await svc.stop()

"""PostgreSQL failures: outages, a lost commit answer, a lost listener, kill -9.

Outages are a proxy this test controls (tests/pg.Proxy), never the shared server:
cut, every connection through it is closed and new ones are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from progress_sse.settings import Settings

from .helpers import create_job, free_port, start_service, wait_for
from .pg import PgProcess, dsn_for, module_fixture, proxy, query, stored_ids

module_database = module_fixture()


def via(dsn: str, port: int) -> str:
    return dsn_for(dsn.rsplit("/", 1)[1], port)


async def test_an_outage_answers_503_at_once_and_the_service_recovers(pg_dsn: str) -> None:
    """With the database unreachable, writes answer 503 at once with a JSON error and
    /healthz says 503; once it is back, writes succeed again without a restart."""
    async with proxy() as p:
        svc = await start_service(Settings(db=via(pg_dsn, p.port), write_timeout_s=5))
        try:
            async with httpx.AsyncClient(base_url=svc.url, timeout=30) as client:
                job = await create_job(client, kind="outage")
                await p.cut()
                for _ in range(3):
                    started = time.monotonic()
                    r = await client.post(f"/api/jobs/{job['id']}/log", json={"message": "x"})
                    assert r.status_code == 503, r.text
                    assert time.monotonic() - started < 1.5, "not at once"
                    error = r.json()["error"]
                    assert error["code"] == "unavailable" and "database" in error["message"]
                health = await client.get("/healthz")
                assert health.status_code == 503 and health.json()["reason"]
                await p.start()  # back, on the same port

                async def writes() -> bool:
                    r = await client.post(f"/api/jobs/{job['id']}/log", json={"message": "y"})
                    return r.status_code == 200

                await wait_for(writes, timeout=10, interval=0.2, what="writes again")
                await wait_for(lambda: _ok(client), timeout=10, what="/healthz 200")
                rows = await query(pg_dsn, "SELECT count(*) FROM events WHERE job_id = $1"
                                           " AND type = 'log'", job["id"])
                assert rows[0][0] == 1, "a refused write was stored"
        finally:
            await svc.stop()


async def _ok(client: httpx.AsyncClient) -> bool:
    return (await client.get("/healthz")).status_code == 200


@pytest.mark.parametrize("lost", ["after", "before"])
async def test_a_commit_whose_answer_is_lost_is_settled_not_repeated(
        pg_dsn: str, lost: str) -> None:
    """The connection drops as the COMMIT is sent: after the server got it (it
    committed; the answer is lost) or before (it did not). pg_xact_status settles it:
    the write is answered 200 and stored exactly once either way."""
    async with proxy() as p:
        svc = await start_service(Settings(db=via(pg_dsn, p.port)))
        try:
            async with httpx.AsyncClient(base_url=svc.url, timeout=30) as client:
                job = await create_job(client, kind="settle")
                p.on_commit = lost
                r = await client.post(f"/api/jobs/{job['id']}/log", json={"message": lost})
                assert p.dropped == [lost], "the proxy did not drop a COMMIT"
                assert r.status_code == 200, r.text
                rows = await query(pg_dsn, "SELECT id FROM events WHERE job_id = $1"
                                           " AND type = 'log'", job["id"])
                assert [row[0] for row in rows] == [r.json()["event_id"]]
                # and it goes on: the next write on the new connection follows on
                nxt = await client.post(f"/api/jobs/{job['id']}/log", json={"message": "n"})
                assert nxt.json()["event_id"] == r.json()["event_id"] + 1
        finally:
            await svc.stop()


async def test_a_listener_terminated_mid_stream_costs_nothing(pg_dsn: str) -> None:
    """pg_terminate_backend of B's LISTEN connection while posts go through A: B's
    reader gets every event once, in order; B listens again."""
    a = await start_service(Settings(db=pg_dsn))
    b = await start_service(Settings(db=pg_dsn))
    try:
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as ca, \
                httpx.AsyncClient(base_url=b.url, timeout=30) as cb:
            job = await create_job(ca, kind="listen")
            await wait_for(lambda: b.ctx.hub.head >= a.ctx.hub.head, what="B has the job")
            start = b.ctx.hub.head
            seen: list[int] = []
            total = 120

            async def read() -> None:
                async with aconnect_sse(cb, "GET", f"/api/jobs/{job['id']}/events",
                                        headers={"Last-Event-ID": str(start)}) as src:
                    async for ev in src.aiter_sse():
                        seen.append(int(ev.id))
                        if ev.event == "finished":
                            return

            reading = asyncio.create_task(read())
            tail = b.ctx.store.tail  # type: ignore[attr-defined]
            for i in range(total):
                if i in (30, 70):
                    pid = tail.listener.get_server_pid()
                    await query(pg_dsn, "SELECT pg_terminate_backend($1)", pid)
                await ca.post(f"/api/jobs/{job['id']}/log", json={"message": str(i)})
            await ca.post(f"/api/jobs/{job['id']}/finish", json={"status": "succeeded"})
            await asyncio.wait_for(reading, 20)
            stored = [i for i, _ in await stored_ids(pg_dsn, [job["id"]], after=start)]
            assert seen == stored
            assert tail.reconnects >= 2
            await wait_for(lambda: tail.listening.is_set(), what="listening again")
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.slow
def test_kill_9_of_an_instance_under_load_readers_resume_on_another(
        pg_dsn: str, tmp_path: Path) -> None:
    """Two service processes; posters and readers on A; A is killed -9 mid-load; the
    readers resume on B with their last id and see exactly the stored log."""
    a = PgProcess(pg_dsn, free_port(), tmp_path)
    b = PgProcess(pg_dsn, free_port(), tmp_path)
    a.start()
    b.start()
    try:
        asyncio.run(_kill_under_load(pg_dsn, a, b))
    finally:
        a.stop()
        b.stop()


async def _kill_under_load(dsn: str, a: PgProcess, b: PgProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(a.url + "/api/jobs", json={"kind": "kill"})
        job_id = r.json()["job"]["id"]
        stop = asyncio.Event()
        acked: list[int] = []

        async def poster(k: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                for url in (a.url, b.url) if k % 2 else (b.url, a.url):
                    with contextlib.suppress(httpx.TransportError):
                        r = await http.post(f"{url}/api/jobs/{job_id}/log",
                                            json={"message": f"{k}-{n}"})
                        if r.status_code == 200:
                            acked.append(r.json()["event_id"])
                            break

        async def reader() -> tuple[list[int], int]:
            seen: list[int] = []
            last = 0
            hops = 0
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                url = a.url if hops == 0 else b.url
                headers: dict[str, Any] = {"Last-Event-ID": str(last)}
                try:
                    async with aconnect_sse(http, "GET", f"{url}/api/jobs/{job_id}/events",
                                            headers=headers) as src:
                        if src.response.status_code == 204:
                            return seen, hops
                        async for ev in src.aiter_sse():
                            seen.append(int(ev.id))
                            last = int(ev.id)
                            if ev.event == "finished":
                                return seen, hops
                except httpx.TransportError:
                    pass
                hops += 1
                await asyncio.sleep(0.05)
            return seen, hops

        readers = [asyncio.create_task(reader()) for _ in range(4)]
        posters = [asyncio.create_task(poster(k)) for k in range(6)]
        await asyncio.sleep(1.5)
        await asyncio.to_thread(a.kill)
        killed_at = len(acked)
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*posters)
        r = await http.post(f"{b.url}/api/jobs/{job_id}/finish", json={"status": "succeeded"})
        assert r.status_code == 200, r.text
        results = await asyncio.gather(*readers)
    stored = [i for i, _ in await stored_ids(dsn, [job_id])]
    assert stored == list(range(stored[0], stored[-1] + 1)), "ids with gaps"
    assert set(acked) <= set(stored), "an acknowledged post was lost"
    assert killed_at > 20 and len(acked) > killed_at + 20, (killed_at, len(acked))
    for seen, hops in results:
        assert hops >= 1, "the reader never moved to B"
        assert seen == stored, "a reader lost, repeated or reordered events"

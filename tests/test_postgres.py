"""Several instances on one PostgreSQL database: migrations, ids, job rules, delivery.

The instances run in this process (real uvicorn each, real PostgreSQL); the tests
of processes killed and of outages are in test_postgres_failures.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from progress_sse.migrations import available
from progress_sse.settings import Settings
from progress_sse.store.postgres_schema import DIRECTORY

from .helpers import ROOT, Service, create_job, free_port, start_service, wait_for
from .pg import PgProcess, database, module_fixture, query, stored_ids

VERSIONS = [v for v, _ in available(DIRECTORY)]  # the PostgreSQL migrations, in order

module_database = module_fixture()


@contextlib.asynccontextmanager
async def instances(dsn: str, n: int, **changes: Any) -> AsyncIterator[list[Service]]:
    settings = Settings(db=dsn).model_copy(update=changes)
    services = list(await asyncio.gather(*(start_service(settings) for _ in range(n))))
    try:
        yield services
    finally:
        await asyncio.gather(*(s.stop() for s in services), return_exceptions=True)


@contextlib.asynccontextmanager
async def processes(dsn: str, n: int, log_dir: Path, *flags: str
                    ) -> AsyncIterator[list[PgProcess]]:
    """`n` real service processes on one database, started at once."""
    procs = [PgProcess(dsn, free_port(), log_dir) for _ in range(n)]
    try:
        for proc in procs:
            proc.start(*flags, wait=False)
        await asyncio.gather(*(asyncio.to_thread(p.wait_healthy) for p in procs))
        yield procs
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))


def clients(services: Sequence[Service | PgProcess]) -> list[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200)
    return [httpx.AsyncClient(base_url=s.url, timeout=30, limits=limits) for s in services]


async def post(client: httpx.AsyncClient, job_id: str, what: str, **body: Any) -> httpx.Response:
    return await client.post(f"/api/jobs/{job_id}/{what}", json=body)


# ---------------------------------------------------------------- migrations


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "progress_sse", *args], cwd=ROOT,
        capture_output=True, text=True, timeout=60)


async def test_three_instances_start_at_once_on_an_empty_database(tmp_path: Path) -> None:
    """Three service processes starting together on an empty database all start; the
    schema is applied once; `progress-sse migrate` then finds nothing to do, and a
    database newer than the code is refused with a message naming both versions."""
    async with database() as dsn:
        async with processes(dsn, 3, tmp_path) as services:
            for s in services:
                async with httpx.AsyncClient(base_url=s.url) as c:
                    r = await c.get("/healthz")
                assert r.status_code == 200, r.text
        rows = await query(dsn, "SELECT version FROM schema_migrations ORDER BY version")
        assert [r[0] for r in rows] == VERSIONS
        again = await cli("migrate", "--db", dsn)
        assert again.returncode == 0 and "nothing (up to date)" in again.stdout, again
        await query(dsn, "INSERT INTO schema_migrations VALUES (99, '0099_future.sql', now())")
        refused = await cli("migrate", "--db", dsn)
        assert refused.returncode == 2, refused
        assert f"schema version 99, newer than this code knows ({VERSIONS[-1]})" \
            in refused.stderr
    async with database() as dsn:
        fresh = await cli("migrate", "--db", dsn)
        assert fresh.returncode == 0 and f"applied {VERSIONS}" in fresh.stdout, fresh


# ---------------------------------------------------------------- delivery

WORK_S = 5.0
POSTERS = 3  # per instance
READ_S = 60.0


async def poster(client: httpx.AsyncClient, job_ids: list[str], until: float, k: int) -> None:
    n = 0
    while time.monotonic() < until:
        for job_id in job_ids:
            r = await post(client, job_id, "log", message=f"{k}-{n}")
            assert r.status_code == 200, r.text
        n += 1


async def hopping_reader(hosts: list[httpx.AsyncClient], path: str, params: dict[str, Any],
                         start: int, done: Callable[[int], bool], rng: random.Random
                         ) -> tuple[list[int], int]:
    """Read a few events from one instance, hang up, pause, resume on another."""
    seen: list[int] = []
    last = start
    hops = 0
    deadline = time.monotonic() + READ_S
    while not done(last) and time.monotonic() < deadline:
        client = hosts[hops % len(hosts)]
        budget = rng.randint(1, 30)
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline - time.monotonic()), \
                    aconnect_sse(client, "GET", path, params=params, headers=headers) as src:
                if src.response.status_code == 204:
                    return seen, hops
                assert src.response.status_code == 200, await src.response.aread()
                async for ev in src.aiter_sse():
                    assert ev.event != "snapshot", "a resume started over"
                    seen.append(int(ev.id))
                    last = int(ev.id)
                    budget -= 1
                    if budget == 0 or done(last):
                        break
        hops += 1
        await asyncio.sleep(rng.uniform(0.0, 0.2))
    return seen, hops


@pytest.mark.slow
async def test_posts_on_every_instance_readers_hopping_between_them(
        pg_dsn: str, tmp_path: Path) -> None:
    """Three service processes. Posters on all three at once; readers (every event, one
    job by filter, one job's stream) change instance at every reconnect, behind a
    16-event tail so that most resumes read the store: each sees exactly the stored
    log, in id order."""
    async with processes(pg_dsn, 3, tmp_path, "--tail-size", "16",
                         "--replay-batch", "40") as services:
        hosts = clients(services)
        try:
            ids = [(await create_job(hosts[i], kind="hop"))["id"] for i in range(2)]
            start = (await hosts[0].get("/healthz")).json()["head"]
            final: dict[str, int] = {}

            def after(*job_ids: str) -> Callable[[int], bool]:
                return lambda last: all(j in final for j in job_ids) \
                    and last >= max(final[j] for j in job_ids)

            kinds = {"all": ("/api/events", {"kind": "hop"}, after(*ids)),
                     "job filter": ("/api/events", {"job": ids[0]}, after(ids[0])),
                     "per job": (f"/api/jobs/{ids[1]}/events", {}, after(ids[1]))}
            rng = random.Random(18)
            readers = {(name, n): asyncio.create_task(hopping_reader(
                hosts[n:] + hosts[:n], path, params, start, done, random.Random(rng.random())))
                for name, (path, params, done) in kinds.items() for n in range(3)}
            until = time.monotonic() + WORK_S
            await asyncio.gather(*(poster(h, ids, until, k) for h in hosts
                                   for k in range(POSTERS)))
            for i, job_id in enumerate(ids):
                r = await post(hosts[i], job_id, "finish", status="succeeded")
                assert r.status_code == 200, r.text
                final[job_id] = r.json()["job"]["final_event_id"]
            results = {name: await task for name, task in readers.items()}
        finally:
            for h in hosts:
                await h.aclose()
    stored = await stored_ids(pg_dsn, ids, after=start)
    ids_all = [i for i, _ in stored]
    assert ids_all == list(range(ids_all[0], ids_all[-1] + 1)), "ids with gaps"
    expected = {"all": ids_all,
                "job filter": [i for i, j in stored if j == ids[0]],
                "per job": [i for i, j in stored if j == ids[1]]}
    assert len(ids_all) > 150, "too few posts to mean anything"
    for (name, _), (seen, hops) in results.items():
        assert hops > 5, f"{name}: the reader did not hop often enough"
        assert seen == expected[name], (
            f"{name}: {len(seen)} seen, {len(expected[name])} stored; missing "
            f"{sorted(set(expected[name]) - set(seen))[:5]}, extra or repeated "
            f"{[i for i in seen if seen.count(i) > 1 or i not in expected[name]][:5]}")


async def test_a_resume_ahead_of_a_lagging_instance_waits_for_it(pg_dsn: str) -> None:
    """A reader resuming on C with an id C's hub has not reached yet (C's tail stopped)
    gets no reset and no duplicate: it gets the next events once C catches up."""
    async with instances(pg_dsn, 2) as (a, c):
        ca, cc = clients([a, c])
        try:
            job = await create_job(ca, kind="lag")
            await wait_for(lambda: c.ctx.hub.head >= a.ctx.hub.head, what="C caught up")
            tail = c.ctx.store.tail  # type: ignore[attr-defined]
            await tail.close()  # C hears nothing more for now
            posted = [(await post(ca, job["id"], "log", message=str(i))).json()["event_id"]
                      for i in range(3)]
            assert c.ctx.hub.head < posted[0]
            got: list[tuple[str, int]] = []

            async def read() -> None:
                headers = {"Accept": "text/event-stream", "Last-Event-ID": str(posted[1])}
                async with aconnect_sse(cc, "GET", "/api/events", params={"kind": "lag"},
                                        headers=headers) as src:
                    async for ev in src.aiter_sse():
                        got.append((ev.event, int(ev.id)))
                        if len(got) == 2:
                            return

            reading = asyncio.create_task(read())
            await asyncio.sleep(0.3)
            assert got == [], "sent before C had the events"
            more = (await post(ca, job["id"], "log", message="after")).json()["event_id"]
            tail.start()  # C reads on from its head
            await asyncio.wait_for(reading, 10)
            assert got == [("log", posted[2]), ("log", more)]
        finally:
            await ca.aclose()
            await cc.aclose()


async def test_a_cancel_on_one_instance_wakes_a_long_poll_on_another(
        pg_dsn: str, tmp_path: Path) -> None:
    """A long-poll on process B answers promptly when the cancel is posted on process A
    (NOTIFY, then B's tail read): well under the half-second periodic read, in the
    median."""
    async with processes(pg_dsn, 2, tmp_path) as (a, b):
        ca, cb = clients([a, b])
        try:
            delays = []
            for _ in range(7):
                job = await create_job(ca, kind="poll")
                await post(ca, job["id"], "progress", progress=1)
                poll = asyncio.create_task(cb.get(f"/api/jobs/{job['id']}/control",
                                                  params={"wait": 10}))
                await asyncio.sleep(0.1)
                assert not poll.done()
                r = await post(ca, job["id"], "cancel")
                assert r.status_code == 202
                answered = time.monotonic()
                polled = await asyncio.wait_for(poll, 5)
                delays.append(time.monotonic() - answered)
                assert polled.json()["control"]["cancel_requested"] is True
            assert statistics.median(delays) < 0.15, delays
        finally:
            await ca.aclose()
            await cb.aclose()


# ---------------------------------------------------------------- job rules across instances


async def test_job_rules_hold_across_instances(pg_dsn: str, tmp_path: Path) -> None:
    """The same seq through A then B is stored once; a requeue on A fences the old
    attempt's posts on B; pause on B, acknowledged on A, resumed on B; queue places
    given alternately by A and B follow the order of creation and move up together."""
    async with processes(pg_dsn, 2, tmp_path) as (a, b):
        ca, cb = clients([a, b])
        try:
            job = await create_job(ca, kind="rules")
            first = await post(ca, job["id"], "progress", progress=10, seq=5)
            again = await post(cb, job["id"], "progress", progress=10, seq=5)
            assert again.status_code == 200 and again.json()["duplicate"] is True
            assert again.json()["event_id"] == first.json()["event_id"]
            stale = await post(cb, job["id"], "progress", progress=5, seq=4)
            assert stale.status_code == 409
            rows = await query(pg_dsn, "SELECT count(*) FROM events WHERE job_id = $1"
                                       " AND seq = 5", job["id"])
            assert rows[0][0] == 1

            # pause on B, acknowledged by the worker through A, resumed on B
            assert (await post(cb, job["id"], "pause")).status_code == 202
            ack = await post(ca, job["id"], "progress", paused=True)
            assert ack.json()["job"]["status"] == "paused"
            assert (await post(cb, job["id"], "resume")).json()["job"]["pause_requested"] \
                is False
            assert (await post(ca, job["id"], "progress", progress=20)).json()["job"][
                "status"] == "running"

            # attempt fencing: requeued on A, the old attempt's worker is refused on B
            assert (await post(ca, job["id"], "requeue")).status_code == 200
            old = await post(cb, job["id"], "progress", progress=30, attempt=1)
            assert old.status_code == 409, old.text
            new = await post(cb, job["id"], "progress", progress=1, attempt=2, seq=1)
            assert new.status_code == 200, new.text

            # queue places: created alternately on A and B
            queued = [(await create_job((ca, cb)[i % 2], kind="q", queue="shared"))
                      for i in range(6)]
            assert [j["queue_position"] for j in queued] == [1, 2, 3, 4, 5, 6]
            started = await post(cb, queued[0]["id"], "progress", progress=1)
            assert started.status_code == 200
            places = [(await (ca, cb)[i % 2].get(f"/api/jobs/{j['id']}")).json()["job"]
                      ["queue_position"] for i, j in enumerate(queued[1:])]
            assert places == [1, 2, 3, 4, 5]
            gone = await post(ca, queued[3]["id"], "cancel")
            assert gone.status_code == 200, gone.text
            places = [(await cb.get(f"/api/jobs/{j['id']}")).json()["job"]["queue_position"]
                      for j in (queued[1], queued[2], queued[4], queued[5])]
            assert places == [1, 2, 3, 4]
        finally:
            await ca.aclose()
            await cb.aclose()


async def test_one_stalled_event_per_silent_job_with_three_instances(
        pg_dsn: str, tmp_path: Path) -> None:
    """Three instances check for silent workers every 50 ms: each silent job gets one
    `stalled` status event, not one per instance."""
    async with processes(pg_dsn, 3, tmp_path, "--stall-check", "0.05") as services:
        hosts = clients(services)
        try:
            jobs = [await create_job(hosts[i % 3], kind="stall", heartbeat_timeout_s=1)
                    for i in range(6)]
            for i, job in enumerate(jobs):
                await post(hosts[i % 3], job["id"], "progress", progress=1)

            async def all_stalled() -> bool:
                rows = await query(pg_dsn, "SELECT count(*) FROM jobs WHERE kind = 'stall'"
                                           " AND stalled = 1")
                return bool(rows[0][0] == len(jobs))

            await wait_for(all_stalled, timeout=10, what="every job stalled")
            await asyncio.sleep(0.5)  # time for a second marking, if there were one
            rows = await query(pg_dsn, "SELECT job_id, count(*) FROM events WHERE kind ="
                                       " 'stall' AND body LIKE '%\"stalled\":true%'"
                                       " GROUP BY job_id")
            assert sorted(r[1] for r in rows) == [1] * len(jobs), rows
            holders = await query(pg_dsn, "SELECT holder FROM leases WHERE name = 'stalls'")
            assert holders[0][0]
        finally:
            for h in hosts:
                await h.aclose()


async def test_retention_keeps_the_newest_events(tmp_path: Path) -> None:
    """With retention_events, the oldest events are pruned (by one instance at a time)
    and a reader older than what is kept starts over with a snapshot."""
    async with database() as dsn:
        async with processes(dsn, 2, tmp_path, "--retention-events", "50") as (a, b):
            ca, cb = clients([a, b])
            try:
                job = await create_job(ca, kind="keep")
                for i in range(150):
                    await post((ca, cb)[i % 2], job["id"], "log", message=str(i))

                async def pruned() -> bool:
                    rows = await query(dsn, "SELECT count(*), min(id), max(id) FROM events")
                    return bool(rows[0][0] <= 60 and rows[0][2] - rows[0][1] + 1 == rows[0][0])

                await wait_for(pruned, timeout=10, what="pruned to about 50 events")
                async with aconnect_sse(cb, "GET", "/api/events",
                                        headers={"Last-Event-ID": "3"}) as src:
                    async for ev in src.aiter_sse():
                        assert ev.event == "snapshot" and '"reset":true' in ev.data
                        break
            finally:
                await ca.aclose()
                await cb.aclose()

"""Retention and compaction: old events and jobs go, the horizon moves with every
deletion, and no reader ever skips a deleted event: it gets a reset snapshot instead.

Retention here is tiny (RETENTION_DAYS: under two seconds) and pruning runs every
tenth of a second, so the tests see whole lifetimes in a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from progress_sse import migrations
from progress_sse.settings import Settings
from progress_sse.store.sqlite_retention import KEEP_FREE_PAGES

from .helpers import create_job, metric, start_service, wait_for
from .stored import fetch

STORES = ("sqlite", "postgres")  # every test asking for `db` runs on both (conftest.py)
RETENTION_DAYS = 2e-5  # 1.73 s
RETENTION_S = RETENTION_DAYS * 86400
PRUNE = {"retention_days": RETENTION_DAYS, "retention_every_s": 0.1}
KEEP = {"retention_days": 0.0, "retention_every_s": 0.1}
SSE = {"Accept": "text/event-stream"}


async def post(client: httpx.AsyncClient, job_id: str, what: str = "progress",
               **fields: Any) -> dict[str, Any]:
    r = await client.post(f"/api/jobs/{job_id}/{what}", json=fields)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def retention(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/healthz", params={"verbose": ""})
    assert r.status_code == 200, r.text
    state: dict[str, Any] = r.json()["retention"]
    return state


async def event_ids(db: str, job_id: str | None = None) -> list[int]:
    if job_id is None:
        rows = await fetch(db, "SELECT id FROM events ORDER BY id")
    else:
        rows = await fetch(db, "SELECT id FROM events WHERE job_id = ? ORDER BY id", job_id)
    return [r[0] for r in rows]


async def test_old_events_and_finished_jobs_go(settings: Settings) -> None:
    """Events older than the retention go, and jobs finished before the horizon with
    them; an active job stays (its old events go); everything after the horizon stays;
    /healthz?verbose and /metrics show the horizon."""
    svc = await start_service(settings.model_copy(update=PRUNE))
    db = settings.db
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            done = await create_job(client, kind="old")
            for i in range(5):
                await post(client, done["id"], progress=i * 10)
            last_old = (await post(client, done["id"], "finish", status="succeeded")
                        )["event_id"]
            active = await create_job(client, kind="active")
            await post(client, active["id"], progress=5)

            async def gone() -> bool:
                return not await fetch(db, "SELECT id FROM jobs WHERE id = ?", done["id"])

            await wait_for(gone, timeout=RETENTION_S + 10, what="the finished job deleted")
            assert await event_ids(db, done["id"]) == []
            assert await fetch(db, "SELECT id FROM jobs WHERE id = ?", active["id"])
            r = await client.get(f"/api/jobs/{done['id']}")
            assert r.status_code == 404
            r = await client.get(f"/api/jobs/{active['id']}")
            assert r.status_code == 200 and r.json()["job"]["progress"] == 5

            async def horizon_known() -> bool:
                return (await retention(client))["horizon"] >= last_old

            await wait_for(horizon_known, timeout=5, what="the horizon past the old job")
            # newer than any horizon for RETENTION_S: the checks below are well within it
            newer = [(await post(client, active["id"], "log", message=str(i)))["event_id"]
                     for i in range(3)]
            state = await retention(client)  # as pruning last saw it: the database's may
            ids = await event_ids(db)  # be higher now, never lower
            assert ids[0] > state["horizon"]
            # nothing after the horizon is missing
            assert ids == list(range(ids[0], svc.ctx.hub.head + 1))
            assert set(newer) <= set(ids)
            # the JSON history from before the horizon says where what is kept starts
            r = await client.get(f"/api/jobs/{active['id']}/events", params={"after": 0})
            page = r.json()
            got = [e["id"] for e in page["events"]]
            assert page["horizon"] >= state["horizon"] and got == sorted(got)
            assert got[0] > page["horizon"] and got[-3:] == newer
            # read after it: pruning may have gone on since, never back
            assert set(await event_ids(db, active["id"])) <= set(got)
            m = (await client.get("/metrics")).text
            assert metric(m, "progress_sse_retention_horizon") >= last_old
            oldest = metric(m, "progress_sse_oldest_event_id")  # 0: none (all pruned)
            assert oldest == 0 or oldest > metric(m, "progress_sse_retention_horizon")
            assert metric(m, "progress_sse_events_pruned_total") >= 7
            assert metric(m, "progress_sse_jobs_pruned_total") == 1
    finally:
        await svc.stop()


async def test_resume_from_before_the_horizon_gets_a_reset_snapshot(
        settings: Settings) -> None:
    """A resume from before the horizon answers a snapshot with reset: true and goes on
    from its head; one from the horizon on resumes with the next event."""
    svc = await start_service(settings.model_copy(update=PRUNE))
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            job = await create_job(client)
            first = (await post(client, job["id"], progress=1))["event_id"]

            async def pruned() -> bool:
                return (await retention(client))["horizon"] >= first

            await wait_for(pruned, timeout=RETENTION_S + 10, what="the first events pruned")
            horizon = (await retention(client))["horizon"]
            nxt = (await post(client, job["id"], progress=50))["event_id"]
            async with aconnect_sse(client, "GET", "/api/events",
                                    headers={**SSE, "Last-Event-ID": str(horizon - 1)}) as src:
                events = src.aiter_sse()
                snap = await anext(events)
                assert snap.event == "snapshot"
                data = json.loads(snap.data)
                assert data["reset"] is True
                assert int(snap.id) == nxt
                assert data["jobs"][0]["progress"] == 50
                after = (await post(client, job["id"], progress=60))["event_id"]
                assert int((await anext(events)).id) == after
            async with aconnect_sse(client, "GET", "/api/events",
                                    headers={**SSE, "Last-Event-ID": str(horizon)}) as src:
                got = await anext(src.aiter_sse())
                assert got.event != "snapshot"
                assert int(got.id) == horizon + 1
    finally:
        await svc.stop()


async def test_reader_pruned_under_while_catching_up_gets_a_reset(settings: Settings) -> None:
    """A reader catching up from the store, stalled mid-way while what it has not read
    yet is pruned, gets a reset snapshot, never a gap."""
    svc = await start_service(settings.model_copy(update={
        "retention_days": 0.0, "retention_events": 1000, "retention_every_s": 60.0,
        "tail_size": 16, "replay_batch": 5}))
    pad = "x" * 15_000
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=30) as client, \
                httpx.AsyncClient(base_url=svc.url, timeout=30) as reader:
            job = await create_job(client)
            start = svc.ctx.hub.head
            big = [(await post(client, job["id"], progress=1, data={"pad": pad}))["event_id"]
                   for _ in range(700)]  # 10 MB: more than the socket buffers hold
            async with aconnect_sse(reader, "GET", "/api/events",
                                    headers={**SSE, "Last-Event-ID": str(start)}) as src:
                events = src.aiter_sse()
                got = [await anext(events)]  # then stop reading: the server's send waits
                assert int(got[0].id) == start + 1
                # retention by count: every big event goes, and more
                while (await retention(client))["horizon"] <= big[-1]:
                    for _ in range(100):
                        await post(client, job["id"], "log", message="m")
                head = svc.ctx.hub.head
                async with asyncio.timeout(30):
                    async for ev in events:
                        got.append(ev)
                        if int(ev.id) >= head:
                            break
    finally:
        await svc.stop()
    resets = [i for i, ev in enumerate(got) if ev.event == "snapshot"]
    before = got[:resets[0] if resets else len(got)]
    assert [int(e.id) for e in before] == list(range(start + 1, start + 1 + len(before))), \
        "a gap: the reader skipped events pruned under it"
    assert len(resets) == 1, "no reset snapshot: the reader was not pruned under"
    assert json.loads(got[resets[0]].data)["reset"] is True
    after = got[resets[0] + 1:]
    snap_id = int(got[resets[0]].id)
    assert [int(e.id) for e in after] == list(range(snap_id + 1, snap_id + 1 + len(after)))


async def test_compaction_keeps_final_state_and_log_lines(settings: Settings) -> None:
    """compact_after a job finished, its progress events go; its created, status, log and
    finished events and its final state stay; an unfinished job keeps everything."""
    svc = await start_service(settings.model_copy(update={**KEEP, "compact_after": 0.5}))
    db = settings.db
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            job = await create_job(client, stages=[{"key": "a"}, {"key": "b"}])
            running = await create_job(client)
            await post(client, running["id"], progress=10)
            for stage, p in (("a", 50), ("a", 100), ("b", 30)):
                await post(client, job["id"], stage=stage, progress=p)
            r = await client.post(f"/api/jobs/{job['id']}/pause")
            assert r.status_code in (200, 202), r.text
            await post(client, job["id"], progress=40, paused=True)
            await post(client, job["id"], "log", message="first line")
            await post(client, job["id"], "log", level="warning", message="second line")
            await post(client, job["id"], "finish", status="succeeded", result={"n": 1})
            before = (await client.get(f"/api/jobs/{job['id']}")).json()["job"]
            types_before = [r[0] for r in await fetch(
                db, "SELECT type FROM events WHERE job_id = ? ORDER BY id", job["id"])]
            assert types_before.count("progress") >= 4 and "status" in types_before

            async def compacted() -> bool:
                return not await fetch(db, "SELECT id FROM events WHERE job_id = ? AND"
                                           " type = 'progress'", job["id"])

            await wait_for(compacted, timeout=10, what="the progress events compacted")
            rows = await fetch(db, "SELECT type, body FROM events WHERE job_id = ? ORDER BY id",
                               job["id"])
            assert [t for t, _ in rows] == [t for t in types_before if t != "progress"]
            messages = [json.loads(b)["message"] for t, b in rows if t == "log"]
            assert messages == ["first line", "second line"]
            after = (await client.get(f"/api/jobs/{job['id']}")).json()["job"]
            assert after == before
            assert (await fetch(db, "SELECT COUNT(*) FROM events WHERE job_id = ? AND"
                                " type = 'progress'", running["id"])) == [(1,)]
            # compaction moved the horizon: a resume from before it starts over
            state = await retention(client)
            assert state["horizon"] > 0 and state["events_compacted"] >= 4
            async with aconnect_sse(client, "GET", "/api/events",
                                    headers={**SSE, "Last-Event-ID": "1"}) as src:
                snap = await anext(src.aiter_sse())
                assert snap.event == "snapshot" and json.loads(snap.data)["reset"] is True
    finally:
        await svc.stop()


# ---------------------------------------------------------------- under load

WORK_S = 6.0
POSTERS = 4
READERS = 4  # of each kind: unfiltered, filtered by job
CONNECTION_S = 1.5
READ_S = 40.0


class Copy:
    """Every event as it is stored, copied from the database faster than retention
    deletes it (checked gap-free), to compare readers with after it is gone."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.events: dict[int, tuple[str, str]] = {}  # id: job id, body
        self.last = 0

    async def poll(self, stop: asyncio.Event) -> None:
        while True:
            rows = await fetch(self.db, "SELECT id, job_id, body FROM events WHERE id > ?"
                               " ORDER BY id", self.last)
            for i, job_id, body in rows:
                self.events[i] = (job_id, body)
                self.last = i
            if stop.is_set():
                return
            await asyncio.sleep(0.05)


Segment = tuple[int, list[tuple[int, str]]]  # a cursor, and the events got after it


async def resuming_reader(client: httpx.AsyncClient, params: dict[str, Any], start: int,
                          done: Callable[[int], bool], rng: random.Random
                          ) -> tuple[list[Segment], int]:
    """Read a few events, hang up, pause (sometimes longer than retention), resume with
    Last-Event-ID; each reset snapshot starts a new segment after its id."""
    segments: list[Segment] = [(start, [])]
    last = start
    resets = 0
    deadline = time.monotonic() + READ_S
    while not done(last) and time.monotonic() < deadline:
        budget = rng.randint(1, 25)
        headers = {**SSE, "Last-Event-ID": str(last)}
        segments.append((last, []))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(deadline - time.monotonic(), CONNECTION_S)), \
                    aconnect_sse(client, "GET", "/api/events", params=params,
                                 headers=headers) as src:
                assert src.response.status_code == 200, await src.response.aread()
                async for ev in src.aiter_sse():
                    assert ev.id, f"an event without an id: {ev}"
                    last = int(ev.id)
                    if ev.event == "snapshot":
                        assert json.loads(ev.data)["reset"] is True, "a resume started over"
                        resets += 1
                        segments.append((last, []))
                        continue
                    segments[-1][1].append((last, ev.data))
                    budget -= 1
                    if budget == 0 or done(last):
                        break
        await asyncio.sleep(rng.choice([0.05, 0.2, 0.5, RETENTION_S * 1.5]))
    return segments, resets


async def test_pruning_under_load_loses_nothing_newer_than_the_horizon(
        settings: Settings) -> None:
    """With pruning in small transactions under steady posts, readers that resume from
    the store (a 16-event tail), filtered or not, get after each cursor exactly the
    stored events, in order, or a reset snapshot: never a gap."""
    settings = settings.model_copy(update={**PRUNE, "retention_batch": 20, "tail_size": 16,
                                           "replay_batch": 7})
    svc = await start_service(settings)
    rng = random.Random(7)
    copy = Copy(settings.db)
    stop = asyncio.Event()
    copier = asyncio.create_task(copy.poll(stop))
    try:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=svc.url, timeout=30, limits=limits) as client:
            ids = [(await create_job(client, title=f"j{i}"))["id"] for i in range(3)]
            start = svc.ctx.hub.head
            final: dict[str, int] = {}

            def after(*job_ids: str) -> Callable[[int], bool]:
                return lambda last: len(final) == len(ids) \
                    and last >= max(final[j] for j in job_ids)

            kinds = {"all": ({}, after(*ids)), "job filter": ({"job": ids[0]}, after(ids[0])),
                     "two jobs": ({"job": ids[1:]}, after(*ids[1:]))}
            readers = {(name, n): asyncio.create_task(resuming_reader(
                client, params, start, done, random.Random(rng.random())))
                for name, (params, done) in kinds.items() for n in range(READERS)}
            until = time.monotonic() + WORK_S

            async def poster(k: int) -> None:
                n = 0
                while time.monotonic() < until:
                    job_id = ids[(n + k) % len(ids)]
                    if n % 5 == 4:
                        await post(client, job_id, "log", message=f"{k}.{n}")
                    else:
                        await post(client, job_id, progress=min(99.0, n / 10))
                    n += 1

            await asyncio.gather(*(poster(k) for k in range(POSTERS)))
            for job_id in ids:
                final[job_id] = (await post(client, job_id, "finish",
                                            status="succeeded"))["event_id"]
            results = {name: await task for name, task in readers.items()}
            stop.set()
            await copier
            horizon = (await retention(client))["horizon"]
    finally:
        copier.cancel()
        await svc.stop()

    assert list(copy.events) == list(range(min(copy.events), copy.last + 1)), \
        "the copy of the log has a gap: it fell behind retention"
    assert min(copy.events) <= start + 1 and copy.last >= max(final.values())
    assert horizon > start + 100, "retention did not prune during the run"
    flt = {"all": set(ids), "job filter": {ids[0]}, "two jobs": set(ids[1:])}
    total_resets = 0
    for (name, _), (segments, resets) in results.items():
        total_resets += resets
        for cursor, got in segments:
            expected = [(i, body) for i, (job_id, body) in copy.events.items()
                        if i > cursor and job_id in flt[name]][:len(got)]
            assert [i for i, _ in got] == [i for i, _ in expected], \
                f"{name}: after {cursor} got {[i for i, _ in got][:10]}..., " \
                f"stored {[i for i, _ in expected][:10]}..."
            assert [b for _, b in got] == [b for _, b in expected], f"{name}: other bodies"
        # the last event read, or the last reset snapshot's id
        last = max([c for c, _ in segments] + [got[-1][0] for _, got in segments if got])
        assert last >= max(final[j] for j in flt[name]), f"{name}: did not reach the end"
    assert total_resets > 0, "no reader was ever reset: the pauses did not outlast retention"


# ---------------------------------------------------------------- SQLite's space


@pytest.mark.sqlite_only("PostgreSQL leaves the space to autovacuum")
async def test_sqlite_gives_the_space_back(settings: Settings) -> None:
    """Once old events are pruned, the file gives its free pages back (incremental
    vacuum), keeping a few for the next inserts, and the file shrinks."""
    svc = await start_service(settings.model_copy(update=PRUNE))
    db = settings.db
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            job = await create_job(client)
            for _ in range(300):
                await post(client, job["id"], progress=1, data={"pad": "x" * 15_000})
            grown = file_size(db)
            assert grown > 3_000_000

            async def pruned() -> bool:
                return await event_ids(db) == []

            def given_back() -> bool:
                with contextlib.closing(sqlite3.connect(db)) as conn:
                    (free,) = conn.execute("PRAGMA freelist_count").fetchone()
                return bool(free <= KEEP_FREE_PAGES)

            await wait_for(pruned, timeout=RETENTION_S + 10, what="the events pruned")
            await wait_for(given_back, timeout=10, what="the free pages given back")
            with contextlib.closing(sqlite3.connect(db)) as conn:
                (vacuum,) = conn.execute("PRAGMA auto_vacuum").fetchone()
            assert vacuum == 2  # incremental
            assert file_size(db) < grown / 2
    finally:
        await svc.stop()


def file_size(path: str) -> int:
    return os.path.getsize(path)


def test_an_older_file_is_switched_to_incremental_vacuum(tmp_path: Path) -> None:
    """A file made before retention (no auto-vacuum, events pruned by count) is switched
    once by migration 0002, keeps its rows, and its horizon starts below its oldest
    event."""
    old = tmp_path / "only-0001"
    old.mkdir()
    shutil.copy(migrations.DEFAULT_DIR / "0001_initial.sql", old)
    db = str(tmp_path / "old.db")
    with contextlib.closing(sqlite3.connect(db)) as conn:  # as the older code made it
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                     " name TEXT NOT NULL, applied_at REAL NOT NULL)")
    assert migrations.migrate_sqlite(db, old) == [1]
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (0,)
        conn.executemany("INSERT INTO events VALUES (?, 'j', '', 'k', 'log', 1, NULL, '{}')",
                         [(i,) for i in range(1, 101)])
        conn.execute("DELETE FROM events WHERE id <= 40")  # the old retention_events
    assert migrations.migrate_sqlite(db) == [2, 3]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)
        assert conn.execute("SELECT COUNT(*), MIN(id) FROM events").fetchone() == (60, 41)
        assert conn.execute("SELECT horizon, expired FROM retention").fetchone() == (40, 40)

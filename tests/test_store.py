"""The SQLite store's writer, driven directly on a real database file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from progress_sse import jobs, worker_rules
from progress_sse.errors import Unavailable
from progress_sse.jobs import Job, Outcome
from progress_sse.migrations import migrate_sqlite
from progress_sse.store import Event, Filter, Write
from progress_sse.store.sqlite import MAX_BATCH, MAX_FLIGHTS, SQLiteStore
from progress_sse.store.writer import Writer, WriterError


def new_job(job_id: str) -> Write:
    spec = worker_rules.NewJob(id=job_id, owner="anonymous", kind="k", title="", queue="default",
                       stages=(), total=None, meta={}, heartbeat_timeout_s=60, token_hash="h")

    def apply(job: Job | None, now: float) -> Outcome:
        return worker_rules.create_job(spec, now)

    return Write(job_id, apply, create=True)


def log_line(job_id: str) -> Write:
    line = worker_rules.LogLine(level="info", message="a line", seq=None, attempt=None)
    return Write(job_id, lambda job, now: worker_rules.record_log(job, line, now))


def broken(job_id: str) -> Write:
    def apply(job: Job | None, now: float) -> Outcome:
        raise RuntimeError("a bug in a job rule")

    return Write(job_id, apply)


async def started(tmp_path: Path) -> tuple[str, SQLiteStore, list[Event]]:
    """A migrated database file, its running store, and the events it publishes."""
    db = str(tmp_path / "store.db")
    migrate_sqlite(db)
    store = SQLiteStore(db)
    published: list[Event] = []

    def publish(events: Sequence[Event]) -> None:
        published.extend(events)

    await store.start(publish)
    return db, store, published


async def test_a_write_that_breaks_the_writer_fails_alone(tmp_path: Path) -> None:
    """Writes batched with one that raises are still committed and published; only the
    broken one is refused (503), and the log holds exactly the others, in id order."""
    db, store, published = await started(tmp_path)
    try:
        writes = [new_job(f"j{i}") for i in range(5)]
        writes.insert(2, broken("j-broken"))
        results = await asyncio.gather(*(store.submit(w) for w in writes),
                                       return_exceptions=True)
        assert store.batches == 1  # submitted together: one batch, split after it failed
    finally:
        await store.close()
    assert isinstance(results[2], Unavailable)
    good = [r for i, r in enumerate(results) if i != 2]
    assert not [r for r in good if isinstance(r, BaseException)], good
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, job_id FROM events ORDER BY id").fetchall()
    assert [job_id for _, job_id in rows] == ["j0", "j1", "j2", "j3", "j4"]
    assert [e.id for e in published] == [i for i, _ in rows] == list(range(1, 6))


@pytest.mark.parametrize("size", [1, 3])
async def test_a_failed_write_stores_nothing(tmp_path: Path, size: int) -> None:
    """A broken write alone, or in a batch of broken writes, leaves no row behind."""
    db, store, _ = await started(tmp_path)
    try:
        results = await asyncio.gather(*(store.submit(broken(f"b{i}")) for i in range(size)),
                                       return_exceptions=True)
    finally:
        await store.close()
    assert all(isinstance(r, Unavailable) for r in results)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone() == (0,)


def unstorable(job_id: str) -> Write:
    """A create whose event the database refuses at commit (an integer it cannot bind)."""
    create = new_job(job_id).apply

    def apply(job: Job | None, now: float) -> Outcome:
        created, _ = create(job, now)
        return created, [jobs.Draft("created", seq=2**70)]

    return Write(job_id, apply, create=True)


async def test_a_commit_the_database_refuses_fails_only_its_write(tmp_path: Path) -> None:
    """When the transaction itself fails (rolled back), the batch's writes are committed one
    by one: the refused one fails, the rest are stored once, with contiguous ids."""
    db, store, published = await started(tmp_path)
    try:
        writes = [new_job("a0"), unstorable("bad"), new_job("a1"), new_job("a2")]
        results = await asyncio.gather(*(store.submit(w) for w in writes),
                                       return_exceptions=True)
        after = await store.submit(new_job("a3"))  # the writer goes on as before
    finally:
        await store.close()
    assert isinstance(results[1], Unavailable)
    assert not [r for i, r in enumerate(results) if i != 1 and isinstance(r, BaseException)]
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, job_id FROM events ORDER BY id").fetchall()
        stored_jobs = {r[0] for r in conn.execute("SELECT id FROM jobs")}
    assert rows == [(1, "a0"), (2, "a1"), (3, "a2"), (4, "a3")]
    assert [(e.id, e.job_id) for e in published] == rows
    assert stored_jobs == {"a0", "a1", "a2", "a3"} and after.events[0].id == 4


def refused(job_id: str) -> Write:
    """A create the database refuses at commit (a NOT NULL column left empty)."""
    create = new_job(job_id).apply

    def apply(job: Job | None, now: float) -> Outcome:
        created, drafts = create(job, now)
        return created.evolve(kind=None), drafts

    return Write(job_id, apply, create=True)


async def test_a_refused_commit_is_done_again_with_the_batch_sent_after_it(
        tmp_path: Path) -> None:
    """A batch is built and sent while the one before it is written. When the first
    fails, the second (built on the first's changes) is refused too; every write of both
    is done again one at a time: the refused one fails alone, the rest are stored once,
    in order, with contiguous ids, and the writer goes on."""
    db, store, published = await started(tmp_path)
    try:
        first = [new_job(f"a{i:03}") for i in range(200)]
        first.insert(100, refused("bad"))
        sent = [asyncio.create_task(store.submit(w)) for w in first]
        async with asyncio.timeout(5):
            while store.batches < 1:  # taken: the writer sends it without a pause
                await asyncio.sleep(0)
        # queued now, these are sent as the next batch before the first one's answer is read
        sent += [asyncio.create_task(store.submit(new_job(f"b{i}"))) for i in range(3)]
        results = await asyncio.gather(*sent, return_exceptions=True)
        assert store.batches == 2  # the second was built while the first was written
        assert store.redone == 204  # both, after the first failed
        after = await store.submit(new_job("c"))
    finally:
        await store.close()
    assert isinstance(results[100], Unavailable)
    assert not [r for i, r in enumerate(results) if i != 100 and isinstance(r, BaseException)]
    expected = [f"a{i:03}" for i in range(200)] + ["b0", "b1", "b2", "c"]
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, job_id FROM events ORDER BY id").fetchall()
        stored_jobs = sorted(r[0] for r in conn.execute("SELECT id FROM jobs"))
    assert [job_id for _, job_id in rows] == expected
    assert [i for i, _ in rows] == list(range(1, len(expected) + 1))
    assert [(e.id, e.job_id) for e in published] == rows
    assert stored_jobs == sorted(expected) and after.events[0].id == len(expected)


async def test_the_writer_answers_in_step_and_ends_when_closed(tmp_path: Path) -> None:
    """A statement the database refuses is an error naming it, and the next request gets
    its own answer; closing ends the writer's thread."""
    db = str(tmp_path / "w.db")
    migrate_sqlite(db)
    conn = Writer(db, "NORMAL")
    await conn.open()
    thread = conn._thread
    assert thread is not None and thread.is_alive()
    with pytest.raises(WriterError, match="no such table: nope"):
        await conn.fetchall("SELECT * FROM nope")
    await conn.commit([(1, "j", "o", "k", "created", 1, None, "{}")], [], [])
    assert await conn.fetchall("SELECT id, body FROM events") == [(1, "{}")]
    with pytest.raises(WriterError, match="UNIQUE constraint failed"):  # all or nothing
        await conn.commit([(2, "j", "o", "k", "log", 1, None, "{}"),
                           (1, "j", "o", "k", "log", 1, None, "{}")], [], [])
    with pytest.raises(WriterError, match="an earlier commit failed"):  # until resumed
        await conn.commit([(2, "j", "o", "k", "log", 1, None, "{}")], [], [])
    assert await conn.fetchall("SELECT COUNT(*) FROM events") == [(1,)]
    await conn.resume()
    await conn.commit([(2, "j", "o", "k", "log", 1, None, "{}")], [], [])
    await conn.close()
    async with asyncio.timeout(5):
        while thread.is_alive():
            await asyncio.sleep(0.01)
    with pytest.raises(WriterError, match="closed"):
        await conn.execute("SELECT 1")
    with sqlite3.connect(db) as other:
        assert other.execute("SELECT id FROM events").fetchall() == [(1,), (2,)]


def _stored_ids(db: str) -> list[tuple[int, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, job_id FROM events ORDER BY id").fetchall()


async def test_a_writer_far_behind_holds_the_store_back(tmp_path: Path) -> None:
    """While the writer takes nothing (another process holds the database locked), the
    store sends it no more than MAX_FLIGHTS batches and then waits, instead of taking
    every write; when the lock goes, every write is stored, in order."""
    db, store, published = await started(tmp_path)
    try:
        await store.submit(new_job("a"))
        await store.submit(log_line("a"))  # the batches below ask the writer nothing
        big = worker_rules.LogLine(level="info", message="x" * 7000)
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            sent = [asyncio.create_task(store.submit(
                Write("a", lambda job, now: worker_rules.record_log(job, big, now))))
                for _ in range(4000)]  # about 60 MB of writes
            async with asyncio.timeout(10):
                while store.batches < 2 + MAX_FLIGHTS:
                    await asyncio.sleep(0.01)
            taken = store.writes
            await asyncio.sleep(0.2)  # the store waits: nothing more is taken or sent
            assert store.batches == 2 + MAX_FLIGHTS
            assert store.writes == taken <= 2 + MAX_FLIGHTS * MAX_BATCH < 4000
        finally:
            other.execute("ROLLBACK")
            other.close()
        results = await asyncio.gather(*sent)
    finally:
        await store.close()
    ids = [r.events[0].id for r in results]
    assert ids == list(range(3, 4003))
    assert [i for i, _ in _stored_ids(db)] == list(range(1, 4003))
    assert [e.id for e in published] == list(range(1, 4003))


async def test_reads_see_every_event_published_before_them(tmp_path: Path) -> None:
    """A read asked for after an event was published returns it, while other reads (a
    burst of snapshots) and commits run on the same store: no read starts inside another
    read's older snapshot (one in sixteen did when reads shared a connection)."""
    _, store, published = await started(tmp_path)
    for i in range(100):
        await store.submit(new_job(f"j{i}"))
    stop = asyncio.Event()

    async def snapshots() -> None:
        while not stop.is_set():
            await store.snapshot(Filter(), 500)

    async def writes() -> None:
        while not stop.is_set():
            await store.submit(log_line("j1"))

    busy = [asyncio.create_task(snapshots()) for _ in range(4)] + \
        [asyncio.create_task(writes()) for _ in range(4)]
    short = []
    try:
        for _ in range(1500):
            head = published[-1].id
            page = await store.events_after(head - 5, head, Filter(), 100)
            if [e.id for e in page.events] != list(range(head - 4, head + 1)) \
                    or page.upto != head:
                short.append(head)
    finally:
        stop.set()
        await asyncio.gather(*busy)
        await store.close()
    assert not short, f"{len(short)} of 1500 reads missed published events"


async def test_a_page_is_complete_only_as_far_as_it_read(tmp_path: Path) -> None:
    """A page cut short by its limit or its byte budget lets a cursor move only to its
    last event; a filtered page that matched nothing moves it to the head it read."""
    _, store, published = await started(tmp_path)
    await store.submit(new_job("a"))
    await store.submit(new_job("b"))
    for _ in range(20):
        await store.submit(log_line("a"))
    await store.submit(log_line("b"))
    head = published[-1].id
    try:
        page = await store.events_after(0, head, Filter(), 5)
        assert [e.id for e in page.events] == [1, 2, 3, 4, 5] and page.upto == 5
        size = len(page.events[0].body)
        page = await store.events_after(0, head, Filter(), 100, max_bytes=size + 1)
        assert len(page.events) == 2 and page.upto == page.events[-1].id
        only_b = Filter(job_ids=frozenset({"b"}))
        of_b = [e.id for e in published if e.job_id == "b"]
        assert of_b[-1] == head and of_b[-2] < head - 10
        page = await store.events_after(of_b[-2], head, only_b, 100)
        assert [e.id for e in page.events] == [head] and page.upto == head
        page = await store.events_after(of_b[-2], head - 1, only_b, 100)
        assert page.events == [] and page.upto == head - 1
        # asked for beyond what is stored: complete only up to the stored head
        page = await store.events_after(head, head + 50, Filter(), 100)
        assert page.events == [] and page.upto == head
    finally:
        await store.close()


def test_events_stored_with_raw_line_separators_are_sent_escaped() -> None:
    """A body stored before separators were escaped is framed with them escaped: the
    same JSON document, on one line for every reader."""
    body = '{"id":7,"type":"log","message":"a\u2028b\u2029c\x85d"}'
    ev = Event.stored(7, "j", "o", "k", "log", body)
    assert json.loads(ev.body) == json.loads(body)
    data = ev.frame.decode().split("data: ", 1)[1].rstrip("\n")
    assert data.splitlines() == [data]
    assert json.loads(data) == json.loads(body)

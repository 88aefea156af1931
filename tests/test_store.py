"""The SQLite store's writer, driven directly on a real database file."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from progress_sse import jobs
from progress_sse.errors import Unavailable
from progress_sse.jobs import Job, Outcome
from progress_sse.migrations import migrate_sqlite
from progress_sse.store import Event, Write
from progress_sse.store.sqlite import SQLiteStore
from progress_sse.store.writer import WriterConnection, WriterError


def new_job(job_id: str) -> Write:
    spec = jobs.NewJob(id=job_id, owner="anonymous", kind="k", title="", queue="default",
                       stages=(), total=None, meta={}, heartbeat_timeout_s=60, token_hash="h")

    def apply(job: Job | None, now: float) -> Outcome:
        return jobs.create_job(spec, now)

    return Write(job_id, apply, create=True)


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


async def test_the_writer_process_answers_in_step_and_ends_when_closed(tmp_path: Path) -> None:
    """A statement the database refuses is an error naming it, and the next request gets
    its own answer; closing ends the writer's process."""
    db = str(tmp_path / "w.db")
    migrate_sqlite(db)
    conn = WriterConnection(db, "NORMAL")
    await conn.open()
    proc = conn._proc
    assert proc is not None and proc.returncode is None
    with pytest.raises(WriterError, match="no such table: nope"):
        await conn.fetchall("SELECT * FROM nope")
    await conn.commit([(1, "j", "o", "k", "created", 1, None, "{}")], [], [])
    assert await conn.fetchall("SELECT id, body FROM events") == [[1, "{}"]]
    with pytest.raises(WriterError, match="UNIQUE constraint failed"):  # all or nothing
        await conn.commit([(2, "j", "o", "k", "log", 1, None, "{}"),
                           (1, "j", "o", "k", "log", 1, None, "{}")], [], [])
    assert await conn.fetchall("SELECT COUNT(*) FROM events") == [[1]]
    await conn.close()
    assert proc.returncode is not None
    with pytest.raises(WriterError, match="not running"):
        await conn.execute("SELECT 1")

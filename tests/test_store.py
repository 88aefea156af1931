"""The SQLite store's writer, driven directly on a real database file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from progress_sse import jobs
from progress_sse.errors import Unavailable
from progress_sse.jobs import Job, Outcome
from progress_sse.migrations import migrate_sqlite
from progress_sse.store import Event, Filter, Write
from progress_sse.store.sqlite import MAX_BATCH, SQLiteStore
from progress_sse.store.writer import SEND_BUFFER, WriterConnection, WriterError


def new_job(job_id: str) -> Write:
    spec = jobs.NewJob(id=job_id, owner="anonymous", kind="k", title="", queue="default",
                       stages=(), total=None, meta={}, heartbeat_timeout_s=60, token_hash="h")

    def apply(job: Job | None, now: float) -> Outcome:
        return jobs.create_job(spec, now)

    return Write(job_id, apply, create=True)


def log_line(job_id: str) -> Write:
    line = jobs.LogLine(level="info", message="a line", seq=None, attempt=None)
    return Write(job_id, lambda job, now: jobs.record_log(job, line, now))


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


def _stored_ids(db: str) -> list[tuple[int, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, job_id FROM events ORDER BY id").fetchall()


async def test_a_writer_process_that_dies_is_replaced_and_its_last_commit_kept(
        tmp_path: Path) -> None:
    """The writer process dies after it committed one batch, before its answer was read,
    with a second batch sent and not yet taken. A new process takes over: the stored
    batch is answered as stored (not written twice), the other is done again once, and
    ids stay contiguous and in commit order. A write waiting on a question to a process
    that dies is done by the next one."""
    db, store, published = await started(tmp_path)
    names = [f"a{i}" for i in range(5)]
    try:
        # the writer knows these jobs and their kind: the batches below ask it nothing
        await asyncio.gather(*(store.submit(new_job(n)) for n in names))
        await store.submit(log_line("a0"))
        old = store._writer
        assert old is not None and old._writer is not None and old._proc is not None
        transport = old._writer.transport
        send_commit = old.commit

        def commit_then_pause(*rows: Any) -> Any:
            answer = send_commit(*rows)
            transport.pause_reading()  # from this commit on, answers stay unread
            return answer

        old.commit = commit_then_pause  # type: ignore[method-assign]
        stored = len(_stored_ids(db))
        first = [asyncio.create_task(store.submit(log_line(n))) for n in names]
        async with asyncio.timeout(10):
            while len(_stored_ids(db)) < stored + 5:  # committed by the writer process
                await asyncio.sleep(0.01)
        os.kill(old._proc.pid, signal.SIGSTOP)  # it takes nothing more
        before = _stored_ids(db)  # the first batch's rows last
        second = [asyncio.create_task(store.submit(log_line(n))) for n in names[:3]]
        async with asyncio.timeout(10):
            while len(old._answers) < 2:  # the second commit sent, behind the first
                await asyncio.sleep(0.01)
        os.kill(old._proc.pid, signal.SIGKILL)
        await old._proc.wait()
        lost = os.read(transport.get_extra_info("socket").fileno(), 1 << 16)
        assert lost, "the first batch was answered before its process died"
        transport.resume_reading()  # now the store sees the process gone
        results = await asyncio.gather(*first, *second)
        assert store.restarts == 1 and store.redone == 3
        assert store._writer is not old and store._writer is not None
        assert store._writer.gone is None

        again = store._writer._proc
        assert again is not None
        os.kill(again.pid, signal.SIGSTOP)
        late = asyncio.create_task(store.submit(new_job("c")))  # asks for the job first
        async with asyncio.timeout(10):
            while not store._writer._answers:
                await asyncio.sleep(0.01)
        os.kill(again.pid, signal.SIGKILL)
        after = await late
        assert store.restarts == 2
    finally:
        await store.close()
    rows = _stored_ids(db)
    head = before[-1][0]
    assert rows == [*before, *((head + i, n) for i, n in enumerate([*names[:3], "c"], 1))]
    assert [job_id for _, job_id in before[-5:]] == names
    assert [r.events[0].id for r in [*results, after]] == list(range(head - 4, head + 5))
    assert [(e.id, e.job_id) for e in published] == rows


async def test_while_no_writer_process_starts_writes_fail_with_503_until_one_does(
        tmp_path: Path) -> None:
    """The writer process dies and a new one cannot open the database: writes and the
    health check fail at once with 503 (none hangs); the store tries again by itself
    after a pause and goes on from the stored head."""
    db, store, _ = await started(tmp_path)
    try:
        await store.submit(new_job("a"))
        real = store._new_writer
        nowhere = str(tmp_path / "missing" / "x.db")  # a folder that does not exist
        store._new_writer = lambda: WriterConnection(  # type: ignore[method-assign]
            nowhere, "NORMAL", on_gone=store._wake_up)
        assert store._writer is not None and store._writer._proc is not None
        os.kill(store._writer._proc.pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            while store._restart_after == 0:  # tried once, and failed
                await asyncio.sleep(0.01)
        with pytest.raises(Unavailable):
            await store.submit(log_line("a"))
        with pytest.raises(Unavailable, match="writer"):
            await store.check()
        store._new_writer = real  # type: ignore[method-assign]
        async with asyncio.timeout(10):  # no write needed: it tries again on its own
            while store.restarts < 1:
                await asyncio.sleep(0.01)
        await store.check()
        after = await store.submit(log_line("a"))
    finally:
        await store.close()
    assert after.events[0].id == 2
    assert _stored_ids(db) == [(1, "a"), (2, "a")]


async def test_a_writer_process_far_behind_holds_the_store_back(tmp_path: Path) -> None:
    """While the writer process takes nothing (stopped), the store sends no more than its
    send buffer and then waits, instead of buffering every write; when the process goes
    on, every write is stored, in order."""
    db, store, published = await started(tmp_path)
    try:
        await store.submit(new_job("a"))
        await store.submit(log_line("a"))  # the batches below ask the process nothing
        writer = store._writer
        assert writer is not None and writer._writer is not None and writer._proc is not None
        transport = writer._writer.transport
        big = jobs.LogLine(level="info", message="x" * 7000)
        os.kill(writer._proc.pid, signal.SIGSTOP)
        try:
            sent = [asyncio.create_task(store.submit(
                Write("a", lambda job, now: jobs.record_log(job, big, now))))
                for _ in range(4000)]  # about 60 MB of requests
            async with asyncio.timeout(10):
                while transport.get_write_buffer_size() < SEND_BUFFER:
                    await asyncio.sleep(0.01)
            taken = store.writes
            await asyncio.sleep(0.2)  # the store waits: nothing more is taken or sent
            assert store.writes == taken < 4000
            # past the limit by at most the batch that crossed it (each write about 9 kB)
            assert transport.get_write_buffer_size() < SEND_BUFFER + MAX_BATCH * 10_000
        finally:
            os.kill(writer._proc.pid, signal.SIGCONT)
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

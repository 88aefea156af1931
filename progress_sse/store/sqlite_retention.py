"""The SQLite store's pruning transactions (the policy and the horizon: retention.py).

Each runs whole on the writer's thread (Writer.call), between two of its commits: it
never waits for the write lock and no commit waits for it, beyond its own few
milliseconds (`retention_batch` rows). Deleting a range of ids is a range of the
events table's b-tree, so a transaction's cost is its rows, however many are left.

Space: a file made with incremental auto-vacuum (migrations.py) gives its free pages
back RECLAIM_PAGES at a time, keeping KEEP_FREE_PAGES for the next inserts to reuse.
The WAL is kept to JOURNAL_SIZE_LIMIT when it is reset (writer.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .readers import Readers
from .retention import COMPACT_JOBS, Done, Policy, Retained
from .writer import Writer

RECLAIM_PAGES = 256  # pages given back per transaction (1 MiB of 4 KiB pages)
KEEP_FREE_PAGES = 256  # free pages left for inserts to reuse (1 MiB)
INCREMENTAL = 2  # PRAGMA auto_vacuum's value for incremental vacuum

HEAD = ("SELECT MAX(COALESCE((SELECT MAX(id) FROM events), 0),"
        " (SELECT horizon FROM retention))")


class SQLiteSteps:
    """retention.Steps on a SQLite file: writes on the writer, reads on a reader."""

    def __init__(self, writer: Writer, readers: Readers, clock: Callable[[], float]) -> None:
        self.writer = writer
        self.readers = readers
        self.clock = clock

    async def mark(self, stamp: bool) -> bool:
        if not stamp:
            return True
        clock = self.clock

        def mark(conn: sqlite3.Connection) -> None:
            (head,) = conn.execute(HEAD).fetchone()
            # the writer's own thread: nothing commits between reading the head and now
            conn.execute("INSERT OR IGNORE INTO retention_marks VALUES (?, ?)", (head, clock()))

        await self.writer.call(mark)
        return True

    async def expire(self, policy: Policy) -> Done:
        now = self.clock()
        result: Done = await self.writer.call(lambda conn: _expire(conn, policy, now))
        return result

    async def compact(self, policy: Policy) -> Done:
        now = self.clock()
        result: Done = await self.writer.call(lambda conn: _compact(conn, policy, now))
        return result

    async def drop_jobs(self, policy: Policy) -> Done:
        result: Done = await self.writer.call(lambda conn: _drop_jobs(conn, policy))
        return result

    async def reclaim(self, policy: Policy) -> Done:
        result: Done = await self.writer.call(_reclaim)
        return result

    async def retained(self) -> Retained:
        return await self.readers.read(read_retained)


def read_retained(conn: sqlite3.Connection) -> Retained:
    horizon, oldest = conn.execute(
        "SELECT horizon, (SELECT MIN(id) FROM events) FROM retention").fetchone()
    return Retained(horizon, oldest)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _expire(conn: sqlite3.Connection, policy: Policy, now: float) -> Done:
    """Delete the oldest events up to the age and count limits, a batch at most."""
    with _transaction(conn):
        (expired,) = conn.execute("SELECT expired FROM retention").fetchone()
        cutoff = 0
        if policy.max_age_s:
            row = conn.execute("SELECT MAX(head) FROM retention_marks WHERE at <= ?",
                               (now - policy.max_age_s,)).fetchone()
            cutoff = row[0] or 0
        if policy.max_events:
            cutoff = max(cutoff, conn.execute(HEAD).fetchone()[0] - policy.max_events)
        if cutoff <= expired:
            return 0, False
        row = conn.execute("SELECT id FROM events WHERE id > ? AND id <= ? ORDER BY id"
                           " LIMIT 1 OFFSET ?", (expired, cutoff, policy.batch - 1)).fetchone()
        upto = row[0] if row else cutoff
        deleted = conn.execute("DELETE FROM events WHERE id > ? AND id <= ?",
                               (expired, upto)).rowcount
        conn.execute("UPDATE retention SET horizon = MAX(horizon, ?), expired = ?",
                     (upto, upto))
        # the newest mark at or before it stays: jobs finished before its time may go
        conn.execute("DELETE FROM retention_marks WHERE head <"
                     " (SELECT MAX(head) FROM retention_marks WHERE head <= ?)", (upto,))
        return deleted, upto < cutoff


def _compact(conn: sqlite3.Connection, policy: Policy, now: float) -> Done:
    """Delete the progress events of jobs finished `compact_after` ago, a batch at most,
    COMPACT_JOBS jobs at a time (in the order they finished)."""
    with _transaction(conn):
        (through,) = conn.execute("SELECT compacted FROM retention").fetchone()
        until = now - policy.compact_after_s
        if until <= through:
            return 0, False
        row = conn.execute(
            "SELECT finished_at FROM jobs WHERE finished_at > ? AND finished_at <= ?"
            " ORDER BY finished_at LIMIT 1 OFFSET ?", (through, until, COMPACT_JOBS - 1)
        ).fetchone()
        upto = row[0] if row else until
        ids = [r[0] for r in conn.execute(
            "SELECT e.id FROM jobs j JOIN events e ON e.job_id = j.id"
            " WHERE j.finished_at > ? AND j.finished_at <= ? AND e.type = 'progress'"
            " LIMIT ?", (through, upto, policy.batch))]
        if ids:
            conn.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in ids])
            conn.execute("UPDATE retention SET horizon = MAX(horizon, ?)", (max(ids),))
        full = len(ids) == policy.batch
        if not full:
            conn.execute("UPDATE retention SET compacted = ?", (upto,))
        return len(ids), full or upto < until


def _drop_jobs(conn: sqlite3.Connection, policy: Policy) -> Done:
    """Delete jobs that finished before the expired events' time and kept no event."""
    with _transaction(conn):
        (before,) = conn.execute(
            "SELECT MAX(m.at) FROM retention_marks m, retention r WHERE m.head <= r.expired"
        ).fetchone()
        if before is None:
            return 0, False
        deleted = conn.execute(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs j WHERE finished_at <= ?"
            " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id) LIMIT ?)",
            (before, policy.batch)).rowcount
        return deleted, deleted == policy.batch


def _reclaim(conn: sqlite3.Connection) -> Done:
    """Give back up to RECLAIM_PAGES free pages to the file system."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
        return 0, False
    (free,) = conn.execute("PRAGMA freelist_count").fetchone()
    step = min(free - KEEP_FREE_PAGES, RECLAIM_PAGES)
    if step <= 0:
        return 0, False
    # run to its end: each step of the statement frees one page, and execute() takes one
    conn.executescript(f"PRAGMA incremental_vacuum({step});")
    if free - step > KEEP_FREE_PAGES:
        return step, True
    # the file is cut at a checkpoint: one now (waiting for no reader), not at the next
    # automatic one, which a quiet service may not reach for a long time
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    return step, False

"""Read connections to the SQLite file, lent out one read at a time.

Every read that a stream's cursor or a snapshot relies on must see one consistent
snapshot of the database, taken after everything the hub has published. SQLite
gives a connection one read snapshot for as long as any statement on it is active,
so two reads that share a connection share a snapshot: with aiosqlite, whose
`execute` and `fetch` are separate calls that other tasks' statements interleave
with, a read could start inside another cursor's older snapshot and miss events
committed since (measured: 6% of reads during a burst of snapshot reads). So here
each read is one function, run whole in its connection's own thread inside
`BEGIN ... COMMIT`, on a connection that no other read holds meanwhile:

* its statements see one snapshot, begun by its first statement, after every
  commit that had been published when the read was asked for;
* nothing else runs on the connection between its statements;
* a read waiting for a connection that is abandoned (its client left) is never
  run: the waiter is cancelled before it takes one.

One thread hop per read, where aiosqlite took one per statement and per fetch.
The store's read queries are here too (SQLiteReads), next to what they rely on.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..jobs import Job
from . import Event, Filter, Page, Snapshot
from .rows import job_from_doc

T = TypeVar("T")
EVENT_COLS = "id, job_id, owner, kind, type, body"
Read = Callable[[sqlite3.Connection], T]


class _Reader:
    __slots__ = ("conn", "thread")

    def __init__(self, conn: sqlite3.Connection, thread: ThreadPoolExecutor) -> None:
        self.conn = conn
        self.thread = thread


class Readers:
    """A fixed set of read-only connections, each with a thread of its own."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self._all: list[_Reader] = []
        self._idle: asyncio.Queue[_Reader] = asyncio.Queue()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for i in range(self.size):
            thread = ThreadPoolExecutor(1, thread_name_prefix=f"progress-sse-reader-{i}")
            conn = await loop.run_in_executor(thread, _connect, self.path)
            reader = _Reader(conn, thread)
            self._all.append(reader)
            self._idle.put_nowait(reader)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for reader in self._all:
            await loop.run_in_executor(reader.thread, reader.conn.close)
            reader.thread.shutdown(wait=True)
        self._all = []
        self._idle = asyncio.Queue()

    async def read(self, fn: Read[T]) -> T:
        """Run `fn` in one read transaction on a connection nobody else is using."""
        reader = await self._idle.get()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                reader.thread, _in_transaction, reader.conn, fn)
        finally:
            # if this read was cancelled while it runs, the next one on this connection
            # queues behind it in the connection's one thread: never interleaved
            self._idle.put_nowait(reader)


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA query_only=ON")
    return conn


def _in_transaction(conn: sqlite3.Connection, fn: Read[T]) -> T:
    conn.execute("BEGIN")
    try:
        return fn(conn)
    finally:
        conn.execute("COMMIT")  # a read transaction: ends the snapshot, writes nothing


class SQLiteReads:
    """The SQLite store's reads (SQLiteStore has them from here): each is one function
    run whole in one read transaction, on a connection no other read holds meanwhile
    (see Readers). Every commit is published to the hub
    only after it is durable, so a read asked for after the hub's head reached H sees
    every event up to H; and each read says how far it is complete (Page.upto), so a
    stream's cursor never moves past an event it did not read or its snapshot saw.
    """

    _readers: Readers

    async def read(self, fn: Read[T]) -> T:
        """Run `fn` in one read transaction (see Readers): for reads of other modules'
        tables (the notification outbox's)."""
        return await self._readers.read(fn)

    async def get_job(self, job_id: str) -> Job | None:
        def read(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute("SELECT doc FROM jobs WHERE id=?", (job_id,)).fetchone()
            return job_from_doc(row[0]) if row else None

        return await self._readers.read(read)

    async def list_jobs(self, flt: Filter, limit: int, before: int | None
                        ) -> tuple[list[Job], int, int | None]:
        """A page of jobs, newest first, with the head id and the cursor of the next page."""
        where, args = _where(flt)
        if before is not None:
            where.append("rowid < ?")
            args.append(before)
        sql = f"SELECT doc, rowid FROM jobs{_and(where)} ORDER BY rowid DESC LIMIT ?"

        def read(conn: sqlite3.Connection) -> tuple[list[Job], int, int | None]:
            head = read_head(conn)
            rows = conn.execute(sql, [*args, limit]).fetchall()
            jobs = [job_from_doc(r[0]) for r in rows]
            return jobs, head, (rows[-1][1] if len(rows) == limit else None)

        return await self._readers.read(read)

    async def snapshot(self, flt: Filter, limit: int) -> Snapshot:
        """Jobs, the head id and the oldest kept id from one read, so they agree."""
        where, args = _where(flt)
        sql = (f"SELECT doc FROM jobs{_and(where)}"
               " ORDER BY finished_at IS NOT NULL, updated_at DESC LIMIT ?")

        def read(conn: sqlite3.Connection) -> Snapshot:
            first, head = _bounds(conn)
            docs = conn.execute(sql, [*args, limit]).fetchall()
            return Snapshot([job_from_doc(d) for (d,) in docs], head, first)

        return await self._readers.read(read)

    async def events_after(self, after: int, upto: int, flt: Filter, limit: int,
                           max_bytes: int = 0) -> Page:
        """Events with after < id <= upto that `flt` matches, in id order: at most
        `limit`, and no more once `max_bytes` of bodies are read (0: no byte bound).
        A reset page when `after` is older than the horizon in this read's snapshot:
        events after it were pruned (perhaps while the reader read its last page)."""
        where, args = _where(flt, job_column="job_id")
        where += ["id > ?", "id <= ?"]
        args += [after, upto]
        sql = f"SELECT {EVENT_COLS} FROM events{_and(where)} ORDER BY id LIMIT ?"
        build = Event.stored

        def read(conn: sqlite3.Connection) -> Page:
            # the horizon and the events from one snapshot: a prune commits both or neither
            horizon, seen = conn.execute(_HORIZON_HEAD).fetchone()
            if after < horizon:
                return Page([], after, reset=True)
            # `seen`: what this snapshot holds: the read is complete up to it
            events: list[Event] = []
            size = 0
            for row in conn.execute(sql, [*args, limit]):
                events.append(build(*row))
                size += len(row[5])
                if max_bytes and size >= max_bytes:
                    return Page(events, row[0])  # cut short: complete up to this one
            if len(events) == limit:
                return Page(events, events[-1].id)
            return Page(events, max(after, min(upto, seen)))

        return await self._readers.read(read)

    async def bounds(self) -> tuple[int | None, int]:
        """The first id after the horizon (a resume from before it is reset) and the
        newest, from one read."""
        return await self._readers.read(_bounds)

    async def stale_jobs(self, now: float) -> list[str]:
        def read(conn: sqlite3.Connection) -> list[str]:
            return [r[0] for r in conn.execute(
                "SELECT id FROM jobs WHERE status='running' AND stalled=0"
                " AND last_post_at + heartbeat_timeout_s < ?", (now,))]

        return await self._readers.read(read)


def read_head(conn: sqlite3.Connection) -> int:
    """The newest event's id (0: none; the horizon, if every event was pruned), in the
    read's snapshot."""
    return int(conn.execute(_HORIZON_HEAD).fetchone()[1])


# the horizon, and the head (never below it: every event may have been pruned)
_HORIZON_HEAD = ("SELECT horizon, MAX(horizon, COALESCE((SELECT MAX(id) FROM events), 0))"
                 " FROM retention")


def _bounds(conn: sqlite3.Connection) -> tuple[int | None, int]:
    horizon, head = conn.execute(_HORIZON_HEAD).fetchone()
    return horizon + 1, head


def _where(flt: Filter, job_column: str = "id") -> tuple[list[str], list[Any]]:
    """SQL conditions for a filter (see Filter.constraints), with ? placeholders."""
    where: list[str] = []
    args: list[Any] = []
    for column, values in flt.constraints(job_column):
        where.append(f"{column} IN ({','.join('?' * len(values))})")
        args.extend(values)
    return where, args


def _and(where: list[str]) -> str:
    return (" WHERE " + " AND ".join(where)) if where else ""

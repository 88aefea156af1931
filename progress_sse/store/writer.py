"""The writer's own SQLite connection, on a thread of its own, one hop per call.

aiosqlite sends every statement across threads separately, so a group commit
(BEGIN, two executemany, COMMIT) cost four round trips between the event loop and
the database thread, each a future and a wake-up of the loop. Here the whole
transaction is one function run on the connection's thread: one round trip per
batch. Only the writer task uses this connection, one call at a time.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

INSERT_EVENTS = ("INSERT INTO events (id, job_id, owner, kind, type, attempt, seq, body)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
UPSERT_JOBS = (
    "INSERT INTO jobs (id, owner, kind, queue, status, created_at, updated_at,"
    " finished_at, last_post_at, heartbeat_timeout_s, stalled, token_hash, doc)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET status=excluded.status,"
    " updated_at=excluded.updated_at, finished_at=excluded.finished_at,"
    " last_post_at=excluded.last_post_at, stalled=excluded.stalled,"
    " token_hash=excluded.token_hash, doc=excluded.doc")
# a job whose status and finish time stay: no indexed column changes, so no index work
# (measured here: about a fifth of the database's time per progress post)
UPDATE_JOBS = ("UPDATE jobs SET updated_at=?, last_post_at=?, stalled=?, token_hash=?, doc=?"
               " WHERE id=?")


class WriterConnection:
    def __init__(self, path: str, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress-sse-db")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self.call(self._open)

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        self._conn = conn

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the connection's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return await self.call(self._fetchall, sql, args)

    def _fetchall(self, sql: str, args: Sequence[Any]) -> list[Any]:
        assert self._conn is not None
        return self._conn.execute(sql, args).fetchall()

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        await self.call(self._fetchall, sql, args)

    async def commit(self, events: Iterable[Sequence[Any]], upserts: Iterable[Sequence[Any]],
                     updates: Iterable[Sequence[Any]]) -> None:
        """Insert events and write job rows in one transaction; all or nothing."""
        await self.call(self._commit, events, upserts, updates)

    def _commit(self, events: Iterable[Sequence[Any]], upserts: Iterable[Sequence[Any]],
                updates: Iterable[Sequence[Any]]) -> None:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN")
            conn.executemany(INSERT_EVENTS, events)
            conn.executemany(UPSERT_JOBS, upserts)
            conn.executemany(UPDATE_JOBS, updates)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._conn is not None:
            await self.call(self._conn.close)
            self._conn = None
        self._pool.shutdown(wait=True)

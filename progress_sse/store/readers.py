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
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
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

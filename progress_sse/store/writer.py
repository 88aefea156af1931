"""The store's one writing connection to SQLite, on a thread of its own.

The store hands it requests (a commit, a statement, a query, a health probe) through a
queue; the thread runs them one at a time, in the order asked, and answers each on
the event loop. The store sends a batch's commit while the one before it is still
being written. After a commit fails the thread refuses every commit until told to
resume: those were built on the failed one (the store does them again, see
SQLiteStore._land). A probe takes the write lock and lets it go, to tell /healthz that
no other process holds the database locked (health.py).

A thread, not a process: the writer was a child process answering over a socket
pair, to share no GIL with the event loop, to be kept only if it beat a thread doing
the same group commit by more than 15% (issue 17). `make bench`'s posts figure, the
two in turns in the same runs (64 workers, 2 shared cores): over 14 runs the thread
did 0.64-2.31x the process's posts/s, median 0.97x (13 of 14 at 0.85x or more; 27
alternated rounds pooled: medians 3,327 and 3,377 posts/s), for 1-14% less server
CPU per post. README.md, Performance, has the figures.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .rows import INSERT_EVENTS, INSERT_NOTIFICATIONS, UPDATE_JOBS, UPSERT_JOBS, Rows

# the WAL is cut back to this when a checkpoint resets it (else it keeps its largest size)
JOURNAL_SIZE_LIMIT = 64 << 20
BUSY_TIMEOUT_MS = 5000  # how long a commit waits for another process's lock
CLOSE_WAIT_S = 5.0  # how long close waits for the thread to finish (a stalled disk)


class WriterError(Exception):
    """The writer refused a request (the database's own error, as text) or is closed."""


class Writer:
    def __init__(self, path: str, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self._requests: queue.SimpleQueue[tuple[list[Any], asyncio.Future[Any]]] = \
            queue.SimpleQueue()
        self._asked: deque[float] = deque()  # when each unanswered one was asked, in order
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, args=(self._loop,),
                                        name="progress-sse-writer", daemon=True)
        self._thread.start()
        try:
            await self._send(["open", self.path, self.synchronous])
        except BaseException:
            await self.close()
            raise

    def _send(self, request: list[Any]) -> asyncio.Future[Any]:
        """Ask now; the answer comes in the order asked."""
        if self._thread is None or self._loop is None:
            raise WriterError("the writer is closed")
        answer: asyncio.Future[Any] = self._loop.create_future()
        self._asked.append(self._loop.time())
        self._requests.put((request, answer))
        return answer

    def waited(self, now: float) -> float:
        """How long the oldest unanswered request has waited (0 with none): a writer on a
        stalled disk, or waiting for another process's lock, answers nothing while its
        requests age."""
        return now - self._asked[0] if self._asked else 0.0

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        rows: list[Any] = await self._send(["query", sql, args])
        return rows

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        await self._send(["query", sql, args])

    def commit(self, events: Rows, upserts: Rows, updates: Rows,
               notifications: Rows = ()) -> asyncio.Future[Any]:
        """Send a transaction (insert events, write job rows, insert the notifications
        the events ask for; all or nothing); the future is its answer. Sent at once: the
        caller need not wait for it to send the next."""
        return self._send(["commit", events, upserts, updates, notifications])

    def call(self, fn: Callable[[sqlite3.Connection], Any]) -> asyncio.Future[Any]:
        """Send `fn` to run on the connection between commits (retention's transactions:
        they neither wait for the write lock nor make a commit wait for it)."""
        return self._send(["call", fn])

    def probe(self, busy_ms: int) -> asyncio.Future[Any]:
        """Send a probe: take the write lock, waiting at most `busy_ms` for another
        process to let go of it, and let it go. It runs after what was asked before."""
        return self._send(["probe", busy_ms])

    async def resume(self) -> None:
        """Take commits again after a failed one (see the module docstring)."""
        await self._send(["resume"])

    async def close(self) -> None:
        """Close the connection after what was asked before; a thread stuck on a stalled
        disk is left behind (it dies with the process) after CLOSE_WAIT_S."""
        if self._thread is None:
            return
        answer = self._send(["close"])
        self._thread = None
        await asyncio.wait((answer,), timeout=CLOSE_WAIT_S)

    def _answer(self, answer: asyncio.Future[Any], error: str | None, value: Any) -> None:
        self._asked.popleft()
        if answer.done():
            return
        if error is None:
            answer.set_result(value)
        else:
            answer.set_exception(WriterError(error))

    # ------------------------------------------------------------ on the thread

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        conn: sqlite3.Connection | None = None
        refusing = False  # a commit failed: the store sent later ones built on it
        kind = None
        while kind != "close":
            request, answer = self._requests.get()
            kind = request[0]
            value: Any = None
            error: str | None = None
            try:
                if kind == "open":
                    conn = _open(*request[1:])
                elif kind == "close":
                    if conn is not None:
                        conn.close()
                elif conn is None:
                    raise WriterError("the connection is not open")
                elif kind == "commit":
                    if refusing:
                        raise WriterError("an earlier commit failed; this one was built on it")
                    try:
                        _commit(conn, *request[1:])
                    except BaseException:
                        refusing = True
                        raise
                elif kind == "resume":
                    refusing = False
                elif kind == "call":
                    value = request[1](conn)
                elif kind == "probe":
                    _probe(conn, request[1])
                else:
                    value = conn.execute(request[1], request[2]).fetchall()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            try:
                loop.call_soon_threadsafe(self._answer, answer, error, value)
            except RuntimeError:
                return  # the loop has closed


def _open(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    return conn


def _commit(conn: sqlite3.Connection, events: Rows, upserts: Rows, updates: Rows,
            notifications: Rows) -> None:
    try:
        conn.execute("BEGIN")
        conn.executemany(INSERT_EVENTS, events)
        conn.executemany(UPSERT_JOBS, upserts)
        conn.executemany(UPDATE_JOBS, updates)
        if notifications:
            conn.executemany(INSERT_NOTIFICATIONS, notifications)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _probe(conn: sqlite3.Connection, busy_ms: int) -> None:
    """Take the write lock and let it go, with a short wait: locked by another process,
    this fails with "database is locked" well before the health check's deadline."""
    conn.execute(f"PRAGMA busy_timeout={busy_ms}")
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    finally:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

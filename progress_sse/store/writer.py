"""The writer's own SQLite connection, in a process of its own.

Every group commit used to run on a thread of this process. The sqlite3 module lets
go of the GIL around each step, and the thread needs it back after every step and
to start each batch; under load the event loop holds it nearly all the time, so the
thread waited for it (a median commit of 3 ms wall for under 0.5 ms of work) and the
loop, waiting on the commit, sat idle a fifth of the time. Measured here with 64
workers posting: 7k posts/s with the thread; 9-10k with the thread hop kept but no
database work; 11k with no commit at all. A process shares no GIL: the loop sends
each request as one message over a socket pair and reads one answer.

The child runs this file alone (sqlite3, orjson): it opens the connection, runs
each request (a commit, a statement, a query) and answers, in the order asked; the
store sends a batch's commit while the one before it is still being written. After a
commit fails it refuses every commit until told to resume: those were built on the
failed one (the store does them again, see SQLiteStore._land). A probe takes the write
lock and lets it go, to tell /healthz that no other process holds the database locked
(SQLiteStore.health). It ends when asked, and
when the service's end of the socket closes, so it never outlives the service: it
also asks the kernel to kill it when its parent dies (Linux), before it could commit
anything a restarted service does not know of. If it dies first, the connection
says so (`gone`, `on_gone`) and the store starts another (SQLiteStore._recover).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import orjson

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

BUSY_TIMEOUT_MS = 5000  # how long a commit waits for another process's lock
_LENGTH = struct.Struct("!I")
# requests waiting to be sent before the store waits for the child to take them: a
# child far behind (stopped, a slow disk) cannot make the service buffer without end
SEND_BUFFER = 8 << 20
Rows = Sequence[Sequence[Any]]


class WriterError(Exception):
    """The writer refused a request (the database's own error, as text) or has gone."""


class WriterConnection:
    def __init__(self, path: str, synchronous: str,
                 on_gone: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.synchronous = synchronous
        self._on_gone = on_gone  # told once no more answers will come
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._answers: deque[asyncio.Future[Any]] = deque()  # asked, in order
        self._asked: deque[float] = deque()  # when each was asked (loop time), same order
        self._listener: asyncio.Task[None] | None = None
        self._gone: str | None = None  # why no more answers will come

    async def open(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            # this file as a script: it needs nothing of the package, and the child finds
            # it wherever the service found it
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, str(theirs.fileno()), str(os.getpid()),
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL)  # its stderr is the service's: a crash shows
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        self._writer.transport.set_write_buffer_limits(high=SEND_BUFFER)
        self._listener = asyncio.create_task(self._listen(self._reader),
                                             name="progress-sse-writer-answers")
        try:
            await self._call(["open", self.path, self.synchronous])
        except BaseException:
            await self.close()
            raise

    @property
    def gone(self) -> str | None:
        """Why the writer takes no more requests, or None while it does."""
        return "the writer is not running" if self._writer is None else self._gone

    def _send(self, request: list[Any]) -> asyncio.Future[Any]:
        """Ask now; the answer comes in the order asked (the child runs one at a time)."""
        if self._writer is None or self._gone is not None:
            raise WriterError(self.gone)
        payload = orjson.dumps(request)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self._writer.write(_LENGTH.pack(len(payload)) + payload)
        except (RuntimeError, OSError) as exc:  # the socket closed as the process died
            self._gone = self._gone or f"the writer process has gone ({exc})"
            raise WriterError(self._gone) from exc
        self._answers.append(answer)
        self._asked.append(answer.get_loop().time())
        return answer

    def waited(self, now: float) -> float:
        """How long the oldest unanswered request has waited (0 with none): a child that
        is stopped or on a stalled disk answers nothing while its requests age."""
        return now - self._asked[0] if self._asked else 0.0

    async def drain(self) -> None:
        """Wait while more than SEND_BUFFER of requests wait to be sent. A lost process
        is not an error here: the answers it owes say so."""
        if self._writer is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._writer.drain()

    async def _call(self, request: list[Any]) -> Any:
        return await self._send(request)

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                status, value = orjson.loads(await reader.readexactly(size))
                answer = self._answers.popleft()
                self._asked.popleft()
                if answer.done():
                    continue
                if status == "ok":
                    answer.set_result(value)
                else:
                    answer.set_exception(WriterError(value))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._gone = f"the writer process has gone ({exc})"
        finally:
            self._gone = self._gone or "the writer is closed"
            self._asked.clear()
            while self._answers:
                answer = self._answers.popleft()
                if not answer.done():
                    answer.set_exception(WriterError(self._gone))
            self._on_gone()

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        rows: list[Any] = await self._call(["query", sql, list(args)])
        return rows

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        await self._call(["query", sql, list(args)])

    def commit(self, events: Rows, upserts: Rows, updates: Rows) -> asyncio.Future[Any]:
        """Send a transaction (insert events, write job rows; all or nothing); the future
        is its answer. Sent at once: the caller need not wait for it to send the next."""
        return self._send(["commit", events, upserts, updates])

    def probe(self, busy_ms: int) -> asyncio.Future[Any]:
        """Send a probe: take the write lock, waiting at most `busy_ms` for another
        process to let go of it, and let it go. It runs after what was asked before."""
        return self._send(["probe", busy_ms])

    async def resume(self) -> None:
        """Take commits again after a failed one (see the module docstring)."""
        await self._call(["resume"])

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(WriterError, OSError):
                await self._call(["close"])
            self._writer.close()
            self._reader = self._writer = None
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._proc is not None:
            proc, self._proc = self._proc, None
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# ---------------------------------------------------------------- the child


def _serve(sock: socket.socket) -> None:
    conn: sqlite3.Connection | None = None
    refusing = False  # a commit failed: the service sent later ones built on it
    stream = sock.makefile("rb")
    while True:
        head = stream.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            break  # the service has gone
        request = orjson.loads(stream.read(_LENGTH.unpack(head)[0]))
        try:
            if request[0] == "open":
                conn = _open(*request[1:])
                answer: Any = None
            elif request[0] == "close":
                break
            elif conn is None:
                raise WriterError("the connection is not open")
            elif request[0] == "commit":
                if refusing:
                    raise WriterError("an earlier commit failed; this one was built on it")
                try:
                    _commit(conn, *request[1:])
                except BaseException:
                    refusing = True
                    raise
                answer = None
            elif request[0] == "resume":
                refusing = False
                answer = None
            elif request[0] == "probe":
                _probe(conn, int(request[1]))
                answer = None
            else:
                answer = conn.execute(request[1], request[2]).fetchall()
            reply = orjson.dumps(["ok", answer])
        except Exception as exc:
            reply = orjson.dumps(["error", f"{type(exc).__name__}: {exc}"])
        sock.sendall(_LENGTH.pack(len(reply)) + reply)
    if conn is not None:
        conn.close()
    reply = orjson.dumps(["ok", None])  # to "close", once closed
    with contextlib.suppress(OSError):
        sock.sendall(_LENGTH.pack(len(reply)) + reply)


def _open(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


def _commit(conn: sqlite3.Connection, events: Rows, upserts: Rows, updates: Rows) -> None:
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


def _probe(conn: sqlite3.Connection, busy_ms: int) -> None:
    """Take the write lock and let it go, with a short wait: locked by another process,
    this fails with "database is locked" well before the health check's deadline."""
    conn.execute(f"PRAGMA busy_timeout={busy_ms}")
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    finally:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


def _die_with_parent() -> None:
    """Linux: be killed the moment the service dies (kill -9 included)."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


if __name__ == "__main__":
    # a terminal's Ctrl-C or a group's SIGTERM is for the service, which closes us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != int(sys.argv[2]):
        sys.exit(1)  # the service died before we could ask to die with it
    _serve(socket.socket(fileno=int(sys.argv[1])))

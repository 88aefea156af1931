"""The writer's own SQLite connection, on a thread of its own.

The same requests as the writer process (writer.py), in the same order and with the
same answers, handed over in memory: a queue in, the event loop's call_soon_threadsafe
out. The thread owns its connection; it runs one request at a time.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .writer import Rows, WriterError, _commit, _open, _probe

CLOSE_WAIT_S = 5.0  # how long close waits for the thread to end (a stalled disk)


class WriterThread:
    def __init__(self, path: str, synchronous: str,
                 on_gone: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.synchronous = synchronous
        self._on_gone = on_gone  # unused: a thread does not die on its own
        self._requests: queue.SimpleQueue[tuple[list[Any], asyncio.Future[Any]]] = \
            queue.SimpleQueue()
        self._asked: deque[float] = deque()  # when each unanswered one was asked, in order
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name="progress-sse-writer",
                                        daemon=True)
        self._thread.start()
        try:
            await self._send(["open", self.path, self.synchronous])
        except BaseException:
            await self.close()
            raise

    @property
    def gone(self) -> str | None:
        return "the writer is not running" if self._thread is None else None

    def _send(self, request: list[Any]) -> asyncio.Future[Any]:
        if self._thread is None or self._loop is None:
            raise WriterError(self.gone)
        answer: asyncio.Future[Any] = self._loop.create_future()
        self._asked.append(self._loop.time())
        self._requests.put((request, answer))
        return answer

    def waited(self, now: float) -> float:
        return now - self._asked[0] if self._asked else 0.0

    async def drain(self) -> None:
        """Nothing to wait for: the requests are the rows already in memory."""

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        rows: list[Any] = await self._send(["query", sql, list(args)])
        return rows

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        await self._send(["query", sql, list(args)])

    def commit(self, events: Rows, upserts: Rows, updates: Rows) -> asyncio.Future[Any]:
        return self._send(["commit", events, upserts, updates])

    def probe(self, busy_ms: int) -> asyncio.Future[Any]:
        return self._send(["probe", busy_ms])

    async def resume(self) -> None:
        await self._send(["resume"])

    async def close(self) -> None:
        thread = self._thread
        if thread is None:
            return
        answer = self._send(["close"])
        self._thread = None
        await asyncio.wait((answer,), timeout=CLOSE_WAIT_S)
        thread.join(timeout=0.1)

    def _settle(self, answer: asyncio.Future[Any], error: str | None, value: Any) -> None:
        self._asked.popleft()
        if answer.done():
            return
        if error is None:
            answer.set_result(value)
        else:
            answer.set_exception(WriterError(error))

    def _serve(self) -> None:
        assert self._loop is not None
        loop = self._loop
        conn: sqlite3.Connection | None = None
        refusing = False  # a commit failed: the store sent later ones built on it
        while True:
            request, answer = self._requests.get()
            value: Any = None
            error: str | None = None
            try:
                kind = request[0]
                if kind == "open":
                    conn = _open(*request[1:])
                elif kind == "close":
                    if conn is not None:
                        conn.close()
                        conn = None
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
                elif kind == "probe":
                    _probe(conn, int(request[1]))
                else:
                    value = conn.execute(request[1], request[2]).fetchall()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            try:
                loop.call_soon_threadsafe(self._settle, answer, error, value)
            except RuntimeError:
                return  # the loop has closed
            if request[0] == "close":
                return

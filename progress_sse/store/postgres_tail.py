"""How an instance learns of commits: LISTEN for a wake-up, then read on from its head.

The tail reader is the only publisher to the hub. It reads `id > published` in id
order and publishes what it finds; ids are gapless and in commit order (see
postgres_writer.py), so a read that sees id X sees every id below it, and reading on
from the last published id misses nothing. It reads when woken, and every PERIOD_S
whatever happens: a notification is only a hint.

Wake-ups come from one dedicated LISTEN connection: each batch of any instance sends
one NOTIFY carrying its new head, and the callback only wakes the reader (or does
nothing, when that head is published already). The connection never opens a
transaction; it is pinged every PING_S, and when it is lost it is opened again,
LISTEN first, and then the reader reads: notifications sent meanwhile are lost, and
cost nothing. The instance's own commits are published at once, without a read, when
they follow on from what is published.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import structlog

from . import Event
from .readers import EVENT_COLS

log = structlog.get_logger("progress_sse.store.postgres")

CHANNEL = "progress_sse"
PERIOD_S = 0.5  # the tail reads this often with no wake-up
PING_S = 10.0  # the listener's connection is checked this often
RETRY_S = 0.5  # between tries to connect the listener again
PAGE = 2000


class Tail:
    def __init__(self, dsn: str, pool: asyncpg.Pool, head: int,
                 publish: Callable[[Sequence[Event]], None]) -> None:
        self.dsn = dsn
        self.pool = pool
        self.published = head  # the hub's head: this is its only publisher
        self._publish = publish
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.listener: asyncpg.Connection | None = None
        self.listening = asyncio.Event()  # set while LISTEN holds (tests wait on it)
        self.reconnects = 0  # listener connections made again after one was lost
        self.reads = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._read_loop(), name="progress-sse-pg-tail"),
                       asyncio.create_task(self._listen_loop(), name="progress-sse-pg-listen")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.listener is not None:
            self.listener.terminate()

    def wake(self) -> None:
        self._wake.set()

    def own(self, events: Sequence[Event]) -> None:
        """This instance's commit: published now if it follows on, else read in turn."""
        if events[-1].id <= self.published:
            return  # the reader got there first
        if events[0].id == self.published + 1:
            self._send(events)
        else:
            self.wake()

    def _send(self, events: Sequence[Event]) -> None:
        self.published = events[-1].id
        self._publish(events)

    # ------------------------------------------------------------ the reader

    async def _read_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PERIOD_S)
            self._wake.clear()
            try:
                while await self._read_once():
                    pass
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    TimeoutError) as exc:
                log.warning("store.tail_read_failed", error=str(exc))
            except Exception:  # keep reading; the next round retries
                log.exception("store.tail_failed")

    async def _read_once(self) -> bool:
        """Read on from the published head; True if there may be more."""
        after = self.published
        self.reads += 1
        rows = await self.pool.fetch(
            f"SELECT {EVENT_COLS} FROM events WHERE id > $1 ORDER BY id LIMIT {PAGE}",
            after, timeout=10)
        events = [Event.stored(*r) for r in rows]
        # the writer may have published some meanwhile
        fresh = [e for e in events if e.id > self.published]
        if fresh:
            self._send(fresh)
        return len(rows) == PAGE

    # ------------------------------------------------------------ the listener

    async def _listen_loop(self) -> None:
        while True:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=5)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("store.listener_connect_failed", error=str(exc))
                await asyncio.sleep(RETRY_S)
                continue
            lost = asyncio.Event()
            try:
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(CHANNEL, self._notified)
                self.listener = conn
                self.listening.set()
                self.wake()  # LISTEN first, then read: nothing sent meanwhile is missed
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), PING_S)
                    if not lost.is_set():
                        await conn.execute("SELECT 1", timeout=5)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("store.listener_lost", error=str(exc))
            finally:
                self.listening.clear()
                self.listener = None
                conn.terminate()
            self.reconnects += 1
            log.warning("store.listener_reconnecting")
            await asyncio.sleep(0.05)

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            if int(payload) <= self.published:
                return  # this instance's own commit, published already
        self._wake.set()


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    return lambda conn: event.set()

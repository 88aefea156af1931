"""PostgreSQL store: several instances share one database (`--db postgresql://...`).

The same job rules as SQLite (ledger.py), the same Store protocol. Per instance:

* one writer task with group commit (postgres_writer.py): ids in commit order, with
  no gaps, on every instance, through a single head row locked per batch;
* a tail reader, the hub's only publisher, woken by LISTEN/NOTIFY and reading every
  half second anyway (postgres_tail.py);
* reads on a small pool (postgres_reads.py); stall checks and retention under leases,
  by one instance at a time.

Connections per instance: one for the writer, one for LISTEN, and the read pool
(`readers`, 3 by default): five; a sixth for a moment to settle a lost commit.
The write deadline and health are here.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence

import asyncpg
import structlog

from ..errors import Unavailable
from ..ledger import Ledger
from ..notify.rules import Rule
from . import Event, Write, WriteResult
from .postgres_reads import PgReads
from .postgres_retention import PgSteps
from .postgres_schema import redacted
from .postgres_tail import Tail
from .postgres_writer import Pending, PgWriter
from .retention import KEEP_ALL, Policy, Pruner

log = structlog.get_logger("progress_sse.store.postgres")

WRITE_TIMEOUT_S = 5.0
PROBE_EVERY_S = 0.25  # health asks the database only when nothing was confirmed this recently
FAILED_HOLD_S = 30.0  # an unsettled commit keeps health at 503 this long, or until a commit


class PostgresStore(PgReads):
    def __init__(self, dsn: str, *, readers: int = 3, retention: Policy = KEEP_ALL,
                 estimate_every_s: float = 1.0, write_timeout_s: float = WRITE_TIMEOUT_S,
                 on_commit: Callable[[float, int], None] = lambda s, n: None,
                 notify: Rule | None = None) -> None:
        self.dsn = dsn
        self.readers = readers
        self.retention = Pruner(retention)  # pruning (retention.py, postgres_retention.py)
        self.write_timeout_s = write_timeout_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.pool: asyncpg.Pool | None = None
        self.tail: Tail | None = None
        self._writer = PgWriter(dsn, Ledger(estimate_every_s, notify),
                                write_timeout_s=write_timeout_s,
                                on_events=self._committed,
                                on_commit=self._landed)
        self._on_commit = on_commit
        self.timeouts = 0
        # the Store protocol's counters (for /metrics): the writer's, copied at each commit
        self.batches = self.writes = self.redone = self.restarts = 0

    def _landed(self, seconds: float, writes: int) -> None:
        w = self._writer
        self.batches, self.writes, self.redone, self.restarts = (
            w.batches, w.writes, w.redone, w.restarts)
        self._on_commit(seconds, writes)

    async def start(self, publish: Callable[[Sequence[Event]], None]) -> int:
        """Connect (writer, pool, listener); return the head id the hub starts from."""
        try:
            self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.readers,
                                                  timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise Unavailable(f"cannot connect to PostgreSQL at {redacted(self.dsn)}: {exc}"
                              ) from None
        await self._writer.start()
        _, head = await self.bounds()
        self.tail = Tail(self.dsn, self.pool, head, publish)
        self.tail.start()
        steps = PgSteps(self.pool, self.holder)
        self.retention.start(steps, await steps.retained())
        log.info("store.postgres_started", db=redacted(self.dsn), head=head,
                 holder=self.holder)
        return head

    async def close(self) -> None:
        """Finish the writes already queued, then close."""
        await self.retention.close()
        await self._writer.close()
        if self.tail is not None:
            await self.tail.close()
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    # ------------------------------------------------------------ writes

    async def submit(self, write: Write) -> WriteResult:
        """The write's outcome; Unavailable at once while the database cannot be reached,
        or once write_timeout_s has passed."""
        fut: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        pending = Pending(write, fut)
        self._writer.put(pending)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.write_timeout_s)
        except TimeoutError:
            pass
        self.timeouts += 1
        queued = pending in self._writer.queue
        if queued:
            self._writer.queue.remove(pending)
        exc = Unavailable(
            f"the store did not confirm the write within {self.write_timeout_s:g} s; " + (
                "it was not stored" if queued else
                "it may still be stored, once: send it again with the same seq to get its"
                " outcome"), headers={"Retry-After": "1"})
        if not fut.done():
            fut.set_exception(exc)
        fut.exception()  # retrieved: no "never retrieved" warning
        raise exc

    def _committed(self, events: Sequence[Event]) -> None:
        assert self.tail is not None
        self.tail.own(events)
        self.retention.nudge(events[-1].id)

    # ------------------------------------------------------------ health

    async def check(self) -> None:
        why = self.trouble()
        if why is not None:
            raise Unavailable(why)
        await self.bounds()

    def trouble(self) -> str | None:
        """Why writes cannot succeed now, from what is known without asking."""
        w = self._writer
        if w.down is not None:
            return f"the database cannot be reached: {w.down}"
        if w.conn is None:
            return "the writer is connecting to the database"
        now = asyncio.get_running_loop().time()
        if w.failed is not None and now - w.failed[0] < FAILED_HOLD_S \
                and w.confirmed_at < w.failed[0]:
            return f"the last commit failed and none has succeeded since: {w.failed[1]}"
        return None

    async def health(self) -> str | None:
        """None when a write can succeed now, or why not; asks the database with a
        statement when nothing was confirmed in the last PROBE_EVERY_S."""
        why = self.trouble()
        if why is not None:
            return why
        if asyncio.get_running_loop().time() - self._writer.confirmed_at < PROBE_EVERY_S:
            return None
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.bounds(), self.write_timeout_s)
        except TimeoutError:
            return f"the database did not answer within {self.write_timeout_s:g} s"
        except Unavailable as exc:
            return exc.message
        log.debug("store.probed", seconds=round(time.monotonic() - started, 4))
        return self.trouble()

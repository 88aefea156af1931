"""SQLite store: one writer task with group commit, separate read connections.

Every write goes through one queue. The writer takes whatever is waiting, has the
ledger (ledger.py, shared with other stores) apply the job rules to each request
against the jobs' committed state, inserts the events and updates the job rows it
produced in one transaction, commits, and only then answers the callers and hands the
events to the hub. A request the rules refuse stores nothing and does not disturb the
rest of its batch. The transactions run on the writer's thread (writer.py), in the
order sent; the next batches are built while one is written, on its changes, and
answered only after it (see _land for a commit that fails, after which the ledger's
state is read back from the database).

What this module owns: the queue of pending writes, group commit and the batches in
flight, landing and recovery after a failed commit, and loading the ledger's state
from the database. The rows a batch is stored as are in rows.py, the write deadline
and health() in health.py, the reads in readers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ..errors import ProgressError, Unavailable
from ..ledger import HISTORY, Ledger
from ..notify.rules import Rule
from . import Event, Write, WriteResult, settle
from .health import FAILED_HOLD_S, WRITE_TIMEOUT_S, Pending, WriteHealth
from .health import PROBE_EVERY_S as PROBE_EVERY_S  # re-exported: tests read it here
from .readers import EVENT_COLS, Readers, SQLiteReads, read_head
from .retention import KEEP_ALL, Policy, Pruner
from .rows import job_from_doc, job_rows, notification_rows
from .sqlite_retention import HEAD, SQLiteSteps
from .writer import Writer, WriterError

log = structlog.get_logger("progress_sse.store")

MAX_BATCH = 512
# batches sent to the writer before the oldest must be answered: the next are built
# while one is written (measured here with the writer in a process of its own, 64
# workers posting: two gave a fifth more posts per second than one, four another 5-8%
# over two). It also bounds what waits for a writer that is far behind.
MAX_FLIGHTS = 4


@dataclass(slots=True)
class _Flight:
    """A batch whose commit has been sent; its callers wait until it is stored."""

    batch: list[Pending]
    answers: list[WriteResult | ProgressError]  # the batch's, in order
    events: list[Event]
    commit: asyncio.Future[Any] | None  # None: the batch stores nothing
    sent: float  # loop time the commit was sent


class SQLiteStore(WriteHealth, SQLiteReads):
    def __init__(self, path: str, *, synchronous: str = "NORMAL", readers: int = 3,
                 retention: Policy = KEEP_ALL, estimate_every_s: float = 1.0,
                 clock: Callable[[], float] = time.time,
                 write_timeout_s: float = WRITE_TIMEOUT_S,
                 on_commit: Callable[[float, int], None] = lambda s, n: None,
                 notify: Rule | None = None) -> None:
        self.path = path
        self._on_commit = on_commit  # each commit confirmed: seconds, writes (metrics)
        self.synchronous = synchronous.upper()
        self.retention = Pruner(retention)  # pruning (retention.py, sqlite_retention.py)
        self._clock = clock
        self._writer: Writer | None = None
        self._readers = Readers(path, readers)
        # waiting writes; None asks the writer to stop. A deque and one wake-up future:
        # asyncio.Queue's bookkeeping (unfinished tasks, getters) cost every post
        self._queue: deque[Pending | None] = deque()
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._publish: Callable[[Sequence[Event]], None] = lambda events: None
        # the job rules and the writer's memory of what is committed (see ledger.py)
        self._ledger = Ledger(estimate_every_s, notify)
        self._closing = False
        self.batches = 0  # group commits so far, and the writes they carried (for /metrics)
        self.writes = 0
        self.redone = 0  # writes done again one at a time, after their batch failed
        # the write deadline (_expire) and health (health, trouble)
        self.write_timeout_s = write_timeout_s
        self.failed_hold_s = FAILED_HOLD_S
        self.timeouts = 0  # writes answered 503 at their deadline (for /metrics)
        self._waiting: deque[Pending] = deque()  # submitted, maybe unanswered, in order
        self._watch: asyncio.TimerHandle | None = None  # at the oldest one's deadline
        self._confirmed_at = -math.inf  # loop time of the last commit or probe confirmed
        self._failed: tuple[float, str] | None = None  # the last commit failed: when, why
        self._probe: asyncio.Future[Any] | None = None

    # ------------------------------------------------------------ start and close

    async def start(self, publish: Callable[[Sequence[Event]], None]) -> int:
        """Open connections, start the writer; return the head id."""
        self._publish = publish
        self._writer = Writer(self.path, self.synchronous)
        await self._writer.open()
        await self._readers.open()
        head = await self._load_state()
        self._task = asyncio.create_task(self._run(), name="progress-sse-writer")
        steps = SQLiteSteps(self._writer, self._readers, self._clock)
        self.retention.start(steps, await steps.retained())
        return head

    async def _load_state(self) -> int:
        """The writer's memory of the database, as committed: the next id, the active
        jobs, the queues; the estimators' history is read again as it is needed."""
        assert self._writer is not None
        # after the horizon: with every event pruned, ids go on from it
        [(head,)] = await self._writer.fetchall(HEAD)
        docs = await self._writer.fetchall(
            "SELECT doc FROM jobs WHERE status IN ('queued', 'running', 'paused', 'cancelling')"
            " ORDER BY rowid")
        self._ledger.reset(int(head or 0), (job_from_doc(doc) for (doc,) in docs))
        return int(head or 0)

    async def close(self) -> None:
        """Finish the writes already queued, then close."""
        self._closing = True
        await self.retention.close()
        if self._task is not None:
            self._put(None)
            await self._task
            self._task = None
        if self._writer is not None:
            await self._writer.close()
        await self._readers.close()
        self._writer = None

    async def check(self) -> None:
        """Healthy: a read answers, and the writer is open to take writes."""
        if self._writer is None or self._closing:
            raise Unavailable("the store cannot write: it is closed")
        await self._readers.read(read_head)

    # ------------------------------------------------------------ writes

    async def side_write(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """One statement on the writing connection, outside the log's batches (the
        notification outbox's bookkeeping, notify/outbox_sqlite.py); its rows."""
        if self._writer is None:
            raise Unavailable("the store is closed")
        try:
            return await self._writer.fetchall(sql, args)
        except WriterError as exc:
            raise Unavailable(f"store write failed: {exc}") from None

    async def submit(self, write: Write) -> WriteResult:
        """The write's outcome, or Unavailable once write_timeout_s has passed (_expire)."""
        if self._closing or self._task is None:
            raise Unavailable("the service is shutting down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[WriteResult] = loop.create_future()
        pending = Pending(write, fut, loop.time())
        # one timer for every write, at the oldest one's deadline: a timer per write
        # measured 2.5 us a post here
        self._waiting.append(pending)
        if self._watch is None:
            self._arm(loop, pending.since)
        self._put(pending)
        return await fut

    def _put(self, item: Pending | None) -> None:
        self._queue.append(item)
        self._wake_up()

    async def _run(self) -> None:
        queue = self._queue
        flights: deque[_Flight] = deque()  # batches sent to be committed, oldest first
        while True:
            oldest = flights[0].commit if flights else None
            if flights and (oldest is None or oldest.done()):
                await self._land(flights)  # stored (or failed): answer it first
                continue
            if queue and len(flights) < MAX_FLIGHTS:
                items = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
                batch = [p for p in items if p is not None]
                if batch:
                    self.batches += 1
                    self.writes += len(batch)
                    await self._launch(batch, flights)
                if None in items:
                    while flights:
                        await self._land(flights)
                    if self._watch is not None:
                        self._watch.cancel()
                    return
                continue
            # wait for news: a write to take, or the oldest batch's commit
            self._wake = asyncio.get_running_loop().create_future()
            if oldest is not None:
                oldest.add_done_callback(self._wake_up)
            await self._wake

    def _wake_up(self, _: object = None) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            if not wake.done():
                wake.set_result(None)

    async def _launch(self, batch: list[Pending], flights: deque[_Flight]) -> None:
        """Apply the rules to a batch and send its commit; a batch that breaks the rules'
        code (a bug) is sent again one write at a time, so that write fails alone."""
        try:
            flights.append(await self._prepare(batch))
        except Exception as exc:
            if self._split(batch, exc):
                for p in batch:
                    await self._launch([p], flights)

    async def _land(self, flights: deque[_Flight]) -> None:
        """Wait for the oldest batch's commit, then answer its callers and publish.

        If the database refused it, nothing of it was stored, and nothing sent after
        it: the writer refuses every commit after a failed one until it is told to go
        on. The batches after it were built on its changes, so every write of them all
        is done again, one at a time, from the state as committed (read back first): a
        write the database refuses fails alone instead of taking its batch-mates with
        it."""
        flight = flights.popleft()
        try:
            if flight.commit is not None:
                await flight.commit
                self._confirmed_at = asyncio.get_running_loop().time()
                self._on_commit(self._confirmed_at - flight.sent, len(flight.batch))
                self._failed = None
        except WriterError as exc:
            later = [flight, *flights]
            flights.clear()
            for f in later[1:]:
                if f.commit is not None:
                    with contextlib.suppress(WriterError):
                        await f.commit  # refused
            writes = [p for f in later for p in f.batch]
            assert self._writer is not None
            try:  # read back first: until told to resume, the writer refuses commits
                await self._load_state()
                await self._writer.resume()
            except WriterError as unread:  # still refusing: the next failure tries again
                self._failed = (asyncio.get_running_loop().time(), str(unread))
                self._fail(writes, unread)
                return
            # the database refused it (a lock is for the health probe to see, and to see go)
            if "database is locked" not in str(exc):
                self._failed = (asyncio.get_running_loop().time(), str(exc))
            if self._split(writes, exc):
                for p in writes:
                    single: deque[_Flight] = deque()
                    await self._launch([p], single)
                    if single:
                        await self._land(single)
            return
        await self._answer(flight)

    async def _answer(self, flight: _Flight) -> None:
        """A stored batch: answer its callers, then publish its events."""
        settle(flight.batch, flight.answers)
        waiting = self._waiting
        while waiting and waiting[0].future.done():
            waiting.popleft()  # answered: no deadline to watch for them
        if not flight.events:
            return
        try:
            self._publish(flight.events)
            self.retention.nudge(flight.events[-1].id)
        except Exception:  # stored and answered; the writer must go on
            log.exception("store.publish_failed", first=flight.events[0].id)

    def _split(self, writes: list[Pending], exc: Exception) -> bool:
        """After a failure: one write fails alone (False); more are to be done again one
        at a time (True)."""
        if len(writes) == 1:
            self._fail(writes, exc)
            return False
        log.warning("store.batch_split", size=len(writes), error=str(exc))
        self.redone += len(writes)
        return True

    def _fail(self, batch: list[Pending], exc: Exception) -> None:
        log.error("store.write_failed", size=len(batch), job_id=batch[0].write.job_id,
                  error=str(exc))
        for p in batch:
            if not p.future.done():
                p.future.set_exception(Unavailable(f"store write failed: {exc}"))

    async def _prepare(self, batch: list[Pending]) -> _Flight:
        """Apply the job rules (the ledger), send the commit, and take its changes as
        done: the next batch is built on them while this one is written (see _land for
        a failure)."""
        assert self._writer is not None
        conn = self._writer
        ledger = self._ledger
        await self._load_missing({p.write.job_id for p in batch})
        b = await ledger.build([p.write for p in batch], self._clock(), self._event_by_seq)
        commit = None
        if b.changed:
            commit = conn.commit(b.event_rows, *job_rows(b, ledger.jobs),
                                 notification_rows(b))
        # sent (or the writer is closed: nothing is); from here on the batch's changes
        # are the writer's memory
        ledger.adopt(b)
        return _Flight(batch, b.answers, b.events, commit, asyncio.get_running_loop().time())

    async def _load_missing(self, job_ids: set[str]) -> None:
        """Feed the ledger the jobs a batch touches that it does not hold (finished ones)
        and the history of their kinds."""
        assert self._writer is not None
        ledger = self._ledger
        await self._load_history({j.kind for j in map(ledger.jobs.get, job_ids) if j})
        missing = ledger.unknown(job_ids)
        if not missing:
            return
        marks = ",".join("?" * len(missing))
        rows = await self._writer.fetchall(f"SELECT doc FROM jobs WHERE id IN ({marks})", missing)
        found = [job_from_doc(doc) for (doc,) in rows]
        for job in found:
            ledger.learn(job)
        await self._load_history({job.kind for job in found})

    async def _load_history(self, kinds: set[str]) -> None:
        assert self._writer is not None
        for kind in self._ledger.kinds_to_learn(kinds):
            docs = await self._writer.fetchall(
                "SELECT doc FROM jobs WHERE kind=? AND status='succeeded'"
                " ORDER BY finished_at DESC LIMIT ?", (kind, HISTORY))
            self._ledger.learn_history(kind, [job_from_doc(d) for (d,) in reversed(list(docs))])

    async def _event_by_seq(self, job_id: str, attempt: int, seq: int) -> Event | None:
        assert self._writer is not None
        rows = await self._writer.fetchall(
            f"SELECT {EVENT_COLS} FROM events WHERE job_id=? AND attempt=? AND seq=?",
            (job_id, attempt, seq))
        return Event.stored(*rows[0]) if rows else None


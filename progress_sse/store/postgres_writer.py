"""The PostgreSQL writer: one task per instance, group commit, ids in commit order.

Every write of the instance goes through one queue. The writer takes whatever is
waiting and commits it as one transaction:

1. BEGIN, then `progress_sse_lock_head(synced)`: the head row locked FOR UPDATE, the
   database clock, the transaction id, and the jobs other instances wrote since this
   instance's last batch (taken into the ledger, see postgres_sync.py);
2. the ledger's rules (shared with SQLite, unchanged) on those fresh rows, with ids
   from head+1;
3. one statement: insert the events (unnest), upsert the jobs, move the head, insert
   the notifications the events ask for (the outbox, notify/), and one NOTIFY carrying
   only the new head;
4. COMMIT; then answer the callers and hand the events to the tail (postgres_tail.py).

Only one transaction is in flight, because the lock cannot be held across
transactions: the lock makes ids gapless and in commit order across instances.

Failures. A connection lost before COMMIT was sent stored nothing: the batch is done
again on a new connection. A connection lost during COMMIT leaves the outcome unknown:
`pg_xact_status` of the transaction id settles it on a new connection (the old
backend is terminated first if it is still there), so a commit is neither lost nor
repeated. When no connection can be made, every waiting write is answered 503 at once,
and so is each new one until a connection is made again (tried every RETRY_S); the same
while a lost commit is being settled. Whatever fails in a batch, the writer goes on: it
is every write's only way to the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import structlog

from ..errors import ProgressError, Unavailable
from ..ledger import HISTORY, Ledger
from . import Event, Write, WriteResult, settle
from .postgres_sync import ACTIVE, LedgerSync, job_row
from .readers import EVENT_COLS
from .rows import job_from_doc

log = structlog.get_logger("progress_sse.store.postgres")

# what asyncpg raises when a statement fails or its connection goes. InternalClientError:
# a connection ended by the server (restart, pg_terminate_backend) can leave asyncpg's
# protocol mid-operation, and the next statement (the COMMIT) raises it (measured)
DRIVER_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                 asyncpg.InternalClientError)
MAX_BATCH = 512
RETRY_S = 0.5  # between tries to connect while the database cannot be reached
CONNECT_TIMEOUT_S = 2.0

WRITE = """
WITH ev AS (
  INSERT INTO events (id, job_id, owner, kind, type, attempt, seq, body)
  SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                       $6::int[], $7::bigint[], $8::text[])
), jb AS (
  INSERT INTO jobs (id, owner, kind, queue, status, created_at, updated_at, finished_at,
                    last_post_at, heartbeat_timeout_s, stalled, token_hash, doc, version,
                    queue_seq)
  SELECT u.id, u.owner, u.kind, u.queue, u.status, u.created_at, u.updated_at,
         u.finished_at, u.last_post_at, u.hb, u.stalled, u.token_hash, u.doc, $22,
         u.queue_seq
  FROM unnest($9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
              $14::float8[], $15::float8[], $16::float8[], $17::float8[], $18::float8[],
              $19::int[], $20::text[], $21::text[], $23::bigint[])
       AS u(id, owner, kind, queue, status, created_at, updated_at, finished_at,
            last_post_at, hb, stalled, token_hash, doc, queue_seq)
  ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, queue = excluded.queue,
    status = excluded.status, updated_at = excluded.updated_at,
    finished_at = excluded.finished_at, last_post_at = excluded.last_post_at,
    heartbeat_timeout_s = excluded.heartbeat_timeout_s, stalled = excluded.stalled,
    token_hash = excluded.token_hash, doc = excluded.doc, version = excluded.version,
    queue_seq = COALESCE(excluded.queue_seq, jobs.queue_seq)
), hd AS (
  UPDATE event_head SET head = $24, version = $22 WHERE k = 1
), nt AS (
  INSERT INTO notifications (event_id, job_id, channel, target, body, created_at,
                             next_attempt_at)
  SELECT n.*, n.created_at FROM unnest($26::bigint[], $27::text[], $28::text[],
                                       $29::text[], $30::text[], $31::float8[])
       AS n(event_id, job_id, channel, target, body, created_at)
)
SELECT CASE WHEN $25 THEN pg_notify('progress_sse', $24::text) END
"""


class Pending:
    __slots__ = ("future", "write")

    def __init__(self, write: Write, future: asyncio.Future[WriteResult]) -> None:
        self.write = write
        self.future = future


class Lost(Exception):
    """The connection went during a batch; `committed`: True, False or None (unknown)."""

    def __init__(self, why: str, committed: bool | None) -> None:
        super().__init__(why)
        self.committed = committed


class PgWriter:
    def __init__(self, dsn: str, ledger: Ledger, *, write_timeout_s: float,
                 on_events: Callable[[Sequence[Event]], None],
                 on_commit: Callable[[float, int], None]) -> None:
        self.dsn = dsn
        self.sync = LedgerSync(ledger)
        self.write_timeout_s = write_timeout_s
        self._on_events = on_events  # committed events, in id order (the tail publishes)
        self._on_commit = on_commit  # each commit: seconds, writes (metrics)
        self.queue: deque[Pending] = deque()
        self.conn: asyncpg.Connection | None = None
        self.down: str | None = None  # why no connection can be made now
        self.failed: tuple[float, str] | None = None  # the last commit failed: when, why
        self.confirmed_at = -1e9  # loop time of the last commit
        self.closing = False
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = self.writes = self.redone = self.restarts = 0

    # ------------------------------------------------------------ life

    async def start(self) -> None:
        if not await self._connect():
            raise Unavailable(f"cannot connect to PostgreSQL: {self.down}")
        self._task = asyncio.create_task(self._run(), name="progress-sse-pg-writer")

    async def close(self) -> None:
        self.closing = True
        self._wake_up()
        if self._task is not None:
            await self._task
            self._task = None
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conn.close(), 2)
            self.conn = None

    def put(self, pending: Pending) -> None:
        if self.closing:
            raise Unavailable("the service is shutting down")
        if self.down is not None:
            raise Unavailable(f"the database cannot be reached ({self.down}); the write was "
                              "not stored", headers={"Retry-After": "1"})
        self.queue.append(pending)
        self._wake_up()

    def _wake_up(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _sleep(self, seconds: float | None) -> None:
        self._wake = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake, seconds)

    async def _run(self) -> None:
        while True:
            if self.conn is None or self.conn.is_closed():
                if self.closing:
                    self._fail(list(self.queue), Unavailable("the service is shutting down"))
                    return
                if not await self._connect():
                    self._fail(list(self.queue), Unavailable(
                        f"the database cannot be reached ({self.down}); the write was not"
                        " stored", headers={"Retry-After": "1"}))
                    self.queue.clear()
                    await self._sleep(RETRY_S)
                    continue
            if not self.queue:
                if self.closing:
                    return
                await self._sleep(None)
                continue
            batch = [self.queue.popleft() for _ in range(min(len(self.queue), MAX_BATCH))]
            batch = [p for p in batch if not p.future.done()]  # expired meanwhile
            if batch:
                self.batches += 1
                self.writes += len(batch)
                try:
                    await self._commit(batch)
                except Exception as exc:  # the writer must go on: it is every write's way
                    log.exception("store.writer_failed", size=len(batch))
                    self.failed = (asyncio.get_running_loop().time(), str(exc))
                    if self.conn is not None:
                        self.conn.terminate()
                    self.conn = None
                    self._fail(batch, Unavailable(
                        f"the store failed during the write ({type(exc).__name__}); it may "
                        "be stored, once: send it again with the same seq to get its outcome",
                        headers={"Retry-After": "1"}))

    async def _connect(self) -> bool:
        """A new connection, and the ledger read again from what is committed."""
        old, self.conn = self.conn, None
        if old is not None:
            old.terminate()
        try:
            conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT_S)
        except (*DRIVER_ERRORS, TimeoutError) as exc:
            if self.down is None:
                log.error("store.database_unreachable", error=str(exc))
            self.down = str(exc) or type(exc).__name__
            return False
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                head, version = await conn.fetchrow(
                    "SELECT head, version FROM event_head WHERE k = 1")
                rows = await conn.fetch(
                    "SELECT doc, queue_seq FROM jobs WHERE status = ANY($1::text[])"
                    " ORDER BY queue_seq NULLS LAST, created_seq", list(ACTIVE))
        except (*DRIVER_ERRORS, TimeoutError) as exc:
            conn.terminate()
            self.down = str(exc) or type(exc).__name__
            return False
        self.sync.load(head, version, [(r[0], r[1]) for r in rows])
        if self.down is not None:
            log.info("store.database_reachable", head=head)
            self.restarts += 1
        self.down = None
        self.conn = conn
        return True

    # ------------------------------------------------------------ one batch

    async def _commit(self, batch: list[Pending]) -> None:
        try:
            answers, events = await self._transaction(batch)
        except Lost as lost:
            log.warning("store.connection_lost", error=str(lost), committed=lost.committed,
                        size=len(batch))
            if self.conn is not None:
                self.conn.terminate()
            self.conn = None  # the next turn connects again and reloads the ledger
            if lost.committed is False:
                self.queue.extendleft(reversed(batch))  # stored nothing: done again
                self.redone += len(batch)
            elif lost.committed is None:
                self.failed = (asyncio.get_running_loop().time(), str(lost))
                self._fail(batch, Unavailable(
                    f"the database connection was lost during the commit ({lost}); the "
                    "write may be stored, once: send it again with the same seq to get its "
                    "outcome", headers={"Retry-After": "1"}))
            else:
                # stored, its answer lost: the tail reads its events like another's
                self._answer(batch, self._last_answers, ())
            return
        except asyncpg.PostgresError as exc:  # refused by the database: stored nothing
            self.failed = (asyncio.get_running_loop().time(), str(exc))
            if len(batch) == 1:
                log.error("store.write_failed", job_id=batch[0].write.job_id, error=str(exc))
                self._fail(batch, Unavailable(f"store write failed: {exc}"))
                return
            log.warning("store.batch_split", size=len(batch), error=str(exc))
            self.redone += len(batch)
            for p in batch:
                await self._commit([p])
            return
        self.failed = None
        self._answer(batch, answers, events)

    async def _transaction(self, batch: list[Pending]
                           ) -> tuple[list[WriteResult | ProgressError], list[Event]]:
        conn = self.conn
        assert conn is not None
        sync, ledger = self.sync, self.sync.ledger
        started = asyncio.get_running_loop().time()
        timeout = self.write_timeout_s
        stage = "begin"
        xid = ""
        self._last_answers: list[WriteResult | ProgressError] = []
        try:
            tr = conn.transaction()
            await tr.start()
            rec = await conn.fetchrow("SELECT * FROM progress_sse_lock_head($1)",
                                      sync.synced, timeout=timeout)
            xid = rec["xid"]
            sync.take_in(rec["head"], rec["version"], rec["docs"], rec["queue_seqs"])
            await self._load_missing(conn, {p.write.job_id for p in batch})
            b = await ledger.build([p.write for p in batch], rec["now"],
                                   lambda j, a, s: self._event_by_seq(conn, j, a, s))
            self._last_answers = b.answers
            version = rec["version"] + 1
            seqs = sync.joiners(b)
            if b.changed:
                await conn.execute(WRITE, *self._args(b, version, seqs), timeout=timeout)
            stage = "commit"
            await asyncio.wait_for(tr.commit(), timeout)
        except (*DRIVER_ERRORS, TimeoutError) as exc:
            if not _lost(conn, exc):  # refused: the transaction stored nothing
                with contextlib.suppress(Exception):
                    await tr.rollback()
                raise
            why = f"{type(exc).__name__}: {exc}"
            if stage != "commit":
                raise Lost(why, False) from None
            raise Lost(why, await self._settle(conn, xid)) from None
        sync.adopt(b, version, seqs)
        self.confirmed_at = asyncio.get_running_loop().time()
        self._on_commit(self.confirmed_at - started, len(batch))
        return b.answers, b.events

    def _args(self, b: Any, version: int, seqs: dict[str, int]) -> list[Any]:
        rows = b.event_rows
        cols: list[list[Any]] = [[r[i] for r in rows] for i in range(8)]
        jobs = [job_row(b.working[j], js, version, seqs.get(j)) for j, js in b.changed.items()]
        jcols: list[list[Any]] = [[r[i] for r in jobs] for i in range(15)]
        head = b.next_id - 1
        ncols: list[list[Any]] = [[r[i] for r in b.notify_rows] for i in range(6)]
        return [*cols, *jcols[:13], version, jcols[14], head, bool(rows), *ncols]

    async def _settle(self, old: asyncpg.Connection, xid: str) -> bool | None:
        """Whether the transaction `xid` committed, asked on a new connection; None when
        no connection can be made within the write deadline."""
        pid = old.get_server_pid()
        old.terminate()
        deadline = time.monotonic() + self.write_timeout_s
        while time.monotonic() < deadline:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT_S)
                try:
                    while time.monotonic() < deadline:
                        status = await conn.fetchval("SELECT pg_xact_status($1::text::xid8)", xid)
                        if status != "in progress":
                            log.info("store.commit_settled", xid=xid, status=status)
                            return bool(status == "committed")
                        # the old backend has not noticed yet: end it, then ask again
                        await conn.execute("SELECT pg_terminate_backend($1)", pid)
                        await asyncio.sleep(0.05)
                finally:
                    conn.terminate()
            except (*DRIVER_ERRORS, TimeoutError) as exc:
                log.warning("store.settle_failed", xid=xid, error=str(exc))
                # meanwhile the writes behind this one are answered at once, as when the
                # writer cannot connect, rather than at their deadline
                self.down = str(exc) or type(exc).__name__
                self._fail(list(self.queue), Unavailable(
                    f"the database cannot be reached ({self.down}); the write was not"
                    " stored", headers={"Retry-After": "1"}))
                self.queue.clear()
                await asyncio.sleep(RETRY_S)
        return None

    async def _load_missing(self, conn: asyncpg.Connection, job_ids: set[str]) -> None:
        """Feed the ledger the jobs a batch touches that it does not hold (finished ones)
        and the history of their kinds; read under the lock, so as committed."""
        ledger = self.sync.ledger
        missing = ledger.unknown(job_ids)
        found = []
        if missing:
            rows = await conn.fetch("SELECT doc FROM jobs WHERE id = ANY($1::text[])", missing)
            found = [job_from_doc(r[0]) for r in rows]
            for job in found:
                ledger.learn(job)
        kinds = {j.kind for j in map(ledger.jobs.get, job_ids) if j}
        for kind in ledger.kinds_to_learn(kinds):
            rows = await conn.fetch(
                "SELECT doc FROM jobs WHERE kind = $1 AND status = 'succeeded'"
                " ORDER BY finished_at DESC LIMIT $2", kind, HISTORY)
            ledger.learn_history(kind, [job_from_doc(r[0]) for r in reversed(rows)])

    async def _event_by_seq(self, conn: asyncpg.Connection, job_id: str, attempt: int,
                            seq: int) -> Event | None:
        row = await conn.fetchrow(f"SELECT {EVENT_COLS} FROM events WHERE job_id = $1"
                                  " AND attempt = $2 AND seq = $3", job_id, attempt, seq)
        return Event.stored(*row) if row else None

    # ------------------------------------------------------------ answers

    def _answer(self, batch: list[Pending], answers: Sequence[WriteResult | ProgressError],
                events: Sequence[Event]) -> None:
        settle(batch, answers)
        if events:
            try:
                self._on_events(events)
            except Exception:  # stored and answered; the writer must go on
                log.exception("store.publish_failed", first=events[0].id)

    def _fail(self, batch: list[Pending], exc: Exception) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)


def _lost(conn: asyncpg.Connection, exc: Exception) -> bool:
    """Whether an error means the connection (and the transaction's answer) is lost,
    rather than the database refusing a statement."""
    return conn.is_closed() or isinstance(exc, (
        OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError,
        asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError))

"""The PostgreSQL store's reads, on a small pool of connections.

Each read that must agree with itself is one statement (PostgreSQL gives a statement
one snapshot), or a read-only REPEATABLE READ transaction when it needs two (a
snapshot's jobs and head). Ids are in commit order with no gaps, so a read asked for
after the hub's head reached H sees every event up to H: `events_after` is complete
up to `upto` without reading the head. A database that cannot be read answers 503.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from ..errors import Unavailable
from ..jobs import Job
from . import Event, Filter, Page, Snapshot
from .readers import EVENT_COLS
from .rows import job_from_doc

T = TypeVar("T")
# a read of the log spans at most this many times its limit in ids: its cost stays
# bounded whatever plan the statistics lead to (a table not yet analysed got a bitmap
# scan of the whole remaining range and a sort on every page: a replay 100,000 events
# behind read millions of rows, 8.5k events/s); a sparse filter takes more, cheap, round
# trips
WINDOW = 4
# the horizon and the database's head, from one snapshot
HORIZON_HEAD = ("SELECT (SELECT horizon FROM retention WHERE k = 1), head"
                " FROM event_head WHERE k = 1")
LEASE_S = 5.0  # a periodic task's lease: another instance takes it over this long after


class PgReads:
    """Reads and leases (PostgresStore has them from here)."""

    pool: asyncpg.Pool | None
    holder: str  # this instance, as a lease names it
    _body_mean: float = 512.0  # the mean length of event bodies read (sizes each read)

    async def _read(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        return await self.read(fn)

    async def read(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `fn` on a pooled connection; Unavailable when the database cannot be
        read (also for other modules' tables: the notification outbox's)."""
        if self.pool is None:
            raise Unavailable("the store is not open")
        try:
            async with self.pool.acquire(timeout=5) as conn:
                return await fn(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise Unavailable(f"the database cannot be read: {exc}",
                              headers={"Retry-After": "1"}) from None

    async def get_job(self, job_id: str) -> Job | None:
        async def read(conn: asyncpg.Connection) -> Job | None:
            doc = await conn.fetchval("SELECT doc FROM jobs WHERE id = $1", job_id)
            return None if doc is None else job_from_doc(doc)

        return await self._read(read)

    async def list_jobs(self, flt: Filter, limit: int, before: int | None
                        ) -> tuple[list[Job], int, int | None]:
        """A page of jobs, newest first, with the head id and the cursor of the next page."""
        where, args = _where(flt)
        if before is not None:
            args.append(before)
            where.append(f"created_seq < ${len(args)}")
        args.append(limit)
        sql = (f"SELECT doc, created_seq, (SELECT head FROM event_head WHERE k = 1)"
               f" FROM jobs{_and(where)} ORDER BY created_seq DESC LIMIT ${len(args)}")

        async def read(conn: asyncpg.Connection) -> tuple[list[Job], int, int | None]:
            rows = await conn.fetch(sql, *args)
            head = rows[0][2] if rows else await conn.fetchval(
                "SELECT head FROM event_head WHERE k = 1")
            return ([job_from_doc(r[0]) for r in rows], head,
                    rows[-1][1] if len(rows) == limit else None)

        return await self._read(read)

    async def snapshot(self, flt: Filter, limit: int) -> Snapshot:
        """Jobs, the head id and the oldest kept id from one snapshot, so they agree."""
        where, args = _where(flt)
        args.append(limit)
        sql = (f"SELECT doc FROM jobs{_and(where)}"
               f" ORDER BY finished_at IS NOT NULL, updated_at DESC LIMIT ${len(args)}")

        async def read(conn: asyncpg.Connection) -> Snapshot:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                horizon, head = await conn.fetchrow(HORIZON_HEAD)
                docs = await conn.fetch(sql, *args)
            return Snapshot([job_from_doc(d[0]) for d in docs], head, horizon + 1)

        return await self._read(read)

    async def events_after(self, after: int, upto: int, flt: Filter, limit: int,
                           max_bytes: int = 0) -> Page:
        """Events with after < id <= upto that `flt` matches, in id order: at most
        `limit`, and no more once `max_bytes` of bodies are read (0: no byte bound); the
        page may end before `upto` (at most limit * WINDOW ids are read). A reset page
        when `after` is older than the horizon that the read saw (pruned under it)."""
        if upto <= after:
            return Page([], after)
        # rows past the byte bound would be sent and decoded for nothing: ask for about
        # as many as the bound holds at the bodies' mean length so far
        if max_bytes:
            limit = max(1, min(limit, int(max_bytes * 1.25 / self._body_mean) + 1))
        upto = min(upto, after + limit * WINDOW)
        where, args = _where(flt, job_column="job_id")
        args += [after, upto, limit]
        n = len(args)
        where += [f"id > ${n - 2}", f"id <= ${n - 1}"]
        # the horizon and the events in one statement, so from one snapshot: a prune
        # commits both or neither (one row of NULL events when none match)
        sql = (f"SELECT e.*, r.horizon FROM retention r LEFT JOIN LATERAL"
               f" (SELECT {EVENT_COLS} FROM events{_and(where)} ORDER BY id LIMIT ${n}) e"
               " ON true WHERE r.k = 1")

        async def read(conn: asyncpg.Connection) -> Page:
            rows = await conn.fetch(sql, *args)
            if after < rows[0][6]:
                return Page([], after, reset=True)  # pruned under the reader: start over
            if rows[0][0] is None:
                rows = []
            events: list[Event] = []
            size = 0
            build = Event.stored
            for row in rows:
                events.append(build(*row[:6]))
                size += len(row[5])
                if max_bytes and size >= max_bytes:
                    break
            if events:
                self._body_mean += (size / len(events) - self._body_mean) / 4
            if len(events) < len(rows) or len(rows) == limit:
                return Page(events, events[-1].id)  # cut short: complete up to this one
            return Page(events, upto)

        return await self._read(read)

    async def bounds(self) -> tuple[int | None, int]:
        """The first id after the horizon (a resume from before it is reset) and the
        database's head, in one statement: a cursor ahead of this instance's hub but not
        of the database is resumed, not reset (the hub catches up)."""
        async def read(conn: asyncpg.Connection) -> tuple[int | None, int]:
            horizon, head = await conn.fetchrow(HORIZON_HEAD)
            return horizon + 1, head

        return await self._read(read)

    async def stale_jobs(self, now: float) -> list[str]:
        """Running jobs gone silent, for the instance holding the stall lease (the others
        get none: marking is idempotent under the head lock, the lease saves the scans)."""
        async def read(conn: asyncpg.Connection) -> list[str]:
            if not await self._lease(conn, "stalls"):
                return []
            rows = await conn.fetch(
                "SELECT id FROM jobs WHERE status = 'running' AND stalled = 0"
                " AND last_post_at + heartbeat_timeout_s < $1", now)
            return [r[0] for r in rows]

        return await self._read(read)

    async def _lease(self, conn: asyncpg.Connection, name: str) -> bool:
        return await take_lease(conn, self.holder, name)


async def take_lease(conn: asyncpg.Connection, holder: str, name: str) -> bool:
    """Take or renew the lease `name` for LEASE_S; False while another holds it."""
    got = await conn.fetchval(
        "UPDATE leases SET holder = $1, until = now() + make_interval(secs => $2)"
        " WHERE name = $3 AND (until < now() OR holder = $1) RETURNING true",
        holder, LEASE_S, name)
    return bool(got)


def _where(flt: Filter, job_column: str = "id") -> tuple[list[str], list[Any]]:
    """SQL conditions for a filter (see Filter.constraints), each value list one array."""
    where: list[str] = []
    args: list[Any] = []
    for column, values in flt.constraints(job_column):
        args.append(values)
        where.append(f"{column} = ANY(${len(args)}::text[])")
    return where, args


def _and(where: list[str]) -> str:
    return (" WHERE " + " AND ".join(where)) if where else ""

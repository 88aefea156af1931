"""The PostgreSQL store's pruning transactions (the policy and the horizon: retention.py).

One instance prunes at a time: each transaction first takes or renews the
'retention' lease (postgres_reads.take_lease), and does nothing while another
instance holds it. Times are the database's clock, as jobs' are. Space: deleted
rows are left to autovacuum, which makes their room reusable by later inserts, so
the tables stop growing under a steady load (README, Retention).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from ..errors import Unavailable
from .postgres_reads import take_lease
from .retention import COMPACT_JOBS, Done, Policy, Retained

T = TypeVar("T")
LEASE = "retention"
NOW = "extract(epoch FROM clock_timestamp())"


class PgSteps:
    """retention.Steps on PostgreSQL, each under the lease, on the store's read pool."""

    def __init__(self, pool: asyncpg.Pool, holder: str) -> None:
        self.pool = pool
        self.holder = holder

    async def _leased(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], idle: T) -> T:
        """`fn` in one transaction with the lease held; `idle` while another holds it."""
        try:
            async with self.pool.acquire(timeout=5) as conn, conn.transaction():
                if not await take_lease(conn, self.holder, LEASE):
                    return idle
                return await fn(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise Unavailable(f"the database cannot be pruned: {exc}") from None

    async def mark(self, stamp: bool) -> bool:
        async def mark(conn: asyncpg.Connection) -> bool:
            if not stamp:
                return True
            await conn.execute(
                "INSERT INTO retention_marks SELECT GREATEST(h.head, r.horizon), " + NOW +
                " FROM event_head h, retention r WHERE h.k = 1 AND r.k = 1"
                " ON CONFLICT (head) DO NOTHING")
            return True

        return await self._leased(mark, False)

    async def expire(self, policy: Policy) -> Done:
        async def expire(conn: asyncpg.Connection) -> Done:
            expired = await conn.fetchval(
                "SELECT expired FROM retention WHERE k = 1 FOR UPDATE")
            cutoff = 0
            if policy.max_age_s:
                cutoff = await conn.fetchval(
                    f"SELECT max(head) FROM retention_marks WHERE at <= {NOW} - $1",
                    policy.max_age_s) or 0
            if policy.max_events:
                head = await conn.fetchval("SELECT head FROM event_head WHERE k = 1")
                cutoff = max(cutoff, head - policy.max_events)
            if cutoff <= expired:
                return 0, False
            upto = await conn.fetchval(
                "SELECT id FROM events WHERE id > $1 AND id <= $2 ORDER BY id"
                " OFFSET $3 LIMIT 1", expired, cutoff, policy.batch - 1) or cutoff
            status = await conn.execute("DELETE FROM events WHERE id > $1 AND id <= $2",
                                        expired, upto)
            await conn.execute("UPDATE retention SET horizon = GREATEST(horizon, $1),"
                               " expired = $1 WHERE k = 1", upto)
            await conn.execute(
                "DELETE FROM retention_marks WHERE head <"
                " (SELECT max(head) FROM retention_marks WHERE head <= $1)", upto)
            return _count(status), upto < cutoff

        return await self._leased(expire, (0, False))

    async def compact(self, policy: Policy) -> Done:
        async def compact(conn: asyncpg.Connection) -> Done:
            through, until = await conn.fetchrow(
                f"SELECT compacted, {NOW} - $1 FROM retention WHERE k = 1 FOR UPDATE",
                policy.compact_after_s)
            if until <= through:
                return 0, False
            upto = await conn.fetchval(
                "SELECT finished_at FROM jobs WHERE finished_at > $1 AND finished_at <= $2"
                " ORDER BY finished_at OFFSET $3 LIMIT 1", through, until,
                COMPACT_JOBS - 1) or until
            ids = [r[0] for r in await conn.fetch(
                "SELECT e.id FROM jobs j JOIN events e ON e.job_id = j.id"
                " WHERE j.finished_at > $1 AND j.finished_at <= $2 AND e.type = 'progress'"
                " LIMIT $3", through, upto, policy.batch)]
            if ids:
                await conn.execute("DELETE FROM events WHERE id = ANY($1::bigint[])", ids)
                await conn.execute("UPDATE retention SET horizon = GREATEST(horizon, $1)"
                                   " WHERE k = 1", max(ids))
            full = len(ids) == policy.batch
            if not full:
                await conn.execute("UPDATE retention SET compacted = $1 WHERE k = 1", upto)
            return len(ids), full or upto < until

        return await self._leased(compact, (0, False))

    async def drop_jobs(self, policy: Policy) -> Done:
        async def drop(conn: asyncpg.Connection) -> Done:
            before = await conn.fetchval(
                "SELECT max(m.at) FROM retention_marks m, retention r"
                " WHERE r.k = 1 AND m.head <= r.expired")
            if before is None:
                return 0, False
            status = await conn.execute(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs j WHERE finished_at <= $1"
                " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id) LIMIT $2)",
                before, policy.batch)
            deleted = _count(status)
            return deleted, deleted == policy.batch

        return await self._leased(drop, (0, False))

    async def reclaim(self, policy: Policy) -> Done:
        return 0, False  # autovacuum's work

    async def retained(self) -> Retained:
        try:
            async with self.pool.acquire(timeout=5) as conn:
                horizon, oldest = await conn.fetchrow(
                    "SELECT horizon, (SELECT min(id) FROM events) FROM retention WHERE k = 1")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise Unavailable(f"the database cannot be read: {exc}") from None
        return Retained(horizon, oldest)


def _count(status: str) -> int:
    """Rows from a command's status ("DELETE 42")."""
    return int(status.rsplit(" ", 1)[-1])

"""The outbox on PostgreSQL: instances share it, so a claim locks the rows it takes
(FOR UPDATE SKIP LOCKED: two claimers never take the same row, nor wait for each
other) and holds them with a lease, on the database's clock (one clock for every
instance). A claimer that dies leaves its rows to the others once the lease passes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from ..store.postgres import PostgresStore
from .outbox import VIEW_COLS, Delivery, view

_NOW = "extract(epoch FROM statement_timestamp())::float8"
# the window picks the first `per_target` due rows of each target, round robin; the
# locking select checks the row again (a claim committed meanwhile makes it fail)
_CLAIM = f"""
WITH due AS (
  SELECT id FROM (
    SELECT id, next_attempt_at,
           row_number() OVER (PARTITION BY target ORDER BY next_attempt_at, id) AS n
    FROM notifications
    WHERE status = 'pending' AND next_attempt_at <= {_NOW} AND claimed_until <= {_NOW}
      AND NOT (target = ANY($3::text[]))
  ) d WHERE n <= $2 ORDER BY n, next_attempt_at LIMIT $1
), locked AS (
  SELECT id FROM notifications
  WHERE id IN (SELECT id FROM due) AND status = 'pending' AND claimed_until <= {_NOW}
  FOR UPDATE SKIP LOCKED
)
UPDATE notifications o SET claimed_until = {_NOW} + $4, attempts = o.attempts + 1
FROM locked WHERE o.id = locked.id
RETURNING o.id, o.event_id, o.job_id, o.channel, o.target, o.body,
          {_NOW} - o.created_at, o.attempts, o.last_error
"""


class PgOutbox:
    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    async def _execute(self, sql: str, *args: Any) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            await conn.execute(sql, *args)

        await self.store.read(run)

    async def claim(self, limit: int, per_target: int, busy: Sequence[str],
                    lease_s: float) -> list[Delivery]:
        async def run(conn: asyncpg.Connection) -> list[Any]:
            return list(await conn.fetch(_CLAIM, limit, per_target, list(busy), lease_s))

        return [Delivery(*r) for r in await self.store.read(run)]

    async def delivered(self, row_id: int) -> None:
        await self._execute(
            f"UPDATE notifications SET status = 'delivered', finished_at = {_NOW},"
            " claimed_until = 0 WHERE id = $1 AND status = 'pending'", row_id)

    async def retry(self, row_id: int, delay_s: float, error: str) -> None:
        await self._execute(
            f"UPDATE notifications SET next_attempt_at = {_NOW} + $2, claimed_until = 0,"
            " last_error = $3 WHERE id = $1 AND status = 'pending'", row_id, delay_s, error)

    async def failed(self, row_id: int, error: str) -> None:
        await self._execute(
            f"UPDATE notifications SET status = 'failed', finished_at = {_NOW},"
            " claimed_until = 0, last_error = $2 WHERE id = $1 AND status = 'pending'",
            row_id, error)

    async def recover(self) -> None:
        """Nothing: another instance may hold a claim now; a dead one's lease runs out."""

    async def prune(self, older_than_s: float, limit: int) -> int:
        async def run(conn: asyncpg.Connection) -> int:
            done: str = await conn.execute(
                "DELETE FROM notifications WHERE id IN (SELECT id FROM notifications"
                f" WHERE status <> 'pending' AND finished_at < {_NOW} - $1 LIMIT $2"
                " FOR UPDATE SKIP LOCKED)", older_than_s, limit)
            return int(done.rsplit(" ", 1)[1])

        return await self.store.read(run)

    async def for_job(self, job_id: str) -> list[dict[str, Any]]:
        async def run(conn: asyncpg.Connection) -> list[Any]:
            return list(await conn.fetch(f"SELECT {VIEW_COLS} FROM notifications"
                                         " WHERE job_id = $1 ORDER BY id", job_id))

        return [view(r) for r in await self.store.read(run)]

    async def pending(self) -> int:
        async def run(conn: asyncpg.Connection) -> int:
            return int(await conn.fetchval(
                "SELECT COUNT(*) FROM notifications WHERE status = 'pending'"))

        return await self.store.read(run)

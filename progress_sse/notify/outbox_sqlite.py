"""The outbox on SQLite: one process per file (the file lock), so a claim needs no
lock of its own; its statements run on the writer's connection, between commits
(each one short), and the job's view on a read connection."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from ..store.sqlite import SQLiteStore
from .outbox import VIEW_COLS, Delivery, view

# due rows no one holds, the first `per_target` of each target, round robin over the
# targets (each one's first, then each one's second...): one target cannot fill a page
_CLAIM = """
UPDATE notifications SET claimed_until = ?1 + ?2, attempts = attempts + 1
WHERE id IN (
  SELECT id FROM (
    SELECT id, next_attempt_at,
           row_number() OVER (PARTITION BY target ORDER BY next_attempt_at, id) AS n
    FROM notifications
    WHERE status = 'pending' AND next_attempt_at <= ?1 AND claimed_until <= ?1
      AND target NOT IN (SELECT value FROM json_each(?3))
  ) WHERE n <= ?4 ORDER BY n, next_attempt_at LIMIT ?5)
RETURNING id, event_id, job_id, channel, target, body, ?1 - created_at, attempts,
          last_error
"""


class SQLiteOutbox:
    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    async def claim(self, limit: int, per_target: int, busy: Sequence[str],
                    lease_s: float) -> list[Delivery]:
        rows = await self.store.side_write(
            _CLAIM, (time.time(), lease_s, json.dumps(list(busy)), per_target, limit))
        return [Delivery(*r) for r in rows]

    async def delivered(self, row_id: int) -> None:
        await self.store.side_write(
            "UPDATE notifications SET status = 'delivered', finished_at = ?,"
            " claimed_until = 0 WHERE id = ? AND status = 'pending'", (time.time(), row_id))

    async def retry(self, row_id: int, delay_s: float, error: str) -> None:
        await self.store.side_write(
            "UPDATE notifications SET next_attempt_at = ?, claimed_until = 0, last_error = ?"
            " WHERE id = ? AND status = 'pending'", (time.time() + delay_s, error, row_id))

    async def failed(self, row_id: int, error: str) -> None:
        await self.store.side_write(
            "UPDATE notifications SET status = 'failed', finished_at = ?, claimed_until = 0,"
            " last_error = ? WHERE id = ? AND status = 'pending'",
            (time.time(), error, row_id))

    async def recover(self) -> None:
        await self.store.side_write(
            "UPDATE notifications SET claimed_until = 0 WHERE status = 'pending'"
            " AND claimed_until > 0")

    async def prune(self, older_than_s: float, limit: int) -> int:
        rows = await self.store.side_write(
            "DELETE FROM notifications WHERE id IN (SELECT id FROM notifications"
            " WHERE status <> 'pending' AND finished_at < ? LIMIT ?) RETURNING id",
            (time.time() - older_than_s, limit))
        return len(rows)

    async def for_job(self, job_id: str) -> list[dict[str, Any]]:
        def read(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(f"SELECT {VIEW_COLS} FROM notifications WHERE job_id = ?"
                                " ORDER BY id", (job_id,)).fetchall()

        return [view(r) for r in await self.store.read(read)]

    async def pending(self) -> int:
        def read(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM notifications"
                                    " WHERE status = 'pending'").fetchone()[0])

        return await self.store.read(read)

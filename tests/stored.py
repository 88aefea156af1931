"""The stored state read straight from the store, not through the service: a SQLite
file or a PostgreSQL DSN (`Settings.db` either way), so that a test comparing answers
with what is stored runs on both stores unchanged."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import sqlite3
from typing import Any

from progress_sse.store.postgres_schema import is_postgres

from . import pg


async def fetch(db: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of `sql`, written with `?` placeholders (made `$n` for PostgreSQL)."""
    if is_postgres(db):
        n = itertools.count(1)
        return [tuple(r) for r in await pg.query(db, re.sub(r"\?", lambda _: f"${next(n)}",
                                                            sql), *args)]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


async def db_events(db: str, after: int = 0) -> list[dict[str, Any]]:
    """The stored log after `after`, in id order: each event's body."""
    rows = await fetch(db, "SELECT body FROM events WHERE id > ? ORDER BY id", after)
    return [json.loads(r[0]) for r in rows]


async def event_count(db: str) -> int:
    [(n,)] = await fetch(db, "SELECT COUNT(*) FROM events")
    return int(n)


async def stored_job(db: str, job_id: str) -> tuple[Any, ...]:
    """A job's row as stored."""
    rows = await fetch(db, "SELECT * FROM jobs WHERE id = ?", job_id)
    assert rows, f"job {job_id} is not stored"
    return rows[0]


async def dump(db: str) -> str:
    """Everything the database holds, as text (to show a secret is not in it)."""
    if is_postgres(db):
        tables = [r[0] for r in await fetch(
            db, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        rows = [r[0] for t in tables for r in await fetch(db, f'SELECT t::text FROM "{t}" t')]
        return "\n".join(rows)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return "\n".join(conn.iterdump())

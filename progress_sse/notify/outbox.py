"""The notification outbox: its rows and their states, as the deliverer and the job's
JSON see them, whatever the store.

A row is written by the store's writer in the same transaction as the event that
asks for it (rules.py, the ledger), so a notification is never lost to a crash after
the commit. Its life: `pending` (due at `next_attempt_at`; while one deliverer sends
it, `claimed_until` holds it as that deliverer's for a lease) → `delivered`, or
`failed` once retries are given up. A claim counts as an attempt: a deliverer that
dies mid-send leaves the row to be claimed again when its lease has passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

STATUSES = ("pending", "delivered", "failed")


@dataclass(frozen=True, slots=True)
class Delivery:
    """A claimed row: what one attempt sends."""

    id: int
    event_id: int
    job_id: str
    channel: str
    target: str
    body: str  # the event as streams carry it
    age_s: float  # since the event, on the outbox's clock
    attempts: int  # this one included
    last_error: str | None  # the last failed attempt's


# what the job's JSON shows of each of its notifications (schema.Notification)
VIEW_COLS = "channel, status, attempts, last_error, next_attempt_at, event_id"


def view(row: Sequence[Any]) -> dict[str, Any]:
    channel, status, attempts, last_error, next_at, event_id = row
    return {"channel": channel, "event_id": event_id, "status": status,
            "attempts": attempts, "last_error": last_error,
            "next_attempt_at": next_at if status == "pending" else None}


class Outbox(Protocol):
    """The outbox on one store. Times are seconds on the store's clock."""

    async def claim(self, limit: int, per_target: int, busy: Sequence[str],
                    lease_s: float) -> list[Delivery]:
        """Due rows no one holds, at most `per_target` per target and none of the
        `busy` targets, held for `lease_s`: each claimed by one claimer at a time."""
        ...

    async def delivered(self, row_id: int) -> None: ...
    async def retry(self, row_id: int, delay_s: float, error: str) -> None: ...
    async def failed(self, row_id: int, error: str) -> None: ...

    async def recover(self) -> None:
        """At start: take back what this database's previous process held (SQLite:
        one process per file); nothing where instances share the database."""
        ...

    async def prune(self, older_than_s: float, limit: int) -> int:
        """Delete at most `limit` delivered or failed rows that ended longer ago than
        `older_than_s` (one short transaction); how many went."""
        ...

    async def for_job(self, job_id: str) -> list[dict[str, Any]]: ...
    async def pending(self) -> int: ...


def open_outbox(store: object) -> Outbox:
    """The outbox of the store the service runs on."""
    from ..store.sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        from .outbox_sqlite import SQLiteOutbox

        return SQLiteOutbox(store)
    from ..store.postgres import PostgresStore

    assert isinstance(store, PostgresStore)
    from .outbox_postgres import PgOutbox

    return PgOutbox(store)

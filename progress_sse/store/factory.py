"""Choosing the store from `settings.db`: a PostgreSQL DSN, or a SQLite file."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from ..notify.rules import Targets
from ..settings import Settings
from . import Store
from .lock import DatabaseLock
from .postgres_schema import Migrated, is_postgres
from .retention import Policy


def _require_asyncpg() -> None:
    """A message, not a traceback, when the PostgreSQL driver is not installed."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        raise ConfigError("a postgresql:// database needs the PostgreSQL driver: "
                          "pip install 'progress-sse[postgres]'") from None


def open_store(settings: Settings, on_commit: Callable[[float, int], None]) -> Store:
    """The store `settings.db` names (not started); its writer adds the outbox rows of
    the notifications the settings configure (notify/rules.py)."""
    notify = Targets(webhook_url=settings.webhook_url, email=bool(settings.smtp_url))
    if is_postgres(settings.db):
        _require_asyncpg()
        from .postgres import PostgresStore

        return PostgresStore(settings.db, retention=Policy.of(settings),
                             estimate_every_s=settings.estimate_every_s,
                             write_timeout_s=settings.write_timeout_s, on_commit=on_commit,
                       notify=notify)
    from .sqlite import SQLiteStore

    return SQLiteStore(settings.db, synchronous=settings.synchronous,
                       retention=Policy.of(settings),
                       estimate_every_s=settings.estimate_every_s,
                       write_timeout_s=settings.write_timeout_s, on_commit=on_commit,
                       notify=notify)


def prepare(db: str) -> DatabaseLock | Migrated:
    """Ready the database for a service: SQLite's file lock and checks, or PostgreSQL's
    migrations (instances share a PostgreSQL database: nothing to lock). Blocking."""
    if is_postgres(db):
        _require_asyncpg()
        from .postgres_schema import prepare as prepare_postgres

        return prepare_postgres(db)
    from .guard import prepare as prepare_sqlite

    return prepare_sqlite(db)

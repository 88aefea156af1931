"""PostgreSQL migrations: numbered files of their own, safe when instances start at once.

The files are `migrations/postgres/NNNN_name.sql` (shipped in the package like
SQLite's). Each runs in its own transaction, which first takes an advisory
transaction lock, then reads the applied versions again: of several instances
starting together on an empty database, one applies each migration and the others
wait for it and then find it done. A transaction-scoped lock is let go at the
commit, or when the connection dies, so no crashed instance leaves it held. A
database whose schema is newer than this code is refused: the code would not know
its columns. Changes are expand/contract only, so that instances of two versions
can run side by side during a rolling deploy.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import structlog

from .. import migrations
from ..errors import ConfigError

log = structlog.get_logger("progress_sse.store.postgres")

DIRECTORY = migrations.DEFAULT_DIR / "postgres"
# pg_advisory_xact_lock's key: hashtext of a name no other application uses
LOCK_KEY = "hashtext('progress_sse.migrate')"
CONNECT_TIMEOUT_S = 10.0


def is_postgres(db: str) -> bool:
    """A DSN selects PostgreSQL; anything else is a SQLite file."""
    return db.startswith(("postgresql://", "postgres://"))


def redacted(dsn: str) -> str:
    """The DSN without its password, for logs and messages."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


async def migrate(dsn: str, directory: Path = DIRECTORY) -> list[int]:
    """Bring the database up to the newest schema; return the versions applied here."""
    import asyncpg

    known = migrations.available(directory)
    newest = known[-1][0]
    try:
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise ConfigError(f"cannot connect to PostgreSQL at {redacted(dsn)}: {exc}") from None
    applied: list[int] = []
    try:
        for version, path in known:
            async with conn.transaction():
                done = await _versions(conn)
                if done and max(done) > newest:
                    raise ConfigError(
                        f"the PostgreSQL database {redacted(dsn)} has schema version "
                        f"{max(done)}, newer than this code knows ({newest}); upgrade "
                        "progress-sse before using this database")
                if version in done:
                    continue
                try:
                    await conn.execute(path.read_text())
                except asyncpg.PostgresError as exc:
                    raise ConfigError(f"migration postgres/{path.name} failed: {exc}"
                                      ) from None
                await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2, now())",
                                   version, path.name)
            log.info("migration.applied", version=version, name=path.name, dialect="postgres")
            applied.append(version)
    finally:
        await conn.close()
    return applied


async def _versions(conn: object) -> set[int]:
    """Under the lock: the versions applied (creating the table on first use)."""
    import asyncpg

    assert isinstance(conn, asyncpg.Connection)
    await conn.execute(f"SELECT pg_advisory_xact_lock({LOCK_KEY})")
    await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                       " version integer PRIMARY KEY, name text NOT NULL,"
                       " applied_at timestamptz NOT NULL)")
    return {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}


class Migrated:
    """What `prepare` gives a PostgreSQL service in place of SQLite's file lock: nothing
    to hold (any number of instances share the database)."""

    def __init__(self, dsn: str) -> None:
        self.db = dsn

    def release(self) -> None:
        pass

    def __enter__(self) -> Migrated:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        pass


def prepare(dsn: str) -> Migrated:
    """Migrate (blocking: run before the server's loop, or in a thread)."""
    asyncio.run(migrate(dsn))
    return Migrated(dsn)

"""Numbered SQL migrations, applied in order, each once, each in its own transaction.

A new SQLite file is made with `auto_vacuum=INCREMENTAL` (it must be set before the
first table): retention's pruner gives freed pages back to the file system a few at
a time (store/retention.py). A file made before that (migrated to 0002 here) is
switched by one VACUUM right after 0002 is applied: it rewrites the whole file once,
taking time and free disk space in proportion to its size, before the service
serves (logged as migration.vacuumed).
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import structlog

from .errors import ConfigError

log = structlog.get_logger("progress_sse.migrations")

_HERE = Path(__file__).resolve().parent
# a wheel carries the files inside the package (setup.cfg); a checkout has them at its top
DEFAULT_DIR = _HERE / "_migrations" if (_HERE / "_migrations").is_dir() \
    else _HERE.parent / "migrations"
VACUUM_AFTER = 2  # the migration after which a file is switched to incremental vacuum
INCREMENTAL = 2  # PRAGMA auto_vacuum's value for it
_NAME = re.compile(r"^(\d{4})_[\w-]+\.sql$")


def available(directory: Path = DEFAULT_DIR) -> list[tuple[int, Path]]:
    """The migration files, by version."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    if not found:
        raise ConfigError(f"no migrations found in {directory}")
    return found


def migrate_sqlite(db_path: str, directory: Path = DEFAULT_DIR) -> list[int]:
    """Bring the database up to the newest schema; return the versions applied."""
    known = available(directory)
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # a no-op once a table exists
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        newest = known[-1][0]
        if done and max(done) > newest:
            raise ConfigError(
                f"database {db_path} has schema version {max(done)}, newer than this "
                f"code knows ({newest}); upgrade progress-sse before using this database"
            )
        applied = []
        for version, path in known:
            if version in done:
                continue
            sql = path.read_text()
            try:
                conn.execute("BEGIN IMMEDIATE")
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (version, path.name, time.time()),
                )
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise ConfigError(f"migration {path.name} failed: {exc}") from exc
            log.info("migration.applied", version=version, name=path.name)
            applied.append(version)
        if VACUUM_AFTER in applied:
            _incremental(conn, db_path)
        return applied
    finally:
        conn.close()


def _incremental(conn: sqlite3.Connection, db_path: str) -> None:
    """Switch a file made without incremental auto-vacuum to it (one whole VACUUM)."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == INCREMENTAL:
        return
    started = time.monotonic()
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("VACUUM")
    log.info("migration.vacuumed", db=db_path, seconds=round(time.monotonic() - started, 3))


def _statements(sql: str) -> list[str]:
    """Split a script into statements (our migrations hold no literal semicolons)."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]

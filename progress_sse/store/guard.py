"""Opening a database for a service: refuse a file in use or damaged, with a message.

`prepare` takes the file's lock (see lock.py), looks at the file as far as it can
without reading all of it (the header, its size, the schema, the two ends of each
table), and brings the schema up to date; anything wrong is a ConfigError naming
the file and what to do, which the command line prints without a traceback.
Damage deeper in the file is found when it is read (a stream replaying over it
fails and ends, and says so in the log) or by `integrity_problems`, which is
`progress-sse check`: SQLite's own integrity check, on a read-only connection, so
it can run beside the service.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from urllib.parse import quote

from .. import migrations
from ..errors import ConfigError
from .lock import DatabaseLock, lockable

HEADER = b"SQLite format 3\x00"
MIGRATE_HINT = ("The service applies migrations itself when it starts; stop it first to "
                "run `progress-sse migrate`.")


class DatabaseDamaged(ConfigError):
    """The file is not a database, or not a whole one."""


def damaged(db: str, why: str) -> DatabaseDamaged:
    path = os.path.abspath(db)
    return DatabaseDamaged(
        f"the database {path} is damaged ({why}); the service will not start on it. "
        f"Run `progress-sse check --db {path}` to see what is wrong. Restore it from a "
        f"backup, or move it aside (with its -wal and -shm files, if any) to start with "
        f"an empty database.")


def prepare(db: str) -> DatabaseLock:
    """Lock the database for this service, check what can be checked quickly, migrate.
    The lock is returned held; on any refusal it is released."""
    lock = DatabaseLock.acquire(db)
    try:
        migrate(db)
    except BaseException:
        lock.release()
        raise
    return lock


def migrate(db: str) -> list[int]:
    """The quick checks, then the migrations; SQLite's errors as a ConfigError."""
    try:
        quick_check(db)
        return migrations.migrate_sqlite(db)
    except sqlite3.Error as exc:
        raise refusal(db, exc) from None


def refusal(db: str, exc: sqlite3.Error) -> ConfigError:
    """A damaged file for SQLite's corruption codes; else the error as it is."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return damaged(db, str(exc))
    return ConfigError(f"cannot use the database {os.path.abspath(db)}: {exc}")


def quick_check(db: str) -> None:
    """What a damaged file shows without reading it all: not SQLite's header, shorter
    than its header says (a copy cut short), a schema or a table end that cannot be
    read. Raises DatabaseDamaged, or SQLite's error; a missing or empty file is new."""
    if not lockable(db) or not os.path.exists(db) or os.path.getsize(db) == 0:
        return
    with open(db, "rb") as f:
        head = f.read(100)
        size = os.fstat(f.fileno()).st_size
    if len(head) < 100 or not head.startswith(HEADER):
        raise damaged(db, "file is not a database: it does not start with SQLite's header")
    (page_size,) = struct.unpack_from(">H", head, 16)
    page_size = 65536 if page_size == 1 else page_size
    changes, pages = struct.unpack_from(">II", head, 24)
    (valid_for,) = struct.unpack_from(">I", head, 92)
    # the page count is kept only by SQLite 3.7+ and valid while it matches the counter
    if pages and changes == valid_for and size < pages * page_size:
        raise damaged(db, f"the file is {size} bytes, its header says {pages} pages of "
                          f"{page_size}: it was cut short")
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type='table'"
                              " AND rootpage > 0 AND sql NOT LIKE '%WITHOUT ROWID%'"
                              ).fetchall()
        for (name,) in tables:
            quoted = '"' + name.replace('"', '""') + '"'
            for order in ("ASC", "DESC"):
                conn.execute(f"SELECT * FROM {quoted} ORDER BY rowid {order} LIMIT 1"
                             ).fetchall()
    finally:
        conn.close()


def integrity_problems(db: str, quick: bool = False) -> list[str]:
    """SQLite's integrity check (or its quicker quick_check, which skips the indexes'
    agreement with their tables) on a read-only connection; [] when it says ok.
    FileNotFoundError if there is no file."""
    if not os.path.isfile(db):
        raise FileNotFoundError(db)
    uri = f"file:{quote(os.path.abspath(db))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        return [str(exc)]
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        rows = conn.execute("PRAGMA quick_check" if quick else "PRAGMA integrity_check"
                            ).fetchall()
    except sqlite3.Error as exc:
        return [str(exc)]
    finally:
        conn.close()
    problems = [str(row[0]) for row in rows]
    return [] if problems == ["ok"] else problems

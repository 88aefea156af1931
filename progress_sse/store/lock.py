"""One service per SQLite file: an exclusive lock on a file beside the database.

Two services on one file each keep their own memory of the jobs and assign event ids
from their own counter: writes of one fail on the other's ids (UNIQUE constraint),
and a post through the one that missed a job's end writes the job back as it last
knew it (a succeeded job running again, its result gone). So the second refuses to
start. The lock is `flock` on `<db>.lock`, taken before the migrations and held for
the service's life. The kernel lets go of it when the process ends however it ends
(kill -9 too), so it is never stale; the descriptor is not inherited (os.open makes
it close-on-exec), so no child keeps it. The file holds who took it (pid, host, start
time), to name the holder in the refusal; on Linux /proc/locks says which process
holds it now.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

import structlog

from ..errors import ConfigError

log = structlog.get_logger("progress_sse.store.lock")

SERVE_HINT = ("Stop that process first, or give this one a database file of its own "
              "(--db or PROGRESS_SSE_DB).")


class DatabaseInUse(ConfigError):
    """Another process holds the database's lock."""


def lock_path(db: str) -> str:
    """Beside the file itself: two paths to one file (a symlink) share one lock."""
    return os.path.realpath(db) + ".lock"


def lockable(db: str) -> bool:
    """An in-memory database has no file to share."""
    return db not in ("", ":memory:")


class DatabaseLock:
    """The exclusive lock of one database file; `release` (or leaving `with`) lets go."""

    def __init__(self, db: str, fd: int | None) -> None:
        self.db = db
        self._fd = fd

    @classmethod
    def acquire(cls, db: str, hint: str = SERVE_HINT) -> DatabaseLock:
        """Take the lock now or raise DatabaseInUse naming the file and its holder."""
        if not lockable(db):
            return cls(db, None)
        path = lock_path(db)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inheritable (PEP 446)
        except OSError as exc:
            raise ConfigError(f"cannot create the lock file {path} of the database "
                              f"{os.path.abspath(db)}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DatabaseInUse(
                f"the database {os.path.abspath(db)} is in use by another progress-sse "
                f"process: {holder} (lock file {os.path.abspath(path)}). Two processes "
                f"on one SQLite file fail each other's writes and can undo finished jobs. "
                f"{hint}") from None
        except OSError as exc:  # a file system without locks
            os.close(fd)
            raise ConfigError(f"cannot lock {path} for the database {os.path.abspath(db)}: "
                              f"{exc.strerror}") from None
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = f"pid={os.getpid()} host={socket.gethostname()} started={started}\n"
        with contextlib.suppress(OSError):  # who holds it is only for the message
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        log.debug("db.locked", db=db, lock=path)
        return cls(db, fd)

    def release(self) -> None:
        """Let go (once; later calls do nothing). The file stays: removing it would let
        a process that opened it before the removal lock a file nobody else sees."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> DatabaseLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _holder(fd: int) -> str:
    """Who holds the lock, as well as can be told: the pid from the kernel (Linux), the
    host and start time the holder wrote."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 4096, 0).decode()
        fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    kernel = _kernel_holder(fd)
    pid = kernel or fields.get("pid")
    if pid is None:
        return "a process that did not say which (no pid in the lock file)"
    what = f"pid {pid}"
    command = _command(kernel) if kernel else ""  # a pid from the file may be another host's
    if command:
        what += f" ({command})"
    if fields.get("pid") == pid:
        if fields.get("host"):
            what += f" on host {fields['host']}"
        if fields.get("started"):
            what += f", started {fields['started']}"
    return what


def _kernel_holder(fd: int) -> str | None:
    """The pid /proc/locks gives for the flock on this file; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; waiters have "->"
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[4].isdigit() \
                    and parts[5] == dev:
                return parts[4]
    return None


def _command(pid: str) -> str:
    """The holder's command line (Linux, same host), shortened; else ''."""
    with contextlib.suppress(OSError):
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        command = " ".join(raw.decode(errors="replace").split("\0")).strip()
        return command if len(command) <= 160 else command[:157] + "..."
    return ""

"""PostgreSQL for tests: a database of its own per module, service processes, a proxy.

The server is the one at PROGRESS_SSE_TEST_POSTGRES (default 127.0.0.1:5432, trust
auth). Without one the tests are skipped, unless PROGRESS_SSE_REQUIRE_POSTGRES=1
(CI), where they fail saying why. Each module gets a database with a random name,
dropped at its end: NOTIFY channels and advisory locks are per database, and other
users share the server. Outages are a proxy the test controls, never the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from .helpers import ROOT

ADMIN = os.environ.get("PROGRESS_SSE_TEST_POSTGRES",
                       "postgresql://postgres@127.0.0.1:5432/postgres")
PG_HOST, PG_PORT = "127.0.0.1", 5432
# tables `empty` leaves: the applied migrations, and the one-row tables it resets
KEPT = ("schema_migrations", "event_head", "leases", "retention")

T = TypeVar("T")


def blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end on a loop of its own in another thread: from a sync fixture,
    without touching the current thread's event loop (the tests' loop may be set)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def dsn_for(name: str, port: int | None = None) -> str:
    base = ADMIN.rsplit("/", 1)[0]
    if port is not None:
        base = base.replace(f":{PG_PORT}", f":{port}")
    return f"{base}/{name}"


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(ADMIN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _unusable(exc: Exception) -> None:
    why = f"PostgreSQL is not usable at {ADMIN}: {type(exc).__name__}: {exc}"
    if os.environ.get("PROGRESS_SSE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{why} (PROGRESS_SSE_REQUIRE_POSTGRES=1: start it, e.g. "
                    "pg_ctlcluster --skip-systemctl-redirect 15 main start)")
    pytest.skip(why)


async def create_database() -> str:
    """A new empty database (its name); skips or fails when there is no server."""
    name = f"progress_sse_test_{secrets.token_hex(6)}"
    try:
        import asyncpg  # noqa: F401

        await _admin(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        _unusable(exc)
    return name


async def drop_database(name: str) -> None:
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[str]:
    """A database of its own for the block: its DSN."""
    name = await create_database()
    try:
        yield dsn_for(name)
    finally:
        await drop_database(name)


def module_database() -> Iterator[str]:
    """A test module's own database, as a fixture: `pg_dsn = module_fixture()`."""
    name = blocking(create_database())
    try:
        yield dsn_for(name)
    finally:
        blocking(drop_database(name))


async def empty(dsn: str) -> None:
    """Make the database as a new one is once migrated, fast (~15 ms, where creating,
    migrating and dropping a database takes ~0.5 s): migrate (nothing to do after the
    first time), empty every table, reset the head, the leases and the horizon. Fails at once if a
    service left running still holds a table."""
    import asyncpg

    from progress_sse.store.postgres_schema import migrate

    await migrate(dsn)
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        tables = [r[0] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> ALL($1::text[])", list(KEPT))]
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '2s'")
            await conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables)
                               + " RESTART IDENTITY")
            await conn.execute("UPDATE event_head SET head = 0, version = 0")
            await conn.execute("UPDATE leases SET holder = '', until = '-infinity'")
            await conn.execute("UPDATE retention SET horizon = 0, expired = 0, compacted = 0")
    finally:
        await conn.close()


def module_fixture() -> Any:
    """The module-scoped fixture of a database of the module's own (made outside any
    test's event loop)."""
    return pytest.fixture(scope="module", name="pg_dsn")(module_database)


async def query(dsn: str, sql: str, *args: Any) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def stored_ids(dsn: str, job_ids: list[str], after: int = 0) -> list[tuple[int, str]]:
    """The stored log of these jobs after `after`, read from PostgreSQL: (id, job_id)."""
    rows = await query(dsn, "SELECT id, job_id FROM events WHERE job_id = ANY($1::text[])"
                            " AND id > $2 ORDER BY id", job_ids, after)
    return [(r[0], r[1]) for r in rows]


@dataclass
class PgProcess:
    """The service as a separate process on a PostgreSQL DSN, for kill -9."""

    dsn: str
    port: int
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra: str, wait: bool = True) -> None:
        env = {**os.environ, "PROGRESS_SSE_LOG_FORMAT": "json", **self.env}
        self.log_path = self.log_dir / f"service.{self.port}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "progress_sse", "serve", "--port", str(self.port),
                 "--db", self.dsn, *extra], cwd=ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT)
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float = 20) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError("server did not become healthy")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Proxy:
    """A TCP proxy to PostgreSQL that a test can cut (every connection closed, new ones
    refused) and restore, or make drop the connection that sends the next COMMIT:
    before the server gets it ("before") or once it has (answer lost, "after")."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self.on_commit: str | None = None  # "before", "after": once
        self.dropped: list[str] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._pipes):
            w.transport.abort()
        self._pipes.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(PG_HOST, PG_PORT)
        except OSError:
            writer.transport.abort()
            return
        self._pipes |= {writer, up_w}
        await asyncio.gather(self._pipe(reader, up_w, writer, client=True),
                             self._pipe(up_r, writer, up_w, client=False),
                             return_exceptions=True)
        self._pipes -= {writer, up_w}

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    other: asyncio.StreamWriter, client: bool) -> None:
        try:
            while data := await src.read(65536):
                if client and self.on_commit and data.startswith(b"Q") \
                        and b"COMMIT" in data.upper():
                    mode, self.on_commit = self.on_commit, None
                    self.dropped.append(mode)
                    if mode == "after":
                        dst.write(data)
                        await dst.drain()
                        other.transport.abort()  # the client never hears the answer
                        await asyncio.sleep(0.5)  # the server has run the COMMIT
                    dst.transport.abort()
                    other.transport.abort()
                    return
                dst.write(data)
                await dst.drain()
        finally:
            dst.transport.abort()


@contextlib.asynccontextmanager
async def proxy() -> AsyncIterator[Proxy]:
    p = Proxy()
    await p.start()
    try:
        yield p
    finally:
        await p.cut()

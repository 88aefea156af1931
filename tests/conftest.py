"""Fixtures of a service on a store of its own: SQLite, or PostgreSQL where a module
runs on both stores.

A module opts in with `STORES = ("sqlite", "postgres")`: every test of it that asks for
`db` (through `settings`, `service` or `client`) then runs once per store; a test marked
`sqlite_only("why")` runs on SQLite alone. On PostgreSQL the module has a database of
its own (tests/pg.py), emptied before each test (TRUNCATE: ~15 ms, against ~0.5 s for
a database created, migrated and dropped per test).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from progress_sse.logs import configure_logging
from progress_sse.settings import Settings, env_var

from . import pg
from .helpers import Service, start_service

configure_logging("json", "warning")

pg_dsn = pg.module_fixture()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    stores = getattr(metafunc.module, "STORES", ("sqlite",))
    if metafunc.definition.get_closest_marker("sqlite_only") is not None:
        stores = ("sqlite",)
    if "store" in metafunc.fixturenames and len(stores) > 1:
        metafunc.parametrize("store", stores, indirect=True)


@pytest.fixture
def store(request: pytest.FixtureRequest) -> str:
    """Which store the test runs on: "sqlite" unless its module runs on both."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture(autouse=True)
def no_settings_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings(...) reads PROGRESS_SSE_* variables: a test sees none of the shell's."""
    names = {env_var(field) for field in Settings.model_fields}
    for name in list(os.environ):
        if name.upper() in names:
            monkeypatch.delenv(name)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    """A SQLite file (for tests of SQLite itself)."""
    return str(tmp_path / "progress.db")


@pytest.fixture
def db(request: pytest.FixtureRequest, store: str, db_path: str) -> str:
    """The store's `Settings.db`, empty: a SQLite file, or the module's PostgreSQL
    database emptied."""
    if store == "sqlite":
        return db_path
    dsn = str(request.getfixturevalue("pg_dsn"))
    pg.blocking(pg.empty(dsn))
    return dsn


@pytest.fixture
def settings(db: str) -> Settings:
    return Settings(db=db, keepalive_s=15.0)


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Service]:
    svc = await start_service(settings)
    yield svc
    await svc.stop()


@pytest.fixture
async def client(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as c:
        yield c

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from progress_sse.logs import configure_logging
from progress_sse.settings import Settings, env_var

from .helpers import Service, start_service

configure_logging("json", "warning")


@pytest.fixture(autouse=True)
def no_settings_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings(...) reads PROGRESS_SSE_* variables: a test sees none of the shell's."""
    names = {env_var(field) for field in Settings.model_fields}
    for name in list(os.environ):
        if name.upper() in names:
            monkeypatch.delenv(name)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "progress.db")


@pytest.fixture
def settings(db_path: str) -> Settings:
    return Settings(db=db_path, keepalive_s=15.0)


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Service]:
    svc = await start_service(settings)
    yield svc
    await svc.stop()


@pytest.fixture
async def client(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as c:
        yield c


def db_events(path: str, after: int = 0) -> list[dict[str, Any]]:
    """The stored log, read straight from the SQLite file."""
    import json

    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT body FROM events WHERE id > ? ORDER BY id", (after,))
        return [json.loads(r[0]) for r in rows]

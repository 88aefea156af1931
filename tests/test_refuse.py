"""Refusing what would corrupt: a second service on one file, a damaged file, and a
stream whose replay runs into damage in the middle of the log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from progress_sse.store.lock import DatabaseInUse, DatabaseLock

from .helpers import ROOT, ProcessService, aiter_sse_lines, create_job, free_port, wait_for

pytestmark = pytest.mark.slow


def cli(*args: str, within: float = 20) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRESS_SSE_")}
    return subprocess.run([sys.executable, "-m", "progress_sse", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=within)


def serve_once(db: str, within: float = 20) -> tuple[subprocess.CompletedProcess[str], float]:
    """`serve` expected to refuse: its result and how long it took."""
    began = time.monotonic()
    done = cli("serve", "--db", db, "--port", str(free_port()), "--log-format", "json",
               within=within)
    return done, time.monotonic() - began


@pytest.fixture
def first(tmp_path: Path) -> Iterator[ProcessService]:
    svc = ProcessService(db=str(tmp_path / "p.db"), port=free_port())
    svc.start()
    yield svc
    svc.stop()


def pid(svc: ProcessService) -> int:
    assert svc.proc is not None
    return svc.proc.pid


# ---------------------------------------------------------------- one service per file


def test_the_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    """Per open file, so even one process cannot take it twice; a symlink to the
    database is the same database."""
    db = str(tmp_path / "p.db")
    (tmp_path / "link.db").symlink_to(db)
    with DatabaseLock.acquire(db):
        for path in (db, str(tmp_path / "link.db")):
            with pytest.raises(DatabaseInUse, match=f"pid {os.getpid()}"):
                DatabaseLock.acquire(path)
    DatabaseLock.acquire(db).release()  # free again


async def test_a_second_service_on_the_file_refuses_naming_it_and_the_holder(
        first: ProcessService) -> None:
    """It exits quickly, non-zero, with one message (no traceback) naming the database
    and the first service's pid; the first goes on serving, and writes there succeed."""
    async with httpx.AsyncClient(base_url=first.url, timeout=5) as client:
        job = await create_job(client)
        second, took = serve_once(first.db)
        assert second.returncode != 0
        assert took < 10
        out = second.stdout + second.stderr
        assert first.db in out  # absolute: under tmp_path
        assert f"pid {pid(first)}" in out
        assert "Traceback" not in out
        assert "in use" in out
        for i in range(1, 21):
            r = await client.post(f"/api/jobs/{job['id']}/progress",
                                  json={"progress": i, "seq": i})
            assert r.status_code == 200, r.text
        assert (await client.get("/healthz")).status_code == 200


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
async def test_once_the_first_is_gone_a_new_service_starts(first: ProcessService,
                                                           how: int) -> None:
    """The lock goes with its process however it ends."""
    async with httpx.AsyncClient(base_url=first.url, timeout=5) as client:
        job = await create_job(client)
    first.signal(how)
    first.wait()
    first.start()  # raises if it exits instead of becoming healthy
    async with httpx.AsyncClient(base_url=first.url, timeout=5) as client:
        assert (await client.get(f"/api/jobs/{job['id']}")).status_code == 200
    second, _ = serve_once(first.db)  # and the new one holds the lock in turn
    assert second.returncode != 0 and f"pid {pid(first)}" in second.stderr


def test_migrate_refuses_while_a_service_runs(first: ProcessService) -> None:
    """Migrations under a running service would change the schema behind its back."""
    done = cli("migrate", "--db", first.db)
    assert done.returncode != 0
    assert f"pid {pid(first)}" in done.stderr and os.path.abspath(first.db) in done.stderr
    assert "Traceback" not in done.stderr
    first.stop()
    done = cli("migrate", "--db", first.db)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- a damaged file at start


def filled_db(path: Path, rows: int = 2000) -> str:
    """A migrated database with enough events to span a few hundred pages."""
    db = str(path)
    assert cli("migrate", "--db", db).returncode == 0
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO events (id, job_id, owner, kind, type, attempt, seq, body)"
            " VALUES (?, 'j', 'o', 'k', 'progress', 1, ?, ?)",
            [(i, i, "x" * 500) for i in range(1, rows + 1)])
    checkpoint(db)
    return db


def checkpoint(db: str) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def random_bytes(tmp_path: Path) -> str:
    db = tmp_path / "random.db"
    db.write_bytes(os.urandom(20_000))
    return str(db)


def garbled_schema(tmp_path: Path) -> str:
    """SQLite's header intact, the schema page after it overwritten."""
    db = filled_db(tmp_path / "garbled.db")
    with open(db, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * (4096 - 100))  # no page type: SQLite finds it malformed
    return db


def cut_short(tmp_path: Path) -> str:
    """A copy that stopped half-way."""
    db = filled_db(tmp_path / "cut.db")
    os.truncate(db, os.path.getsize(db) // 2)
    return db


@pytest.mark.parametrize("damage", [random_bytes, garbled_schema, cut_short])
def test_a_damaged_file_at_start_is_a_message_not_a_traceback(tmp_path: Path,
                                                                damage: object) -> None:
    assert callable(damage)
    db = damage(tmp_path)
    done, took = serve_once(db)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert took < 15
    assert "Traceback" not in out, out
    assert "damaged" in out and os.path.abspath(db) in out
    assert f"progress-sse check --db {os.path.abspath(db)}" in out  # what to do
    assert "backup" in out


# ---------------------------------------------------------------- progress-sse check


def test_check_reports_ok_damage_and_a_missing_file(tmp_path: Path,
                                                    first: ProcessService) -> None:
    done = cli("check", "--db", first.db)  # read-only: beside the running service
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
    done = cli("check", "--db", first.db, "--quick")
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
    db = filled_db(tmp_path / "mid.db")
    damage_pages(db, middle_leaves(db, "events", 2))
    done = cli("check", "--db", db)
    assert done.returncode == 1
    assert done.stdout.strip() and done.stdout != "ok\n"
    assert "damaged" in done.stderr and "Traceback" not in done.stderr
    done = cli("check", "--db", str(tmp_path / "nothing.db"))
    assert done.returncode == 2 and "no database file" in done.stderr
    assert not (tmp_path / "nothing.db").exists()  # looked at, not created


# ---------------------------------------------------------------- damage mid-log


def middle_leaves(db: str, table: str, count: int) -> list[tuple[int, int]]:
    """`count` leaf pages of the table's b-tree from its middle, in key order: (page
    number, the rowid of its first row), from SQLite's dbstat (ids are 1, 2, 3...)."""
    conn = sqlite3.connect(db)
    try:
        leaves = conn.execute("SELECT pageno, ncell FROM dbstat WHERE name=? AND"
                              " pagetype='leaf' ORDER BY path", (table,)).fetchall()
    finally:
        conn.close()
    assert len(leaves) > 4 * count, leaves
    start = len(leaves) * 3 // 5
    first_ids = [1 + sum(n for _, n in leaves[:i]) for i in range(len(leaves))]
    return [(leaves[i][0], first_ids[i]) for i in range(start, start + count)]


def damage_pages(db: str, pages: list[tuple[int, int]]) -> None:
    conn = sqlite3.connect(db)
    try:
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    with open(db, "r+b") as f:
        for page, _ in pages:
            f.seek((page - 1) * page_size)
            f.write(b"\xff" * page_size)


def log_lines(svc: ProcessService) -> list[dict[str, object]]:
    lines = []
    for line in svc.log_path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


async def read_stream(client: httpx.AsyncClient, last_id: int, within: float = 20
                      ) -> list[int]:
    """The ids sent by /api/events resumed after `last_id`, until the server ends it."""
    ids: list[int] = []
    async with asyncio.timeout(within):
        async with client.stream("GET", "/api/events",
                                 headers={"Last-Event-ID": str(last_id)}) as r:
            assert r.status_code == 200
            async for line in aiter_sse_lines(r):
                if line.startswith("id: "):
                    ids.append(int(line[4:]))
    return ids


async def test_a_replay_that_meets_damage_fails_the_stream_loudly(tmp_path: Path) -> None:
    """A resumed stream whose replay from the store reads a damaged page of the events
    table logs stream.failed with SQLite's error and ends, having sent only events
    before the damage and none after it: the client reconnects from its last id (and
    meets it again) rather than sitting on a stream that looks caught up. The start-up
    checks do not read the whole log, so the service starts; `check` finds it."""
    svc = ProcessService(db=str(tmp_path / "p.db"), port=free_port(),
                         env={"PROGRESS_SSE_TAIL_SIZE": "16"})
    svc.start()
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            jobs = [await create_job(client) for _ in range(4)]

            async def worker(job_id: str) -> None:
                for i in range(1, 626):
                    r = await client.post(f"/api/jobs/{job_id}/progress", json={
                        "progress": i / 10, "seq": i, "message": f"step {i} " + "m" * 300})
                    assert r.status_code == 200, r.text

            await asyncio.gather(*(worker(j["id"]) for j in jobs))
    finally:
        svc.stop()
    checkpoint(svc.db)
    damaged = middle_leaves(svc.db, "events", 3)
    first_bad = damaged[0][1]
    head = 4 + 4 * 625
    assert 1001 < first_bad < head - 200, damaged  # past the first replay batch
    damage_pages(svc.db, damaged)

    svc.start()
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=60) as client:
            assert (await client.get("/healthz")).status_code == 200
            ids = await read_stream(client, 1)
            # everything before the damage that was sent came in order, nothing after it
            assert ids == list(range(2, 2 + len(ids)))
            assert not ids or ids[-1] < first_bad
            await wait_for(lambda: any(e.get("event") == "stream.failed"
                                       for e in log_lines(svc)), what="stream.failed")
            failed = [e for e in log_lines(svc) if e.get("event") == "stream.failed"]
            assert "malformed" in str(failed[0].get("exception")), failed[0]
            # the client's retry from its last id meets the damage again, and is told so
            again = await read_stream(client, ids[-1] if ids else 1)
            assert not again or again[-1] < first_bad
            await wait_for(lambda: sum(e.get("event") == "stream.failed"
                                       for e in log_lines(svc)) >= 2, what="second failure")
        done = cli("check", "--db", svc.db)
        assert done.returncode == 1, done.stdout
    finally:
        svc.stop()

"""Honest health and bounded waits, on a real service and a real SQLite file: a writer
stalled with commits in flight, a database locked by another process, a full disk."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from progress_sse.settings import Settings
from progress_sse.store.sqlite import MAX_FLIGHTS, PROBE_EVERY_S, SQLiteStore

from .helpers import Service, create_job, metric, settings_from_env, start_service, wait_for

DEADLINE = 1.0  # the services' write_timeout_s here
MARGIN = 1.0  # for two shared cores: an answer "within the deadline" takes at most this more


@contextlib.asynccontextmanager
async def running(db: str) -> AsyncIterator[tuple[Service, httpx.AsyncClient]]:
    """The service on `db` with a short write deadline, and a client of it."""
    svc = await start_service(Settings(db=db, write_timeout_s=DEADLINE))
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=30) as client:
            yield svc, client
    finally:
        await svc.stop()


@pytest.fixture
async def service(db_path: str) -> AsyncIterator[tuple[Service, httpx.AsyncClient]]:
    async with running(db_path) as pair:
        yield pair


def store_of(svc: Service) -> SQLiteStore:
    store = svc.ctx.store
    assert isinstance(store, SQLiteStore)
    return store


def stored_seqs(db: str, job_id: str) -> list[int]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT seq FROM events WHERE job_id=? AND seq IS NOT NULL"
                            " ORDER BY id", (job_id,))
        return [r[0] for r in rows]


async def timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = await call
    return r, time.monotonic() - started


async def health_503(client: httpx.AsyncClient, within: float
                     ) -> tuple[dict[str, Any], float, float]:
    """Poll /healthz until it answers 503, each answer within the deadline; the 503's
    body, the time polled until it, and how long that one answer took."""
    started = time.monotonic()
    while True:
        r, took = await timed(client.get("/healthz"))
        assert took < DEADLINE + MARGIN, f"/healthz took {took:.2f} s"
        if r.status_code == 503:
            body: dict[str, Any] = r.json()
            assert body["status"] == "unavailable" and body["reason"], body
            return body, time.monotonic() - started, took
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
        assert time.monotonic() - started < within, "/healthz kept saying ok"
        await asyncio.sleep(0.05)


async def health_ok(client: httpx.AsyncClient) -> bool:
    return (await client.get("/healthz")).status_code == 200


def assert_unavailable(r: httpx.Response, took: float) -> str:
    assert r.status_code == 503, r.text
    assert DEADLINE - 0.05 < took < DEADLINE + MARGIN, took
    assert r.headers["retry-after"] == "1"
    error = r.json()["error"]
    assert error["code"] == "unavailable"
    assert f"within {DEADLINE:g} s" in error["message"]
    message: str = error["message"]
    return message


async def test_a_stalled_writer_bounds_posts_and_fails_health(
        service: tuple[Service, httpx.AsyncClient], db_path: str) -> None:
    """The writer stalled: another process holds the write lock, so the first commit
    waits out the database's busy timeout (5 s, past the deadline) and the rest wait
    behind it. /healthz answers 503 with a reason, each answer within the deadline;
    posts answer 503 at the deadline: those already sent to the writer "may still be
    stored", those still queued "not stored". Once the lock goes, health is 200 again,
    each may-be-stored post is stored exactly once, no not-stored one is, and a retry
    with the same seq gets 200 and makes no duplicate."""
    svc, client = service
    job = await create_job(client)
    path = f"/api/jobs/{job['id']}/progress"
    assert (await client.post(path, json={"progress": 1, "seq": 1})).status_code == 200
    store = store_of(svc)
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        # idle: no write in flight, so health probes the writer, which cannot lock
        body, polled, took = await health_503(client,
                                              within=PROBE_EVERY_S + DEADLINE + MARGIN)
        print(f"\n/healthz with a stalled, idle writer: 503 {polled:.2f} s after the lock,"
              f" that answer took {took:.2f} s ({body['reason']})")
        assert "database is locked" in body["reason"], body
        # posts: the first MAX_FLIGHTS go to the writer in batches of their own (the
        # first waits for the lock, the others behind it), the rest wait in the queue
        posts = []
        for seq in range(2, MAX_FLIGHTS + 4):
            batches = store.batches
            posts.append(asyncio.create_task(timed(client.post(path, json={"seq": seq}))))
            if seq < MAX_FLIGHTS + 2:
                await wait_for(lambda b=batches: store.batches > b, what="a batch sent")
            else:
                await wait_for(lambda s=seq: len(store._queue) >= s - MAX_FLIGHTS - 1,
                               what="a write queued")
        answers = await asyncio.gather(*posts)
        messages = [assert_unavailable(r, t) for r, t in answers]
        sent, queued = messages[:MAX_FLIGHTS], messages[MAX_FLIGHTS:]
        assert all("may still be stored" in m for m in sent), sent
        assert all("was not stored" in m for m in queued), queued
        # with writes unanswered past the deadline, health says so at once
        r, took = await timed(client.get("/healthz"))
        print(f"/healthz with a stalled writer and posts in flight: {r.status_code} in"
              f" {took * 1000:.0f} ms ({r.json().get('reason')})")
        assert r.status_code == 503 and "answered nothing" in r.json()["reason"]
        assert took < 0.5
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, "progress_sse_store_writable") == 0
        assert metric(metrics, "progress_sse_write_timeouts_total") == MAX_FLIGHTS + 2
    finally:
        other.execute("ROLLBACK")
        other.close()
    await wait_for(lambda: health_ok(client), timeout=DEADLINE + 5, what="health 200")
    assert metric((await client.get("/metrics")).text, "progress_sse_store_writable") == 1
    sent_seqs = list(range(2, MAX_FLIGHTS + 2))
    queued_seqs = [MAX_FLIGHTS + 2, MAX_FLIGHTS + 3]
    assert stored_seqs(db_path, job["id"]) == [1, *sent_seqs]  # the queued ones: none
    for seq in sent_seqs:  # the worker's retry settles it: the stored event, once
        r = await client.post(path, json={"seq": seq})
        assert r.status_code == 200 and r.json()["duplicate"] is True, r.text
    for seq in queued_seqs:
        r = await client.post(path, json={"seq": seq})
        assert r.status_code == 200 and r.json()["duplicate"] is False, r.text
    assert stored_seqs(db_path, job["id"]) == [1, *sent_seqs, *queued_seqs]


async def test_a_database_locked_by_another_process(
        service: tuple[Service, httpx.AsyncClient], db_path: str) -> None:
    """Another process holds the write lock: /healthz answers 503 saying the database is
    locked; a post answers 503 at the deadline. Released: health 200, the post is stored
    at most once and its seq retry gets 200 with no duplicate."""
    _, client = service
    job = await create_job(client)
    path = f"/api/jobs/{job['id']}/progress"
    assert (await client.post(path, json={"progress": 1, "seq": 1})).status_code == 200
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        body, _, _ = await health_503(client, within=PROBE_EVERY_S + DEADLINE + MARGIN)
        assert "database is locked" in body["reason"], body
        r, took = await timed(client.post(path, json={"seq": 2}))
        assert "may still be stored" in assert_unavailable(r, took)
        body, _, _ = await health_503(client, within=MARGIN)
        assert any(w in body["reason"] for w in ("answered nothing", "did not answer",
                                                 "locked")), body
    finally:
        other.execute("ROLLBACK")
        other.close()
    await wait_for(lambda: health_ok(client), timeout=DEADLINE + 5, what="health 200")
    assert stored_seqs(db_path, job["id"]) in ([1], [1, 2])
    r = await client.post(path, json={"seq": 2})
    assert r.status_code == 200, r.text
    assert stored_seqs(db_path, job["id"]) == [1, 2]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs of its own: a disk that really fills (needs root and mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> Path:
    """Fill the disk to its last byte."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


async def test_a_full_disk(small_disk: Path) -> None:
    """The disk full: a post answers 503 (not stored), /healthz 503 with the database's
    own error; freed, the seq retry is stored once and health is 200 again."""
    db = str(small_disk / "p.db")
    async with running(db) as (_, client):
        job = await create_job(client)
        path = f"/api/jobs/{job['id']}/log"
        assert (await client.post(path, json={"message": "a", "seq": 1})).status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        filler = fill(small_disk)
        r = await client.post(path, json={"message": "x" * 8000, "seq": 2})
        assert r.status_code == 503, r.text
        assert "database or disk is full" in r.json()["error"]["message"]
        body, _, _ = await health_503(client, within=MARGIN)
        assert "database or disk is full" in body["reason"], body
        assert metric((await client.get("/metrics")).text, "progress_sse_store_writable") == 0
        filler.unlink()
        # no probe short of a real write can tell the disk has room: held until one is
        assert (await client.get("/healthz")).status_code == 503
        assert stored_seqs(db, job["id"]) == [1]
        r = await client.post(path, json={"message": "x" * 8000, "seq": 2})
        assert r.status_code == 200 and r.json()["duplicate"] is False, r.text
        assert (await client.get("/healthz")).status_code == 200
        assert stored_seqs(db, job["id"]) == [1, 2]


async def test_a_failed_commit_is_held_only_so_long(small_disk: Path) -> None:
    """With no write tried after a failed commit, health goes back to probing once the
    hold is over: a load balancer sends traffic again, which tells."""
    db = str(small_disk / "p.db")
    async with running(db) as (svc, client):
        store_of(svc).failed_hold_s = 0.5
        job = await create_job(client)
        filler = fill(small_disk)
        r = await client.post(f"/api/jobs/{job['id']}/log", json={"message": "x" * 8000})
        assert r.status_code == 503
        assert (await client.get("/healthz")).status_code == 503
        filler.unlink()
        await wait_for(lambda: health_ok(client), timeout=5, what="health 200")


def test_write_timeout_is_configured_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """PROGRESS_SSE_WRITE_TIMEOUT_S and `serve --write-timeout`; it must be > 0."""
    from progress_sse.cli import build_parser
    from progress_sse.cli.service import settings_of
    from progress_sse.errors import ConfigError

    assert Settings().write_timeout_s == 5.0
    env = {"PROGRESS_SSE_WRITE_TIMEOUT_S": "2.5"}
    assert settings_from_env(monkeypatch, env).write_timeout_s == 2.5
    args = build_parser().parse_args(["serve", "--write-timeout", "0.5"])
    assert settings_of(args).write_timeout_s == 0.5
    for bad in ("0", "-1", "nan"):
        with pytest.raises(ConfigError, match="write_timeout_s"):
            settings_from_env(monkeypatch, {"PROGRESS_SSE_WRITE_TIMEOUT_S": bad})

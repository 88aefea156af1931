"""The real PostgreSQL server restarted under load (issue 18, "Failures"), and the
writer's connection ended by the server again and again under load.

Two service processes share this module's database; workers post through both and
readers follow the jobs on both while the server is stopped (`pg_ctlcluster ... stop
-m fast`: every session is ended) and started again. Unlike the proxy tests, this one
restarts the server everybody on this machine shares, so it runs only as root with
`pg_ctlcluster` at hand (CI); the tests run one at a time, so no other test is
connected meanwhile, and their databases survive a restart. The server is started
again whatever happens here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from progress_sse.settings import Settings

from .helpers import create_job, free_port, start_service
from .pg import ADMIN, PG_PORT, PgProcess, module_fixture, query

CLUSTER = ["15", "main"]
POSTERS = 6


def _restartable() -> None:
    """Skip (fail with PROGRESS_SSE_REQUIRE_POSTGRES=1) unless this test may restart the
    server the suite uses."""
    why = None
    if shutil.which("pg_ctlcluster") is None:
        why = "pg_ctlcluster is not installed"
    elif os.geteuid() != 0:
        why = "restarting the PostgreSQL server needs root"
    elif f":{PG_PORT}/" not in ADMIN or "127.0.0.1" not in ADMIN:
        why = f"the test server {ADMIN} is not the local cluster {' '.join(CLUSTER)}"
    if why is None:
        return
    if os.environ.get("PROGRESS_SSE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"cannot restart PostgreSQL: {why} (PROGRESS_SSE_REQUIRE_POSTGRES=1)")
    pytest.skip(f"cannot restart PostgreSQL: {why}")


def ctl(action: str, *extra: str) -> None:
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *CLUSTER, action, *extra],
                   check=True, capture_output=True, timeout=60)


def wait_ready(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", str(PG_PORT)],
                               capture_output=True)
        if ready.returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("PostgreSQL did not come back")


module_database = module_fixture()


@pytest.mark.slow
def test_postgresql_restarted_under_load(pg_dsn: str, tmp_path: Path) -> None:
    """During the outage writes answer 503 at once with the JSON error and /healthz says
    503; afterwards both services write again without a restart; every acknowledged post
    is stored once (a post retried with its seq after a 503 is not stored twice); every
    reader's sequence equals the stored log."""
    _restartable()
    a = PgProcess(pg_dsn, free_port(), tmp_path)
    b = PgProcess(pg_dsn, free_port(), tmp_path)
    a.start()
    b.start()
    try:
        asyncio.run(_restart_under_load(pg_dsn, [a.url, b.url]))
    finally:
        a.stop()
        b.stop()
        with contextlib.suppress(subprocess.CalledProcessError):
            ctl("start")  # already running: an error, ignored
        wait_ready()


async def _restart_under_load(dsn: str, urls: list[str]) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        jobs, created = [], []
        for k in range(POSTERS):
            r = await http.post(urls[k % 2] + "/api/jobs", json={"kind": "restart"})
            assert r.status_code == 201, r.text
            jobs.append(r.json()["job"]["id"])
            created.append(r.json()["event_id"])
        stop = asyncio.Event()
        acked: dict[str, list[int]] = {j: [] for j in jobs}
        refused: list[int] = []

        async def poster(k: int) -> None:
            job, seq, turn = jobs[k], 0, k
            while not stop.is_set():
                seq += 1
                while True:  # the same seq until it is acknowledged, as a worker would
                    turn += 1
                    try:
                        r = await http.post(f"{urls[turn % 2]}/api/jobs/{job}/log",
                                            json={"message": f"{k}-{seq}", "seq": seq})
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
                        continue
                    if r.status_code == 200:
                        acked[job].append(seq)
                        break
                    assert r.status_code == 503, r.text
                    refused.append(r.status_code)
                    await asyncio.sleep(0.05)

        async def reader(k: int) -> tuple[list[int], int]:
            seen: list[int] = []
            last, hops = created[k], 0  # everything after the job's creation
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                headers: dict[str, Any] = {"Last-Event-ID": str(last)}
                with contextlib.suppress(httpx.TransportError):
                    async with aconnect_sse(http, "GET",
                                            f"{urls[(k + hops) % 2]}/api/jobs/{jobs[k]}/events",
                                            headers=headers) as src:
                        if src.response.status_code == 200:
                            async for ev in src.aiter_sse():
                                seen.append(int(ev.id))
                                last = int(ev.id)
                                if ev.event == "finished":
                                    return seen, hops
                hops += 1
                await asyncio.sleep(0.1)
            return seen, hops

        readers = [asyncio.create_task(reader(k)) for k in range(POSTERS)]
        posters = [asyncio.create_task(poster(k)) for k in range(POSTERS)]
        await asyncio.sleep(1.5)
        before = sum(map(len, acked.values()))
        await asyncio.to_thread(ctl, "stop", "-m", "fast")
        try:
            await _outage(http, urls, jobs[0])
        finally:
            await asyncio.to_thread(ctl, "start")
            await asyncio.to_thread(wait_ready)
        down_acked = sum(map(len, acked.values()))
        for url in urls:  # both recover by themselves
            await _until(lambda u=url: _status(http, u + "/healthz", 200), 30, "healthz 200")
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*posters), 30)
        after = sum(map(len, acked.values()))
        for k, job in enumerate(jobs):
            r = await http.post(f"{urls[k % 2]}/api/jobs/{job}/finish",
                                json={"status": "succeeded"})
            assert r.status_code == 200, r.text
        results = await asyncio.wait_for(asyncio.gather(*readers), 60)

    assert before > 20 and after > down_acked + 20, (before, down_acked, after)
    assert refused, "no post was refused during the outage"
    for k, job in enumerate(jobs):
        rows = await query(dsn, "SELECT id, seq FROM events WHERE job_id = $1 ORDER BY id", job)
        seqs = [r[1] for r in rows if r[1] is not None]
        assert len(seqs) == len(set(seqs)), f"{job}: a post stored twice"
        assert seqs == acked[job], f"{job}: an acknowledged post lost, or one never answered 200"
        seen, _ = results[k]
        assert rows[0][0] == created[k]
        assert seen == [r[0] for r in rows][1:], f"{job}: the reader's sequence is not the log"


async def _status(http: httpx.AsyncClient, url: str, want: int) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return (await http.get(url, timeout=5)).status_code == want
    return False


async def _until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def _outage(http: httpx.AsyncClient, urls: list[str], job: str) -> None:
    """With the server stopped: /healthz 503 on both, then each write 503 at once, with
    the JSON error."""
    for url in urls:
        await _until(lambda u=url: _status(http, u + "/healthz", 503), 15, "healthz 503")
        for _ in range(3):
            started = time.monotonic()
            r = await http.post(f"{url}/api/jobs/{job}/log", json={"message": "down"})
            took = time.monotonic() - started
            assert r.status_code == 503, r.text
            assert took < 1.0, f"a write during the outage took {took:.2f} s"
            error = r.json()["error"]
            assert error["code"] == "unavailable" and "database" in error["message"], error
            assert r.headers.get("retry-after") == "1"
        health = await http.get(url + "/healthz")
        assert health.status_code == 503 and health.json()["reason"], health.text


async def test_the_writer_survives_its_connection_ended_under_load(pg_dsn: str) -> None:
    """pg_terminate_backend of the writer's connection, five times while 16 workers post:
    each write is answered (200, or 503 for the few in flight), and the writer goes on.
    An ended connection can leave asyncpg mid-operation, so that the COMMIT raised
    InternalClientError, which ended the writer task: every later write then waited for
    its deadline, on every try, until the service was restarted."""
    svc = await start_service(Settings(db=pg_dsn, write_timeout_s=5))
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=30) as client:
            job = await create_job(client, kind="terminate")
            writer = svc.ctx.store._writer  # type: ignore[attr-defined]
            stop = asyncio.Event()
            answers: list[tuple[int, float]] = []

            async def poster() -> None:
                while not stop.is_set():
                    started = time.monotonic()
                    r = await client.post(f"/api/jobs/{job['id']}/log", json={"message": "x"})
                    answers.append((r.status_code, time.monotonic() - started))

            posters = [asyncio.create_task(poster()) for _ in range(16)]
            for _ in range(5):
                await asyncio.sleep(0.4)
                conn = writer.conn
                if conn is not None and not conn.is_closed():
                    await query(pg_dsn, "SELECT pg_terminate_backend($1)",
                                conn.get_server_pid())
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*posters)
            assert not writer._task.done(), "the writer task ended"
            r = await client.post(f"/api/jobs/{job['id']}/log", json={"message": "after"})
            assert r.status_code == 200, r.text
    finally:
        await svc.stop()
    slow = [a for a in answers if a[1] > 2.0]
    assert not slow, f"{len(slow)} writes waited for their deadline: {slow[:3]}"
    assert sum(1 for a in answers if a[0] == 200) > 100
    assert {a[0] for a in answers} <= {200, 503}

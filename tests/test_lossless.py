"""Lossless under load: resuming readers behind a tiny tail while another user storms.

The readers fall behind a 16-event tail between connections, so every resume reads
from the store, while another user opens and closes streams as fast as the service
lets it: their snapshot reads run on the same store at the same moments. Each
reader's sequence must be exactly the stored log it may see.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from progress_sse.auth import mint_token
from progress_sse.settings import Settings

from .helpers import start_service
from .stored import db_events

STORES = ("sqlite", "postgres")  # every test asking for `db` runs on both (conftest.py)
SECRET = "a-test-secret-that-is-long-enough-0123456789"
WORK_S = 6.0  # how long the worker posts at least
MIN_EVENTS = 400  # and until this many are stored (at most 20 s more), so that on a slow
#                   machine too each reader hangs up and resumes often enough
STORMERS = 16  # bob's concurrent open-and-close loops
POSTERS = 4  # concurrent posting loops: the commits that a stale read would miss
BOB_JOBS = 20  # what each of bob's snapshots reads
READERS = 4  # of each kind: unfiltered, filtered by job, per job
READ_S = 40.0  # a reader's deadline to reach the last event
CONNECTION_S = 2.0  # a connection's longest life: the reader then resumes, and sees it is
#                     done even when its last event came before the finish was answered


def bearer(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, sub, 'read create', 600)}"}


async def post_until(client: httpx.AsyncClient, job_ids: list[str], until: float,
                     k: int, more: Callable[[], bool]) -> None:
    """Post to the jobs in turn: progress with a seq from the first poster, log lines;
    until `until`, and then while `more()` says so for at most 20 s."""
    seq = 0
    while time.monotonic() < until or (more() and time.monotonic() < until + 20):
        for job_id in job_ids:
            if seq % 7 == 6 or k:
                r = await client.post(f"/api/jobs/{job_id}/log", json={"message": f"l{seq}"})
            else:
                r = await client.post(f"/api/jobs/{job_id}/progress",
                                      json={"progress": min(99.0, seq / 50), "seq": seq})
            assert r.status_code == 200, r.text
        seq += 1


async def resuming_reader(client: httpx.AsyncClient, path: str, params: dict[str, Any],
                          start: int, done: Callable[[int], bool], rng: random.Random
                          ) -> tuple[list[int], int]:
    """Read a few events, hang up, pause long enough to fall behind the tail, resume;
    until the last event or the deadline (what it saw by then is compared). Counts the
    hang-ups after a few events, not the connections that ended at CONNECTION_S."""
    seen: list[int] = []
    last = start
    reconnects = 0
    deadline = time.monotonic() + READ_S
    while not done(last) and time.monotonic() < deadline:
        budget = rng.randint(1, 25)
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(deadline - time.monotonic(), CONNECTION_S)), \
                    aconnect_sse(client, "GET", path, params=params, headers=headers) as src:
                if src.response.status_code == 204:
                    return seen, reconnects
                assert src.response.status_code == 200, await src.response.aread()
                async for ev in src.aiter_sse():
                    assert ev.data and ev.id, f"an event without data or id: {ev}"
                    assert ev.event != "snapshot", "a resume started over"
                    seen.append(int(ev.id))
                    last = int(ev.id)
                    budget -= 1
                    if budget == 0:
                        reconnects += 1
                    if budget == 0 or done(last):
                        break
        await asyncio.sleep(rng.uniform(0.05, 0.3))  # the tail moves on meanwhile
    return seen, reconnects


async def storm(client: httpx.AsyncClient, stop: asyncio.Event, opened: list[int]) -> None:
    """Open a stream, take its snapshot, close it; again, until told to stop."""
    while not stop.is_set():
        async with asyncio.timeout(10), aconnect_sse(client, "GET", "/api/events") as src:
            if src.response.status_code == 429:
                await src.response.aread()
                continue
            async for ev in src.aiter_sse():
                if ev.event == "snapshot":
                    opened[0] += 1
                    break


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
async def test_resuming_readers_lose_nothing_during_a_stream_storm(
        settings: Settings, seed: int) -> None:
    """Readers resuming from the store (unfiltered, filtered by job, per job) see exactly
    the stored log while another user opens and closes streams without pause."""
    settings = settings.model_copy(update={"jwt_secret": SECRET, "auth": "jwt", "tail_size": 16,
                                           "replay_batch": 40,
                                           "max_streams_per_user": STORMERS})
    svc = await start_service(settings)
    rng = random.Random(seed)
    stop = asyncio.Event()
    opened = [0]
    stormers: list[asyncio.Task[None]] = []
    try:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=svc.url, timeout=30, limits=limits,
                                     headers=bearer("alice")) as alice, \
                httpx.AsyncClient(base_url=svc.url, timeout=30, limits=limits,
                                  headers=bearer("bob")) as bob:
            for i in range(BOB_JOBS):  # bob's snapshots have something to read
                r = await bob.post("/api/jobs", json={"kind": "b", "title": f"bob {i}",
                                                      "meta": {"note": "x" * 500}})
                assert r.status_code == 201
            ids = []
            for i in range(2):
                r = await alice.post("/api/jobs", json={"kind": "a", "title": f"a {i}"})
                assert r.status_code == 201
                ids.append(r.json()["job"]["id"])
            start = svc.ctx.hub.head
            final: dict[str, int] = {}  # each job's finished event, once posted

            def after_job(*job_ids: str) -> Callable[[int], bool]:
                return lambda last: all(j in final for j in job_ids) \
                    and last >= max(final[j] for j in job_ids)

            stormers = [asyncio.create_task(storm(bob, stop, opened)) for _ in range(STORMERS)]
            kinds = {"all": ("/api/events", {}, after_job(*ids)),
                     "job filter": ("/api/events", {"job": ids[0]}, after_job(ids[0])),
                     "per job": (f"/api/jobs/{ids[1]}/events", {}, after_job(ids[1]))}
            readers = {
                (name, n): asyncio.create_task(resuming_reader(
                    alice, path, params, start, done, random.Random(rng.random())))
                for name, (path, params, done) in kinds.items() for n in range(READERS)}
            until = time.monotonic() + WORK_S
            def more() -> bool:
                return svc.ctx.hub.head - start < MIN_EVENTS

            await asyncio.gather(*(post_until(alice, ids, until, k, more)
                                   for k in range(POSTERS)))
            for job_id in ids:
                r = await alice.post(f"/api/jobs/{job_id}/finish", json={"status": "succeeded"})
                assert r.status_code == 200, r.text
                final[job_id] = r.json()["job"]["final_event_id"]
            results = {name: await task for name, task in readers.items()}
            stop.set()
            await asyncio.gather(*stormers)
    finally:
        for task in stormers:
            task.cancel()
        await asyncio.gather(*stormers, return_exceptions=True)
        await svc.stop()

    stored = [e for e in await db_events(settings.db, after=start) if e["job_id"] in ids]
    expected = {
        "all": [e["id"] for e in stored],
        "job filter": [e["id"] for e in stored if e["job_id"] == ids[0]],
        "per job": [e["id"] for e in stored if e["job_id"] == ids[1]],
    }
    assert opened[0] > 100, "the storm did not happen"
    for (name, _), (seen, reconnects) in results.items():
        assert reconnects > 5, f"{name}: the reader did not resume often enough"
        last = seen[-1] if seen else start
        skipped = sorted(set(e for e in expected[name] if e <= last) - set(seen))
        assert not skipped, f"{name}: skipped {len(skipped)} stored events, e.g. {skipped[:5]}"
        assert last == expected[name][-1], f"{name}: did not reach the end in {READ_S} s"
        assert seen == expected[name], f"{name}: events repeated or out of order"

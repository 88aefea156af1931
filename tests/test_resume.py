"""Lossless: readers that drop at random points and resume see exactly the stored log."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from progress_sse.settings import Settings

from .helpers import Service, create_job, relay_send, start_service
from .stored import db_events

STORES = ("sqlite", "postgres")  # every test asking for `db` runs on both (conftest.py)
JOBS = 4
POSTS_PER_JOB = 150
READERS = 6


async def worker(client: httpx.AsyncClient, job_id: str, rng: random.Random) -> None:
    for i in range(POSTS_PER_JOB):
        if i % 10 == 9:
            r = await client.post(f"/api/jobs/{job_id}/log", json={"message": f"line {i}"})
        else:
            r = await client.post(f"/api/jobs/{job_id}/progress",
                                  json={"progress": i * 100 / POSTS_PER_JOB, "seq": i})
        assert r.status_code == 200, r.text
        if rng.random() < 0.2:
            await asyncio.sleep(rng.random() * 0.005)
    r = await client.post(f"/api/jobs/{job_id}/finish", json={"status": "succeeded"})
    assert r.status_code == 200


async def reader(client: httpx.AsyncClient, path: str, params: dict[str, Any],
                 start: int | None, stop_after: int, rng: random.Random
                 ) -> tuple[list[int], int]:
    """Read, hanging up after a random number of events, and resume from the last id."""
    seen: list[int] = []
    last = start
    reconnects = 0
    while True:
        headers = {"Accept": "text/event-stream"}
        if last is not None:
            headers["Last-Event-ID"] = str(last)
        budget = rng.randint(1, 40)
        async with aconnect_sse(client, "GET", path, params=params, headers=headers) as src:
            if src.response.status_code == 204:
                return seen, reconnects
            async for ev in src.aiter_sse():
                assert ev.data and ev.id, f"an event without data or id: {ev}"
                if ev.event == "snapshot":
                    last = int(ev.id)
                    continue
                seen.append(int(ev.id))
                last = int(ev.id)
                budget -= 1
                if budget == 0:
                    break  # drop the connection mid-stream
                if last >= stop_after:
                    return seen, reconnects
        reconnects += 1
        if last is not None and last >= stop_after:
            return seen, reconnects
        if rng.random() < 0.3:
            await asyncio.sleep(rng.random() * 0.02)


@pytest.fixture(params=["httptools", "h11", "relayed"])
async def service(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Service]:
    """The service under uvicorn's httptools protocol (pushed chunks go straight to the
    transport), its h11 protocol (through its send, run without a task) and a relayed
    send standing for another server (a catch-up task for each push)."""
    if request.param == "relayed":
        svc = await start_service(settings, wrap=relay_send)
    else:
        svc = await start_service(settings, http=request.param)
    yield svc
    await svc.stop()


async def test_readers_resuming_at_random_points_lose_nothing(service: Service) -> None:
    """Concurrent workers; readers drop and resume; each sees the stored log exactly,
    under each of the three ways a stream writes."""
    rng = random.Random(1234)
    async with httpx.AsyncClient(base_url=service.url, timeout=20,
                                 limits=httpx.Limits(max_connections=50)) as client:
        jobs = [await create_job(client, kind="k", title=f"job {i}", queue=f"q{i}")
                for i in range(JOBS)]
        start_head = len(jobs)
        total = start_head + JOBS * (POSTS_PER_JOB + 1)
        readers = [
            asyncio.create_task(reader(client, "/api/events", {}, start_head, total,
                                       random.Random(rng.random())))
            for _ in range(READERS)
        ]
        per_job = [
            asyncio.create_task(reader(client, f"/api/jobs/{j['id']}/events", {}, 1, 10**9,
                                       random.Random(rng.random())))
            for j in jobs[:2]
        ]
        await asyncio.gather(*(worker(client, j["id"], random.Random(i))
                               for i, j in enumerate(jobs)))
        async with asyncio.timeout(30):
            results = await asyncio.gather(*readers)
            job_results = await asyncio.gather(*per_job)

    stored = await db_events(service.settings.db)
    stored_ids = [e["id"] for e in stored]
    assert stored_ids == list(range(1, total + 1))  # contiguous, in commit order
    for seen, reconnects in results:
        assert seen == stored_ids[start_head:], "a reader lost, repeated or reordered events"
        assert reconnects > 3  # the readers really did drop and resume
    for job, (seen, _) in zip(jobs[:2], job_results, strict=True):
        expected = [e["id"] for e in stored if e["job_id"] == job["id"] and e["id"] > 1]
        assert seen == expected
        assert stored[seen[-1] - 1]["type"] == "finished"


async def test_lagging_reader_reads_from_store_beyond_the_tail(settings: Settings) -> None:
    """A reader far behind a small in-memory tail reads on from the store, in order."""
    svc = await start_service(settings.model_copy(update={"tail_size": 16, "replay_batch": 7}))
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=20) as client:
            job = await create_job(client)
            for i in range(200):
                await client.post(f"/api/jobs/{job['id']}/progress", json={"progress": i / 2})
            assert svc.ctx.hub.after(1, 10) is None  # the tail no longer reaches back
            seen: list[int] = []
            async with asyncio.timeout(20), \
                    aconnect_sse(client, "GET", "/api/events",
                                 headers={"Last-Event-ID": "1"}) as src:
                async for ev in src.aiter_sse():
                    assert ev.data and ev.id, f"an event without data or id: {ev}"
                    seen.append(int(ev.id))
                    if len(seen) == 200:
                        break
            assert seen == list(range(2, 202))
    finally:
        await svc.stop()

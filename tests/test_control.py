"""Cancel, pause, resume, requeue; idempotent and fenced worker posts; stalled workers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import httpx

from progress_sse.settings import Settings

from .conftest import db_events
from .helpers import Service, create_job, start_service, wait_for


async def post(client: httpx.AsyncClient, job_id: str, what: str, **body: Any) -> httpx.Response:
    return await client.post(f"/api/jobs/{job_id}/{what}", json=body)


async def test_cancel_queued_job_is_immediate(client: httpx.AsyncClient) -> None:
    """A queued job is cancelled at once with a finished event."""
    job = await create_job(client)
    r = await post(client, job["id"], "cancel", reason="not needed")
    assert r.status_code == 200
    assert r.json()["job"]["status"] == "cancelled"
    events = (await client.get(f"/api/jobs/{job['id']}/events")).json()["events"]
    assert [e["type"] for e in events] == ["created", "finished"]
    assert events[-1]["reason"] == "not needed"


async def test_cancel_running_job_waits_for_the_worker(client: httpx.AsyncClient) -> None:
    """A running job goes to cancelling; the worker learns it from its next post and agrees."""
    job = await create_job(client)
    await post(client, job["id"], "progress", progress=10)
    r = await post(client, job["id"], "cancel")
    assert r.status_code == 202
    assert r.json()["job"]["status"] == "cancelling"
    again = await post(client, job["id"], "cancel")  # harmless
    assert again.status_code == 202
    worker = await post(client, job["id"], "progress", progress=20)
    assert worker.json()["control"]["cancel_requested"] is True
    done = await post(client, job["id"], "finish", status="cancelled")
    assert done.json()["job"]["status"] == "cancelled"
    late = await post(client, job["id"], "cancel")
    assert late.status_code == 409
    types = [e["type"] for e in (await client.get(f"/api/jobs/{job['id']}/events")).json()
             ["events"]]
    assert types == ["created", "progress", "status", "progress", "finished"]


async def test_long_poll_wakes_on_cancel(client: httpx.AsyncClient) -> None:
    """A worker's long-poll returns as soon as a cancel is requested."""
    job = await create_job(client)
    await post(client, job["id"], "progress", progress=5)
    poll = asyncio.create_task(client.get(f"/api/jobs/{job['id']}/control",
                                          params={"wait": 10}))
    await asyncio.sleep(0.05)
    assert not poll.done()
    started = time.monotonic()
    await post(client, job["id"], "cancel")
    r = await asyncio.wait_for(poll, 5)
    assert time.monotonic() - started < 2
    assert r.json()["control"]["cancel_requested"] is True


async def test_long_poll_returns_unchanged_state_after_wait(client: httpx.AsyncClient) -> None:
    """With nothing requested, the long-poll answers the unchanged state after `wait`."""
    job = await create_job(client)
    await post(client, job["id"], "progress", progress=5)
    started = time.monotonic()
    r = await client.get(f"/api/jobs/{job['id']}/control", params={"wait": 0.3})
    assert 0.25 < time.monotonic() - started < 3
    assert r.json()["control"] == {"cancel_requested": False, "pause_requested": False,
                                   "reason": None, "status": "running", "attempt": 1}
    bad = await client.get(f"/api/jobs/{job['id']}/control", params={"wait": 10_000})
    assert bad.status_code == 400
    assert bad.json()["error"]["field"] == "wait"


async def test_pause_then_resume(client: httpx.AsyncClient) -> None:
    """Pause is requested, acknowledged by the worker, then lifted; viewers see each step."""
    job = await create_job(client)
    await post(client, job["id"], "progress", progress=30)
    r = await post(client, job["id"], "pause", reason="maintenance")
    assert (r.status_code, r.json()["job"]["pause_requested"]) == (202, True)
    ack = await post(client, job["id"], "progress", paused=True)
    assert ack.json()["job"]["status"] == "paused"
    poll = asyncio.create_task(client.get(f"/api/jobs/{job['id']}/control",
                                          params={"wait": 10, "pause_requested": "true"}))
    await asyncio.sleep(0.05)
    assert not poll.done()
    r = await post(client, job["id"], "resume")
    assert r.json()["job"]["pause_requested"] is False
    assert (await asyncio.wait_for(poll, 5)).json()["control"]["pause_requested"] is False
    back = await post(client, job["id"], "progress", progress=40)
    assert back.json()["job"]["status"] == "running"
    statuses = [(e.get("status"), e.get("requested")) for e in
                (await client.get(f"/api/jobs/{job['id']}/events")).json()["events"]
                if e["type"] == "status"]
    assert statuses == [("running", "pause"), ("paused", None), ("paused", "resume"),
                        ("running", None)]


async def test_pause_of_queued_job_and_cancel_while_paused(client: httpx.AsyncClient) -> None:
    """A queued job pauses at once and resumes to queued; a cancel of it is immediate."""
    job = await create_job(client)
    r = await post(client, job["id"], "pause")
    assert r.json()["job"]["status"] == "paused"
    r = await post(client, job["id"], "resume")
    assert r.json()["job"]["status"] == "queued"
    await post(client, job["id"], "pause")
    r = await post(client, job["id"], "cancel")
    assert r.json()["job"]["status"] == "cancelled"


async def test_duplicate_seq_stores_nothing_and_answers_the_original(
        client: httpx.AsyncClient, service: Service) -> None:
    """A retried post (same seq) answers the stored event and stores nothing."""
    job = await create_job(client)
    first = await post(client, job["id"], "progress", progress=10, seq=1)
    await post(client, job["id"], "progress", progress=20, seq=2)
    before = db_events(service.settings.db)
    retry = await post(client, job["id"], "progress", progress=10, seq=1)
    assert retry.status_code == 200
    assert retry.json()["duplicate"] is True
    assert retry.json()["event_id"] == first.json()["event_id"]
    assert db_events(service.settings.db) == before
    gap = await post(client, job["id"], "log", message="x", seq=2)  # seq 2 was a progress
    assert gap.json()["duplicate"] is True


async def test_stale_attempt_is_409_and_requeue_starts_a_new_one(
        client: httpx.AsyncClient, service: Service) -> None:
    """After a requeue, the old attempt's worker is refused; the new one posts."""
    job = await create_job(client)
    await post(client, job["id"], "progress", progress=50, attempt=1, seq=1)
    await post(client, job["id"], "finish", status="failed", error="oom", attempt=1, seq=2)
    r = await post(client, job["id"], "requeue", reason="retry")
    assert r.json()["job"]["attempt"] == 2
    assert r.json()["job"]["status"] == "queued"
    assert r.json()["job"]["progress"] == 0
    before = db_events(service.settings.db)
    zombie = await post(client, job["id"], "progress", progress=90, attempt=1, seq=3)
    assert zombie.status_code == 409
    assert zombie.json()["error"]["code"] == "stale_attempt"
    assert db_events(service.settings.db) == before
    future = await post(client, job["id"], "progress", progress=90, attempt=3)
    assert future.status_code == 409
    fresh = await post(client, job["id"], "progress", progress=5, attempt=2, seq=1)
    assert fresh.status_code == 200
    assert fresh.json()["duplicate"] is False  # seq counts again from the new attempt
    succeeded = await create_job(client)
    await post(client, succeeded["id"], "finish", status="succeeded")
    assert (await post(client, succeeded["id"], "requeue")).status_code == 409


async def test_silent_worker_makes_job_stalled_and_a_post_clears_it(settings: Settings) -> None:
    """A running job without posts for its heartbeat timeout is stalled until it posts."""
    svc = await start_service(replace(settings, stall_check_s=0.05))
    try:
        async with httpx.AsyncClient(base_url=svc.url) as client:
            job = await create_job(client, heartbeat_timeout_s=1)
            quiet = await create_job(client, heartbeat_timeout_s=60)
            await post(client, job["id"], "progress", progress=10)
            await post(client, quiet["id"], "progress", progress=10)

            async def stalled() -> bool:
                r = await client.get(f"/api/jobs/{job['id']}")
                return bool(r.json()["job"]["stalled"])

            await wait_for(stalled, timeout=5, what="job stalled")
            assert not (await client.get(f"/api/jobs/{quiet['id']}")).json()["job"]["stalled"]
            hb = await post(client, job["id"], "heartbeat")
            assert hb.json()["job"]["stalled"] is False
            events = (await client.get(f"/api/jobs/{job['id']}/events")).json()["events"]
            flags = [e.get("stalled") for e in events if e["type"] == "status"]
            assert flags == [True, False]
    finally:
        await svc.stop()


async def test_heartbeat_stores_no_event(client: httpx.AsyncClient, service: Service) -> None:
    """A heartbeat of a healthy running job changes nothing viewers see."""
    job = await create_job(client)
    await post(client, job["id"], "progress", progress=10)
    before = db_events(service.settings.db)
    r = await post(client, job["id"], "heartbeat")
    assert r.status_code == 200
    assert r.json()["event_id"] is None
    assert db_events(service.settings.db) == before

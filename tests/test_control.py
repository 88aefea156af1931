"""Cancel, pause, resume, requeue; idempotent and fenced worker posts; stalled workers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from progress_sse import control_rules, jobs, worker_rules
from progress_sse.settings import Settings

from .helpers import Service, create_job, start_service, wait_for
from .stored import db_events

STORES = ("sqlite", "postgres")  # every test asking for `db` runs on both (conftest.py)


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
    before = await db_events(service.settings.db)
    retry = await post(client, job["id"], "progress", progress=10, seq=1)
    assert retry.status_code == 200
    assert retry.json()["duplicate"] is True
    assert retry.json()["event_id"] == first.json()["event_id"]
    assert await db_events(service.settings.db) == before
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
    before = await db_events(service.settings.db)
    zombie = await post(client, job["id"], "progress", progress=90, attempt=1, seq=3)
    assert zombie.status_code == 409
    assert zombie.json()["error"]["code"] == "stale_attempt"
    assert await db_events(service.settings.db) == before
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
    svc = await start_service(settings.model_copy(update={"stall_check_s": 0.05}))
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
    before = await db_events(service.settings.db)
    r = await post(client, job["id"], "heartbeat")
    assert r.status_code == 200
    assert r.json()["event_id"] is None
    assert await db_events(service.settings.db) == before


async def test_force_cancel_closes_at_once_and_refuses_the_worker(
        client: httpx.AsyncClient) -> None:
    """'Close anyway': a job stuck in cancelling, a running and a paused job end cancelled
    at once, saying no worker agreed; the worker's later posts are refused (409)."""
    stuck = await create_job(client)
    await post(client, stuck["id"], "progress", progress=10)
    assert (await post(client, stuck["id"], "cancel")).status_code == 202
    r = await post(client, stuck["id"], "cancel", force=True)
    assert r.status_code == 200, r.text
    job = r.json()["job"]
    assert (job["status"], job["cancel_requested"]) == ("cancelled", False)
    assert job["control_reason"] == "closed by a viewer without the worker's acknowledgement"
    assert job["finished_at"] is not None and job["eta_s"] is None
    events = (await client.get(f"/api/jobs/{stuck['id']}/events")).json()["events"]
    assert events[-1]["type"] == "finished"
    assert (events[-1]["status"], events[-1]["forced"]) == ("cancelled", True)
    for what, body in (("progress", {"progress": 20}), ("heartbeat", {}),
                       ("finish", {"status": "succeeded"})):
        late = await post(client, stuck["id"], what, **body)
        assert late.status_code == 409, (what, late.text)
    assert (await post(client, stuck["id"], "cancel", force=True)).status_code == 409

    running = await create_job(client)
    await post(client, running["id"], "progress", progress=30)
    r = await post(client, running["id"], "cancel", force=True, reason="worker host is gone")
    assert r.status_code == 200
    assert r.json()["job"]["control_reason"] == (
        "closed by a viewer without the worker's acknowledgement: worker host is gone")

    paused = await create_job(client)
    await post(client, paused["id"], "progress", progress=30)
    await post(client, paused["id"], "pause")
    await post(client, paused["id"], "progress", paused=True)
    r = await post(client, paused["id"], "cancel", force=True)
    assert r.json()["job"]["status"] == "cancelled"

    queued = await create_job(client)
    r = await post(client, queued["id"], "cancel", force=True)
    assert r.json()["job"]["status"] == "cancelled"

    # without force, as before; force is a cancel's field only
    plain = await create_job(client)
    await post(client, plain["id"], "progress", progress=10)
    assert (await post(client, plain["id"], "cancel", force=False)).status_code == 202
    bad = await post(client, plain["id"], "pause", force=True)
    assert (bad.status_code, bad.json()["error"]["field"]) == (400, "force")


async def test_unanswered_cancel_ends_cancelled_after_the_heartbeat_timeout(
        settings: Settings) -> None:
    """A cancel that a silent worker never acknowledges ends `cancelled` after the job's
    heartbeat timeout, saying so; a worker still heartbeating is left to finish."""
    svc = await start_service(settings.model_copy(update={"stall_check_s": 0.05}))
    try:
        async with httpx.AsyncClient(base_url=svc.url) as client:
            gone = await create_job(client, heartbeat_timeout_s=1)
            alive = await create_job(client, heartbeat_timeout_s=1)
            for job in (gone, alive):
                await post(client, job["id"], "progress", progress=10)
                assert (await post(client, job["id"], "cancel")).status_code == 202

            async def closed() -> bool:
                await post(client, alive["id"], "heartbeat")
                r = await client.get(f"/api/jobs/{gone['id']}")
                return bool(r.json()["job"]["status"] == "cancelled")

            started = time.monotonic()
            await wait_for(closed, timeout=10, what="the unanswered cancel to end")
            assert time.monotonic() - started > 0.8  # not before the timeout
            job = (await client.get(f"/api/jobs/{gone['id']}")).json()["job"]
            assert job["control_reason"] == "the worker did not answer the cancel within 1 s"
            assert (job["cancel_requested"], job["stalled"]) == (False, False)
            events = (await client.get(f"/api/jobs/{gone['id']}/events")).json()["events"]
            assert events[-1]["type"] == "finished"
            assert (events[-1]["status"], events[-1]["timed_out"]) == ("cancelled", True)
            late = await post(client, gone["id"], "finish", status="cancelled")
            assert late.status_code == 409

            await post(client, alive["id"], "heartbeat")
            await asyncio.sleep(0.5)  # past its timeout too, but its worker speaks
            assert (await client.get(f"/api/jobs/{alive['id']}")).json()["job"]["status"] \
                == "cancelling"
    finally:
        await svc.stop()


def test_cancel_timeout_rule_and_documents_stored_before_it() -> None:
    """The rule: asked longer ago than the timeout and the worker silent as long. A job
    stored before `cancel_requested_at` existed loads and times out from its last change."""
    job, _ = worker_rules.create_job(
        worker_rules.NewJob("j", "o", "k", "t", "default", (), None, {}, 10.0, "h"), 0.0)
    job, _ = worker_rules.heartbeat(job, None, 1.0)
    job, _ = control_rules.request_cancel(job, None, 5.0)
    assert job.cancel_requested_at == 5.0
    assert not control_rules.cancel_timed_out(job, 14.0)  # asked 9 s ago
    assert control_rules.cancel_timed_out(job, 15.5)  # asked 10.5 s ago, silent for 14.5 s
    spoke, _ = worker_rules.heartbeat(job, None, 12.0)
    assert not control_rules.cancel_timed_out(spoke, 15.5)  # the worker is alive
    assert control_rules.expire_cancel(spoke, 15.5) == (spoke, [])
    ended, drafts = control_rules.expire_cancel(job, 15.5)
    assert ended.status == "cancelled" and ended.finished_at == 15.5
    assert [d.type for d in drafts] == ["finished"]

    private = job.private()
    for name in ("cancel_requested_at", "paused_s", "paused_at"):
        del private[name]
    old = jobs.Job.from_record(job.public(5.0), private)
    assert (old.cancel_requested_at, old.paused_s, old.paused_at) == (None, 0.0, None)
    assert not control_rules.cancel_timed_out(old, 14.0)
    assert control_rules.cancel_timed_out(old, 15.5)

"""The worker SDK against a real server: the block's outcomes, control, throttling, retries.

The sync SDK blocks, and the in-process server runs on the test's event loop, so sync
workers run in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from progress_sse.client import (
    APIError,
    AsyncProgressClient,
    Cancelled,
    NotRecorded,
    ProgressClient,
    StaleAttemptError,
)
from progress_sse.settings import Settings

from .helpers import Service, create_job, stored_log, wait_for

STAGES = [{"key": "fetch", "label": "Fetch", "weight": 1},
          {"key": "encode", "label": "Encode", "weight": 3}]


@pytest.fixture
def settings(db_path: str) -> Settings:
    """Check for stalled workers often, so the heartbeat test is quick."""
    return Settings(db=db_path, keepalive_s=15.0, stall_check_s=0.1)


async def job_status(client: httpx.AsyncClient, job_id: str) -> str:
    r = await client.get(f"/api/jobs/{job_id}")
    assert r.status_code == 200, r.text
    status: str = r.json()["job"]["status"]
    return status


def progress_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "progress"]


class Recorder(httpx.HTTPTransport):
    """A real transport that records requests and can lose answers or fake a 503."""

    def __init__(self, lose_answer: frozenset[int] = frozenset(),
                 unavailable: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.requests: list[httpx.Request] = []
        self.lose_answer = lose_answer  # numbers of progress posts whose answer is lost
        self.unavailable = unavailable  # numbers of progress posts answered 503 unsent
        self.progress_posts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "POST" and request.url.path.endswith("/progress"):
            self.progress_posts += 1
            if self.progress_posts in self.unavailable:
                return httpx.Response(503, json={"error": {"code": "unavailable",
                                                           "message": "try later"}})
            if self.progress_posts in self.lose_answer:
                response = super().handle_request(request)
                response.read()
                response.close()
                raise httpx.ReadError("connection reset", request=request)
        return super().handle_request(request)

    def posts(self, suffix: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "POST" and r.url.path.endswith(suffix)]


# ---------------------------------------------------------------- outcomes


async def test_sync_job_succeeds_through_its_stages(service: Service,
                                                    client: httpx.AsyncClient) -> None:
    """A sync block creates the job, reports every stage, and leaving it finishes succeeded."""

    def work() -> str:
        with ProgressClient(service.url, max_rate=None) as pc, \
                pc.job(kind="video", title="intro.mp4", stages=STAGES) as job:
            job.stage("fetch")
            job.progress(50, message="half fetched")
            job.stage("encode")
            for i in range(4):
                job.progress(current=i + 1, total=4, message=f"chunk {i + 1}")
                job.checkpoint()
            job.result = {"url": "s3://bucket/intro.mp4"}
        assert job.status == "succeeded"
        assert job.id is not None
        return job.id

    job_id = await asyncio.to_thread(work)
    events = await stored_log(client, job_id)
    assert [e.get("stage") for e in progress_events(events) if "stage" in e] == \
        ["fetch", "encode"]
    assert progress_events(events)[-1]["job"]["current"] == 4
    assert events[-1]["type"] == "finished"
    assert events[-1]["job"]["status"] == "succeeded"
    assert events[-1]["job"]["result"] == {"url": "s3://bucket/intro.mp4"}
    assert events[-1]["job"]["kind"] == "video"


async def test_async_job_succeeds_through_its_stages(service: Service,
                                                     client: httpx.AsyncClient) -> None:
    """The async client has the same shape and the same outcome."""
    async with AsyncProgressClient(service.url, max_rate=None) as pc:
        async with pc.job(kind="pdf", title="report.pdf", stages=STAGES) as job:
            await job.stage("fetch")
            await job.stage("encode", message="encoding")
            for i in range(3):
                await job.progress(current=i + 1, total=3)
                await job.checkpoint()
    assert job.status == "succeeded" and job.id is not None
    events = await stored_log(client, job.id)
    assert events[-1]["job"]["status"] == "succeeded"
    assert events[-1]["job"]["progress"] == 100.0
    assert progress_events(events)[-1]["job"]["current"] == 3


async def test_exception_in_block_fails_job_with_its_message(
        service: Service, client: httpx.AsyncClient) -> None:
    """An exception leaving the block finishes the job failed with its message, and propagates."""
    ids: list[str] = []

    def work() -> None:
        with ProgressClient(service.url, max_rate=None) as pc, pc.job(kind="import") as job:
            assert job.id is not None
            ids.append(job.id)
            job.progress(30)
            raise ValueError("row 17: bad date '2024-13-01'")

    with pytest.raises(ValueError, match="row 17"):
        await asyncio.to_thread(work)
    events = await stored_log(client, ids[0])
    assert events[-1]["type"] == "finished"
    assert events[-1]["job"]["status"] == "failed"
    assert events[-1]["job"]["error"] == "row 17: bad date '2024-13-01'"
    assert any(e["type"] == "log" and e["level"] == "error" and "ValueError" in e["message"]
               for e in events)


async def test_async_exception_in_block_fails_job(service: Service,
                                                  client: httpx.AsyncClient) -> None:
    """An exception in an async block fails the job the same way."""
    async with AsyncProgressClient(service.url, max_rate=None) as pc:
        with pytest.raises(RuntimeError):
            async with pc.job(kind="export") as job:
                await job.progress(10)
                raise RuntimeError("disk full")
    assert job.id is not None
    assert (await client.get(f"/api/jobs/{job.id}")).json()["job"]["error"] == "disk full"
    assert await job_status(client, job.id) == "failed"


# ---------------------------------------------------------------- control


async def test_cancel_mid_loop_finishes_cancelled(service: Service,
                                                  client: httpx.AsyncClient) -> None:
    """A cancel requested mid-loop raises Cancelled at the next checkpoint: the job is cancelled."""
    ids: list[str] = []
    done = []

    def work() -> str | None:
        with ProgressClient(service.url, control_max_age=0.05) as pc, \
                pc.job(kind="video") as job:
            assert job.id is not None
            ids.append(job.id)
            for i in range(1000):
                job.progress(current=i, total=1000)
                job.checkpoint()
                time.sleep(0.01)
            done.append(True)  # the loop ran out: the cancel was never seen
        return job.status

    worker = asyncio.create_task(asyncio.to_thread(work))
    await wait_for(lambda: bool(ids), what="job created")

    async def running() -> bool:
        return await job_status(client, ids[0]) == "running"

    await wait_for(running, what="job running")
    r = await client.post(f"/api/jobs/{ids[0]}/cancel", json={"reason": "user asked"})
    assert r.status_code in (200, 202), r.text
    status = await asyncio.wait_for(worker, 10)
    assert status == "cancelled" and not done
    assert await job_status(client, ids[0]) == "cancelled"


async def test_async_cancel_mid_loop_finishes_cancelled(service: Service,
                                                        client: httpx.AsyncClient) -> None:
    """The async checkpoint obeys a cancel the same way, and the block swallows Cancelled."""
    async with AsyncProgressClient(service.url, control_max_age=0.05) as pc:
        async with pc.job(kind="video") as job:
            assert job.id is not None
            for i in range(1000):
                await job.progress(current=i, total=1000)
                if i == 5:
                    r = await client.post(f"/api/jobs/{job.id}/cancel")
                    assert r.status_code == 202, r.text
                await job.checkpoint()
                await asyncio.sleep(0.01)
            pytest.fail("the cancel was never seen")
    assert job.status == "cancelled"
    assert await job_status(client, job.id) == "cancelled"


async def test_pause_then_resume_via_checkpoint(service: Service,
                                                client: httpx.AsyncClient) -> None:
    """checkpoint() acknowledges a pause, blocks until resume, then the job runs on to success."""
    ids: list[str] = []
    count = [0]

    def work() -> None:
        with ProgressClient(service.url, control_max_age=0.05) as pc, pc.job() as job:
            assert job.id is not None
            ids.append(job.id)
            for i in range(30):
                job.progress(current=i + 1, total=30)
                job.checkpoint()
                count[0] += 1
                time.sleep(0.01)

    worker = asyncio.create_task(asyncio.to_thread(work))
    await wait_for(lambda: count[0] >= 3, what="worker running")
    job_id = ids[0]
    assert (await client.post(f"/api/jobs/{job_id}/pause")).status_code == 202

    async def paused() -> bool:
        return await job_status(client, job_id) == "paused"

    await wait_for(paused, what="worker acknowledged the pause")
    held = count[0]
    await asyncio.sleep(0.3)  # a paused worker makes no progress in this window
    assert count[0] == held
    assert (await client.post(f"/api/jobs/{job_id}/resume")).status_code == 200
    await asyncio.wait_for(worker, 10)
    assert count[0] == 30
    changes = [(e["previous"], e["status"]) for e in await stored_log(client, job_id)
               if e["type"] == "status" and e["previous"] != e["status"]]
    assert changes == [("running", "paused"), ("paused", "running")]
    assert await job_status(client, job_id) == "succeeded"


async def test_async_cancel_while_paused(service: Service, client: httpx.AsyncClient) -> None:
    """A cancel requested while the worker waits in a pause ends the wait and the job."""
    async with AsyncProgressClient(service.url, control_max_age=0.0) as pc:
        async with pc.job() as job:
            assert job.id is not None
            await job.progress(10)
            await client.post(f"/api/jobs/{job.id}/pause")

            async def cancel_once_paused() -> None:
                await wait_for(lambda: job.status == "paused", what="pause acknowledged")
                await client.post(f"/api/jobs/{job.id}/cancel")

            canceller = asyncio.create_task(cancel_once_paused())
            with pytest.raises(Cancelled):
                await asyncio.wait_for(job.checkpoint(), 10)
            await canceller
            raise Cancelled(job.id)
    assert await job_status(client, job.id) == "cancelled"


async def test_requeued_job_fences_off_the_old_worker(service: Service,
                                                      client: httpx.AsyncClient) -> None:
    """After a requeue the old attempt's posts raise StaleAttemptError and it finishes nothing."""
    async with AsyncProgressClient(service.url) as pc:
        with pytest.raises(StaleAttemptError):
            async with pc.job() as job:
                assert job.id is not None
                await job.progress(10)
                await client.post(f"/api/jobs/{job.id}/cancel")
                await client.post(f"/api/jobs/{job.id}/requeue")
                await job.stage("anything")
    r = (await client.get(f"/api/jobs/{job.id}")).json()["job"]
    assert (r["status"], r["attempt"]) == ("queued", 2)


# ---------------------------------------------------------------- throttling


async def test_throttling_keeps_last_value_and_every_stage_change(
        service: Service, client: httpx.AsyncClient) -> None:
    """At most max_rate posts per second, yet each stage's last value and every stage is stored."""
    stages = ["a", "b", "c"]
    rate = 10.0

    def work() -> tuple[str, float]:
        with ProgressClient(service.url, max_rate=rate) as pc, pc.job(stages=stages) as job:
            started = time.monotonic()
            for key in stages:
                job.stage(key)
                for i in range(1, 201):
                    job.progress(current=i, total=200, message=f"{key} {i}")
            job.log("all stages done")
        assert job.id is not None
        return job.id, time.monotonic() - started

    job_id, elapsed = await asyncio.to_thread(work)
    events = [e for e in await stored_log(client, job_id) if e["type"] != "created"]
    assert len(events) <= elapsed * rate + 1, (len(events), elapsed)
    stage_of: str | None = None
    last: dict[str, str] = {}
    for e in events:
        if e["type"] == "progress":
            stage_of = e.get("stage", stage_of)
            if "message" in e and stage_of is not None:
                last[stage_of] = e["message"]
    assert [e["stage"] for e in events if "stage" in e] == stages
    assert last == {"a": "a 200", "b": "b 200", "c": "c 200"}
    assert [e["type"] for e in events[-2:]] == ["log", "finished"]


async def test_throttled_value_is_sent_without_another_call(
        service: Service, client: httpx.AsyncClient) -> None:
    """A value held back by the throttle goes out on its own once the interval has passed."""
    ids: list[str] = []
    release = threading.Event()

    def work() -> None:
        with ProgressClient(service.url, max_rate=4) as pc, pc.job() as job:
            assert job.id is not None
            ids.append(job.id)
            job.progress(10)
            job.progress(20, message="held back")
            release.wait(10)

    worker = asyncio.create_task(asyncio.to_thread(work))
    await wait_for(lambda: bool(ids), what="job created")

    async def stored() -> bool:
        return any(e.get("message") == "held back" for e in await stored_log(client, ids[0]))

    try:
        await wait_for(stored, timeout=3, what="the held-back value to be posted")
    finally:
        release.set()
        await worker


async def test_async_throttling_sends_latest_value_before_finish(
        service: Service, client: httpx.AsyncClient) -> None:
    """The async client also flushes the newest throttled value before finishing."""
    async with AsyncProgressClient(service.url, max_rate=5) as pc:
        async with pc.job() as job:
            for i in range(1, 101):
                await job.progress(i / 2, message=f"step {i}")
    assert job.id is not None
    progress = progress_events(await stored_log(client, job.id))
    assert len(progress) <= 3  # the first value at once, the newest before the finish
    assert progress[-1]["message"] == "step 100"
    assert progress[-1]["job"]["progress"] == 50.0


# ---------------------------------------------------------------- retries, attach, heartbeat


async def test_retried_post_with_same_seq_is_stored_once(service: Service,
                                                          client: httpx.AsyncClient) -> None:
    """A post whose answer was lost is retried with its seq and stored once; a 503 is retried."""
    transport = Recorder(lose_answer=frozenset({1}), unavailable=frozenset({3}))

    def work() -> str:
        with ProgressClient(service.url, max_rate=None, backoff=0.01, transport=transport) as pc, \
                pc.job() as job:
            job.progress(10, message="first")
            job.progress(20, message="second")
        assert job.id is not None
        return job.id

    job_id = await asyncio.to_thread(work)
    sent = [json.loads(r.content) for r in transport.posts("/progress")]
    assert [b["seq"] for b in sent] == [1, 1, 2, 2]
    messages = [e.get("message") for e in progress_events(await stored_log(client, job_id))]
    assert messages == ["first", "second"]
    assert await job_status(client, job_id) == "succeeded"


async def test_attach_with_worker_token(service: Service, client: httpx.AsyncClient) -> None:
    """A worker attaches to a producer's job and authenticates its posts with the worker token."""
    r = await client.post("/api/jobs", json={"kind": "pdf", "title": "scan.pdf",
                                             "stages": STAGES})
    job_id, token = r.json()["job"]["id"], r.json()["worker_token"]
    transport = Recorder()

    def work() -> None:
        with ProgressClient(service.url, transport=transport) as pc, \
                pc.attach(job_id, token=token) as job:
            assert job.attempt == 1
            job.stage("fetch", progress=100)
            job.stage("encode")
            job.progress(50)

    await asyncio.to_thread(work)
    posts = transport.posts("/progress") + transport.posts("/finish")
    assert posts and all(p.headers["authorization"] == f"Bearer {token}" for p in posts)
    assert await job_status(client, job_id) == "succeeded"


async def test_attach_to_job_cancelled_while_queued_skips_it(
        service: Service, client: httpx.AsyncClient) -> None:
    """A worker that attaches to a job cancelled while queued is told so and posts nothing."""
    job = await create_job(client, kind="export")
    await client.post(f"/api/jobs/{job['id']}/cancel")
    async with AsyncProgressClient(service.url) as pc:
        async with pc.attach(job["id"]) as handle:
            assert handle.cancel_requested
            await handle.checkpoint()
            pytest.fail("checkpoint should have raised Cancelled")
    assert [e["type"] for e in await stored_log(client, job["id"])] == ["created", "finished"]


async def test_heartbeat_keeps_a_busy_worker_from_stalling(
        service: Service, client: httpx.AsyncClient) -> None:
    """A worker busy for longer than its heartbeat timeout is kept alive by the background beat."""
    transport = Recorder()
    ids: list[str] = []
    release = threading.Event()

    def work() -> None:
        with ProgressClient(service.url, transport=transport) as pc, \
                pc.job(heartbeat_timeout_s=1) as job:
            assert job.id is not None
            ids.append(job.id)
            job.progress(5, message="starting a long step")
            release.wait(10)  # busy: no posts of its own

    worker = asyncio.create_task(asyncio.to_thread(work))
    beats: Callable[[], bool] = lambda: len(transport.posts("/heartbeat")) >= 4  # noqa: E731
    try:
        await wait_for(beats, timeout=5, what="four heartbeats (longer than the timeout)")
    finally:
        release.set()
        await worker
    events = await stored_log(client, ids[0])
    assert not any(e.get("stalled") for e in events), events
    assert events[-1]["job"]["status"] == "succeeded"


@pytest.mark.parametrize("error", [
    APIError(409, "stale_attempt", "attempt 1 was superseded", "attempt"),
    StaleAttemptError(409, "stale_attempt", "superseded"),
    NotRecorded("j1", status="succeeded", progress_posts=2, log_lines=1, dropped_logs=0,
                waited=30.0),
    Cancelled("j1", "user asked"),
])
def test_errors_survive_pickling(error: Exception) -> None:
    """Celery and ARQ pickle a task's exception: the SDK's must come back whole (they
    have constructors a plain unpickle cannot call)."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert back.__dict__ == error.__dict__

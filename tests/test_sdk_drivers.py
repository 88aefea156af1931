"""One scenario, both drivers: behaviour that tests/test_client.py and test_sdk_outage.py
check with one driver only, run here against the sync and the async driver alike.

The scenarios are written once, async. For the sync driver each of the handle's calls
runs in a worker thread (`asyncio.to_thread`), since the in-process server runs on the
test's event loop: the sync Job itself, its locks and its background thread, are what
is tested.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import httpx
import pytest

from progress_sse.client import (
    AsyncProgressClient,
    Cancelled,
    Job,
    NotRecorded,
    ProgressClient,
    StaleAttemptError,
)
from progress_sse.client.flow import Send, Sleep

from .helpers import Service, create_job, stored_log, wait_for
from .test_sdk_outage import FakeService

DRIVERS = ["sync", "async"]
CALLS = frozenset({"progress", "stage", "log", "checkpoint", "finish", "refresh"})


class SyncJob:
    """A sync Job awaited like an AsyncJob: each call in a worker thread."""

    def __init__(self, job: Job) -> None:
        object.__setattr__(self, "_job", job)

    async def __aenter__(self) -> SyncJob:
        await asyncio.to_thread(self._job.__enter__)
        return self

    async def __aexit__(self, *exc: Any) -> bool:
        return await asyncio.to_thread(self._job.__exit__, *exc)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._job, name)
        return functools.partial(asyncio.to_thread, attr) if name in CALLS else attr

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._job, name, value)


class SyncClient:
    """A ProgressClient opened and closed like an AsyncProgressClient."""

    def __init__(self, pc: ProgressClient) -> None:
        self._pc = pc

    async def __aenter__(self) -> SyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._pc.close()

    def job(self, **spec: Any) -> SyncJob:
        return SyncJob(self._pc.job(**spec))

    def attach(self, job_id: str, **kw: Any) -> SyncJob:
        return SyncJob(self._pc.attach(job_id, **kw))


def open_client(driver: str, url: str, **options: Any) -> Any:
    if driver == "sync":
        return SyncClient(ProgressClient(url, **options))
    return AsyncProgressClient(url, **options)


async def job_status(client: httpx.AsyncClient, job_id: str) -> str:
    status: str = (await client.get(f"/api/jobs/{job_id}")).json()["job"]["status"]
    return status


@pytest.mark.parametrize("driver", DRIVERS)
async def test_pause_then_resume_via_checkpoint(driver: str, service: Service,
                                                client: httpx.AsyncClient) -> None:
    """checkpoint() acknowledges a pause, waits until resume, then the job runs on."""
    count = [0]
    ids: list[str] = []

    async def work() -> None:
        async with open_client(driver, service.url, control_max_age=0.05) as pc, \
                pc.job() as job:
            ids.append(job.id)
            for i in range(30):
                await job.progress(current=i + 1, total=30)
                await job.checkpoint()
                count[0] += 1
                await asyncio.sleep(0.01)

    worker = asyncio.create_task(work())
    await wait_for(lambda: count[0] >= 3, what="worker running")
    assert (await client.post(f"/api/jobs/{ids[0]}/pause")).status_code == 202

    async def paused() -> bool:
        return await job_status(client, ids[0]) == "paused"

    await wait_for(paused, what="worker acknowledged the pause")
    held = count[0]
    await asyncio.sleep(0.3)
    assert count[0] == held
    assert (await client.post(f"/api/jobs/{ids[0]}/resume")).status_code == 200
    await asyncio.wait_for(worker, 10)
    assert count[0] == 30
    assert await job_status(client, ids[0]) == "succeeded"


@pytest.mark.parametrize("driver", DRIVERS)
async def test_cancel_while_paused(driver: str, service: Service,
                                   client: httpx.AsyncClient) -> None:
    """A cancel requested while the worker waits in a pause ends the wait and the job."""
    async with open_client(driver, service.url, control_max_age=0.0) as pc, pc.job() as job:
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


@pytest.mark.parametrize("driver", DRIVERS)
async def test_requeued_job_fences_off_the_old_worker(driver: str, service: Service,
                                                      client: httpx.AsyncClient) -> None:
    """After a requeue the old attempt's posts raise StaleAttemptError; it finishes nothing."""
    async with open_client(driver, service.url) as pc:
        with pytest.raises(StaleAttemptError):
            async with pc.job() as job:
                await job.progress(10)
                await client.post(f"/api/jobs/{job.id}/cancel")
                await client.post(f"/api/jobs/{job.id}/requeue")
                await job.stage("anything")
    r = (await client.get(f"/api/jobs/{job.id}")).json()["job"]
    assert (r["status"], r["attempt"]) == ("queued", 2)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_throttling_sends_latest_value_before_finish(driver: str, service: Service,
                                                           client: httpx.AsyncClient) -> None:
    """Throttled values merge; the newest is flushed before the finish."""
    async with open_client(driver, service.url, max_rate=5) as pc, pc.job() as job:
        for i in range(1, 101):
            await job.progress(i / 2, message=f"step {i}")
        job.result = {"steps": 100}
    progress = [e for e in await stored_log(client, job.id) if e["type"] == "progress"]
    assert len(progress) <= 3
    assert progress[-1]["message"] == "step 100"
    finished = (await stored_log(client, job.id))[-1]
    assert finished["job"]["status"] == "succeeded"
    assert finished["job"]["result"] == {"steps": 100}


@pytest.mark.parametrize("driver", DRIVERS)
async def test_attach_to_job_cancelled_while_queued_skips_it(
        driver: str, service: Service, client: httpx.AsyncClient) -> None:
    """A worker that attaches to a job cancelled while queued is told so and posts nothing."""
    job = await create_job(client, kind="export")
    await client.post(f"/api/jobs/{job['id']}/cancel")
    async with open_client(driver, service.url) as pc, pc.attach(job["id"]) as handle:
        assert handle.cancel_requested
        await handle.checkpoint()
        pytest.fail("checkpoint should have raised Cancelled")
    assert [e["type"] for e in await stored_log(client, job["id"])] == ["created", "finished"]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_outbox_keeps_newest_progress_and_a_bounded_log_in_order(driver: str) -> None:
    """While unreachable the outbox merges progress and bounds the log; back, it all
    arrives in call order (see test_sdk_outage for the sync original)."""
    fake = FakeService()
    async with open_client(driver, "http://fake", transport=httpx.MockTransport(fake),
                           max_rate=None, backoff=0.01, max_buffered_logs=3) as pc, \
            pc.job() as job:
        await job.progress(1)
        fake.down = True
        await job.progress(2)
        await job.log("a")
        await job.progress(3)
        await job.progress(4)
        for line in "bcde":
            await job.log(line)
        await job.progress(5)
        assert job.unreachable and job.dropped_logs == 2
        assert job.pending == 7
        fake.down = False
        await wait_for(lambda: job.pending == 0 and not job.unreachable, timeout=10,
                       what="the outbox flushed")
    dropped = "2 log lines dropped while the service was unreachable (the worker's buffer " \
              "was full)"
    assert fake.summary() == [("progress", 1), ("progress", 2), ("log", dropped),
                              ("progress", 4), ("log", "c"), ("log", "d"), ("log", "e"),
                              ("progress", 5), ("finish", "succeeded")]
    assert fake.sent_seqs.count(2) >= 2
    assert fake.sent_seqs == sorted(fake.sent_seqs)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_finish_gives_up_after_finish_timeout(driver: str) -> None:
    """Unreachable for longer than `finish_timeout`: leaving the block raises NotRecorded
    naming what was not recorded (see test_sdk_outage for the async original)."""
    fake = FakeService()
    started = 0.0
    with pytest.raises(NotRecorded) as caught:
        async with open_client(driver, "http://fake", transport=httpx.MockTransport(fake),
                               max_rate=None, backoff=0.01, finish_timeout=0.5) as pc, \
                pc.job() as job:
            await job.progress(10)
            fake.down = True
            await job.log("encoder warmed up")
            await job.progress(20)
            await job.progress(30)
            await job.checkpoint()
            started = time.monotonic()
    assert 0.5 <= time.monotonic() - started < 5
    err = caught.value
    assert (err.status, err.progress_posts, err.log_lines) == ("succeeded", 1, 1)
    assert fake.summary() == [("progress", 10)]


class Faulty(FakeService):
    """The fake service, recording every request, that can lose the answer of a
    progress post (stored, then the connection resets), answer 503 without storing it,
    or be interrupted (a BaseException) while the job is created."""

    def __init__(self, lose_answer: frozenset[int] = frozenset(),
                 unavailable: frozenset[int] = frozenset(), interrupt_create: bool = False
                 ) -> None:
        super().__init__()
        self.lose_answer = lose_answer  # numbers of progress posts whose answer is lost
        self.unavailable = unavailable  # numbers of progress posts answered 503
        self.interrupt_create = interrupt_create
        self.requests: list[tuple[str, str]] = []
        self.progress_posts = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        if request.url.path == "/api/jobs" and self.interrupt_create:
            raise Interrupted
        if request.url.path.endswith("/progress"):
            self.progress_posts += 1
            if self.progress_posts in self.unavailable:
                return httpx.Response(503, json={"error": {"code": "unavailable",
                                                           "message": "try later"}})
            if self.progress_posts in self.lose_answer:
                super().__call__(request)
                raise httpx.ReadError("connection reset", request=request)
        return super().__call__(request)

    def posts(self, suffix: str) -> int:
        return sum(m == "POST" and p.endswith(suffix) for m, p in self.requests)


class Interrupted(BaseException):
    """Stands for Ctrl-C (a KeyboardInterrupt would stop the test's event loop)."""


@pytest.mark.parametrize("driver", DRIVERS)
async def test_lost_answer_is_resent_with_its_seq_and_a_503_retried(driver: str) -> None:
    """A post whose answer was lost is sent again with its seq (stored once); a 503 is
    retried (see test_client for the sync original against the real service)."""
    fake = Faulty(lose_answer=frozenset({1}), unavailable=frozenset({3}))
    async with open_client(driver, "http://fake", transport=httpx.MockTransport(fake),
                           max_rate=None, backoff=0.01) as pc, pc.job() as job:
        await job.progress(10, message="first")
        await job.progress(20, message="second")
    assert fake.progress_posts == 4  # seq 1 twice, seq 2 answered 503, then again
    assert fake.sent_seqs == [1, 1, 2, 3]  # (the fake does not read a 503's body)
    assert fake.summary() == [("progress", 10), ("progress", 20), ("finish", "succeeded")]
    assert not job.unreachable


@pytest.mark.parametrize("driver", DRIVERS)
async def test_interrupted_create_cancels_the_job(driver: str) -> None:
    """Interrupted while creating its job, the worker cancels it, so it is not left
    queued with nobody to run it."""
    fake = Faulty(interrupt_create=True)
    with pytest.raises(Interrupted):
        async with open_client(driver, "http://fake",
                               transport=httpx.MockTransport(fake)) as pc, pc.job():
            pytest.fail("the block must not run")
    assert fake.requests[0] == ("POST", "/api/jobs")
    assert fake.requests[1][0] == "POST" and fake.requests[1][1].endswith("/cancel")


@pytest.mark.parametrize("driver", DRIVERS)
async def test_heartbeat_beats_while_the_worker_is_busy(driver: str) -> None:
    """A worker busy with no posts of its own is kept alive by the background: first a
    progress event, then heartbeats (see test_client for the sync original)."""
    fake = Faulty()
    async with open_client(driver, "http://fake", transport=httpx.MockTransport(fake),
                           heartbeat_interval=0.05) as pc, pc.job():
        await wait_for(lambda: fake.posts("/heartbeat") >= 4, timeout=5,
                       what="four heartbeats")
    assert fake.summary()[0] == ("progress", None)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_throttled_value_is_sent_without_another_call(
        driver: str, service: Service, client: httpx.AsyncClient) -> None:
    """A value held back by the throttle goes out by itself once the interval has passed
    (see test_client for the sync original)."""
    async with open_client(driver, service.url, max_rate=4, heartbeat_interval=30) as pc, \
            pc.job() as job:
        await wait_for(lambda: job.seq == 1 and job.pending == 0,
                       what="the background's first event recorded")
        await job.progress(10)  # then its next round is 30 s away
        await job.progress(20, message="held back")

        async def stored() -> bool:
            return any(e.get("message") == "held back"
                       for e in await stored_log(client, job.id))

        await wait_for(stored, timeout=3, what="the held-back value to be posted")


def test_a_request_flow_is_driven_by_hand_without_io() -> None:
    """The retry policy is the core's, not a driver's: its flow asks for a send, a 503
    makes it ask for a sleep (at least the Retry-After), then the answer is its result."""
    pc = ProgressClient("http://nowhere", retries=2, backoff=0.01)
    flow = pc._request("GET", "/api/jobs/j_1")
    send = next(flow)
    assert isinstance(send, Send) and (send.method, send.path) == ("GET", "/api/jobs/j_1")
    busy = httpx.Response(503, headers={"retry-after": "3"}, request=httpx.Request("GET", "/"))
    wait = flow.send(busy)
    assert isinstance(wait, Sleep) and wait.seconds >= 3
    assert flow.send(None) == send
    with pytest.raises(StopIteration) as done:
        flow.send(httpx.Response(200, json={"job": {"id": "j_1"}}))
    assert done.value.value == {"job": {"id": "j_1"}}
    pc.close()

"""ARQ functions tracked with progress_job: a real service, the real Redis, a real arq worker.

Each test has a queue of its own in Redis database 3, and deletes the keys it made.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.jobs import Job as ArqJob
from arq.jobs import JobStatus

from progress_sse.auth import mint_token
from progress_sse.client import APIError, AsyncJob, AsyncProgressClient
from progress_sse.integrations.arq import Handover, enqueue, handover_key, progress_job
from progress_sse.settings import Settings
from tests import arq_worker
from tests.helpers import ROOT, ProcessService, Service, free_port, start_service, wait_for

REDIS_DB = 3


@dataclass
class Arq:
    """One test's ARQ: its queue, a pool on it, and the workers it started."""

    queue: str
    pool: ArqRedis
    tmp: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)

    def start_worker(self, service_url: str, settings: str = "tests.arq_worker.WorkerSettings",
                     cwd: Path = ROOT, **env: str) -> subprocess.Popen[bytes]:
        """An `arq` worker process on this queue, reporting to the service."""
        log = open(self.tmp / f"worker-{len(self.workers)}.log", "ab")
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("arq")), settings],
            cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PROGRESS_SSE_URL": service_url,
                 "ARQ_TEST_QUEUE": self.queue, "ARQ_TEST_REDIS_DB": str(REDIS_DB), **env})
        log.close()
        self.workers.append(proc)
        return proc

    def log(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.tmp.glob("worker-*.log")))

    async def enqueue(self, function: Any, *args: Any, **kwargs: Any) -> ArqJob:
        job = await enqueue(self.pool, function, *args, _queue_name=self.queue, **kwargs)
        assert job is not None
        self.job_ids.append(job.job_id)
        return job


@pytest.fixture
async def arq(tmp_path: Path, service: Service) -> AsyncIterator[Arq]:
    """Torn down before the service, so that stopping workers can still report."""
    queue = f"arq:test-{uuid.uuid4().hex[:12]}"
    pool = await create_pool(RedisSettings(database=REDIS_DB), default_queue_name=queue)
    ctx = Arq(queue, pool, tmp_path)
    try:
        yield ctx
    finally:
        for proc in ctx.workers:
            await _stop(proc)
        keys = [queue, f"{queue}:health-check"]
        for job_id in ctx.job_ids:
            keys += [f"arq:{kind}:{job_id}" for kind in ("job", "result", "retry", "in-progress")]
            keys.append(handover_key(job_id))
        await pool.delete(*keys)
        if ctx.job_ids:
            await pool.zrem("arq:abort", *ctx.job_ids)
        await pool.aclose()


async def _stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL after 10 s; waited for off the loop, where the service runs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return await asyncio.to_thread(proc.wait, 5)


@pytest.fixture
async def pc(service: Service) -> AsyncIterator[AsyncProgressClient]:
    async with AsyncProgressClient(service.url) as client:
        yield client


async def _job(pc: AsyncProgressClient, job_id: str) -> dict[str, Any]:
    return await pc.get(job_id)


async def _until(pc: AsyncProgressClient, job_id: str, check: Callable[[dict[str, Any]], bool],
                 arq: Arq, timeout: float = 20.0, what: str = "") -> dict[str, Any]:
    """Wait until the job satisfies `check`; the job then. The worker's log on failure."""
    seen: dict[str, Any] = {}

    async def ok() -> bool:
        nonlocal seen
        try:
            seen = await pc.get(job_id)
        except Exception:  # not created yet
            return False
        return check(seen)

    try:
        await wait_for(ok, timeout=timeout, interval=0.05, what=what or f"job {job_id}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the job: {seen}; the worker: {arq.log()[-3000:]}") from exc
    return seen


def _finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


async def _history(pc: AsyncProgressClient, job_id: str) -> list[dict[str, Any]]:
    answer = await pc.request("GET", f"/api/jobs/{job_id}/events", params={"limit": "1000"})
    events: list[dict[str, Any]] = answer["events"]
    return events


def _statuses(events: list[dict[str, Any]]) -> list[str]:
    """The job's statuses in the order the events show them, repeats folded."""
    out: list[str] = []
    for event in events:
        status = event["job"]["status"]
        if not out or out[-1] != status:
            out.append(status)
    return out


async def test_enqueued_job_runs_to_success(arq: Arq, pc: AsyncProgressClient,
                                            service: Service) -> None:
    """Enqueue creates the job queued on the ARQ queue; the worker runs it to succeeded."""
    arq_job = await arq.enqueue(arq_worker.count, 3, 0.15, _title="batch.csv", _progress=pc)
    job = await _job(pc, arq_job.job_id)
    assert (job["status"], job["queue"], job["kind"], job["title"]) == (
        "queued", arq.queue, "import", "batch.csv")
    assert [s["key"] for s in job["stages"]] == ["read", "write"]
    # the worker token waits in a key of its own, not among the job's arguments
    token = Handover.loads(await arq.pool.get(handover_key(arq_job.job_id))).token
    assert token
    info = await arq_job.info()
    assert info is not None and token not in repr((info.args, info.kwargs))

    arq.start_worker(service.url)
    job = await _until(pc, arq_job.job_id, _finished, arq)
    assert job["status"] == "succeeded", job
    assert job["result"] == {"rows": 3}
    assert await arq_job.result(timeout=10) == {"rows": 3}
    events = await _history(pc, arq_job.job_id)
    assert _statuses(events) == ["queued", "running", "succeeded"]
    rows = [(e["job"]["current"], e["message"]) for e in events if e.get("message")]
    assert rows == [(1, "row 1"), (2, "row 2"), (3, "row 3")]
    assert await arq.pool.exists(handover_key(arq_job.job_id)) == 0


async def test_queue_position_while_the_worker_is_busy(arq: Arq, pc: AsyncProgressClient,
                                                       service: Service) -> None:
    """With max_jobs=1 busy, a second job waits queued at place 1, then runs."""
    arq.start_worker(service.url, ARQ_TEST_MAX_JOBS="1")
    busy = await arq.enqueue(arq_worker.hold, _progress=pc)
    await _until(pc, busy.job_id, lambda j: j["status"] == "running", arq)
    waiting = await arq.enqueue(arq_worker.count, 2, 0.05, _progress=pc)
    job = await _job(pc, waiting.job_id)
    assert (job["status"], job["queue_position"]) == ("queued", 1)
    await pc.cancel(busy.job_id)
    job = await _until(pc, waiting.job_id, _finished, arq)
    assert job["status"] == "succeeded"


async def test_a_result_the_service_refuses_still_succeeds(
        arq: Arq, pc: AsyncProgressClient, service: Service) -> None:
    """A return value over the service's limit, or not JSON: the job succeeds without it,
    its log says why, and ARQ keeps the value."""
    arq.start_worker(service.url)
    arq_job = await arq.enqueue(arq_worker.big, _progress=pc)
    job = await _until(pc, arq_job.job_id, _finished, arq)
    assert (job["status"], job["result"]) == ("succeeded", None)
    assert await arq_job.result(timeout=10) == "x" * 20_000
    logs = [e["message"] for e in await _history(pc, arq_job.job_id) if e["type"] == "log"]
    assert any(m.startswith("the result was not stored") for m in logs), logs
    arq_job = await arq.enqueue(arq_worker.odd, _progress=pc)
    job = await _until(pc, arq_job.job_id, _finished, arq)
    assert (job["status"], job["result"]) == ("succeeded", None)
    assert await arq_job.result(timeout=10) == {1, 2}
    logs = [e["message"] for e in await _history(pc, arq_job.job_id) if e["type"] == "log"]
    assert logs == ["the result was not stored: a set is not JSON"]


async def test_raising_function_ends_failed(arq: Arq, pc: AsyncProgressClient,
                                            service: Service) -> None:
    """A function that raises ends its job failed, with the error; ARQ sees the raise."""
    arq.start_worker(service.url)
    arq_job = await arq.enqueue(arq_worker.boom, _progress=pc)
    job = await _until(pc, arq_job.job_id, _finished, arq)
    assert job["status"] == "failed"
    assert "boom: row 7 is not a number" in job["error"]
    with pytest.raises(ValueError, match="row 7"):
        await arq_job.result(timeout=10)


async def test_dashboard_cancel_ends_the_function(arq: Arq, pc: AsyncProgressClient,
                                                  service: Service) -> None:
    """A cancel from the dashboard ends the function at its checkpoint; the job is cancelled."""
    arq.start_worker(service.url)
    arq_job = await arq.enqueue(arq_worker.hold, _progress=pc)
    await _until(pc, arq_job.job_id, lambda j: j["status"] == "running", arq)
    async with httpx.AsyncClient(base_url=service.url) as http:
        answer = await http.post(f"/api/jobs/{arq_job.job_id}/cancel", json={"reason": "no"})
    assert answer.status_code == 202
    job = await _until(pc, arq_job.job_id, _finished, arq)
    assert job["status"] == "cancelled"
    assert await arq_job.result(timeout=10) is None  # the function ended, ARQ is done
    assert await arq_job.status() == JobStatus.complete


async def test_dashboard_pause_holds_the_function(arq: Arq, pc: AsyncProgressClient,
                                                  service: Service) -> None:
    """A pause holds the function at its checkpoint until it is resumed."""
    arq.start_worker(service.url)
    arq_job = await arq.enqueue(arq_worker.count, 40, 0.05, _progress=pc)
    await _until(pc, arq_job.job_id, lambda j: (j["current"] or 0) >= 2, arq)
    await pc.pause(arq_job.job_id)
    held = await _until(pc, arq_job.job_id, lambda j: j["status"] == "paused", arq)
    await asyncio.sleep(0.5)  # a while paused: the function must not move meanwhile
    assert (await _job(pc, arq_job.job_id))["current"] == held["current"] < 40
    await pc.resume(arq_job.job_id)
    job = await _until(pc, arq_job.job_id, _finished, arq)
    assert (job["status"], job["result"]) == ("succeeded", {"rows": 40})


async def test_cancel_while_queued_never_runs_the_function(arq: Arq, pc: AsyncProgressClient,
                                                           service: Service) -> None:
    """A job cancelled while queued is cancelled at once; its worker does not run it."""
    arq_job = await arq.enqueue(arq_worker.boom, _progress=pc)
    await pc.cancel(arq_job.job_id)
    arq.start_worker(service.url)
    assert await arq_job.result(timeout=15) is None  # boom would have raised
    job = await _job(pc, arq_job.job_id)
    assert job["status"] == "cancelled" and job["progress"] == 0


async def test_retry_is_a_new_attempt(arq: Arq, pc: AsyncProgressClient,
                                      service: Service) -> None:
    """ARQ's Retry requeues the job: the second try is attempt 2, and attempt 1 is fenced off."""
    arq.start_worker(service.url)
    arq_job = await arq.enqueue(arq_worker.flaky, _progress=pc)
    job = await _until(pc, arq_job.job_id, _finished, arq)
    assert (job["status"], job["attempt"], job["result"]) == ("succeeded", 2, {"tries": 2})
    events = await _history(pc, arq_job.job_id)
    assert _statuses(events) == ["queued", "running", "queued", "running", "succeeded"]
    requeued = [e for e in events if e["type"] == "status" and e.get("attempt") == 2]
    assert requeued and "ARQ retry" in requeued[0]["reason"]
    # the first try's late post is refused
    async with httpx.AsyncClient(base_url=service.url) as http:
        late = await http.post(f"/api/jobs/{arq_job.job_id}/log",
                               json={"message": "late", "attempt": 1, "seq": 99})
    assert late.status_code == 409
    assert late.json()["error"]["code"] in ("stale_attempt", "job_finished")


async def test_retry_on_the_last_try_ends_failed(arq: Arq, pc: AsyncProgressClient,
                                                 service: Service) -> None:
    """A Retry on the last of max_tries ends the job failed, not queued for a try never run."""
    arq.start_worker(service.url)
    arq_job = await arq.enqueue(arq_worker.stubborn, _progress=pc)
    job = await _until(pc, arq_job.job_id, lambda j: j["attempt"] == 2 and _finished(j), arq)
    assert job["status"] == "failed"
    assert "try 2 of 2 asked ARQ for a retry" in job["error"]


async def test_arq_abort_ends_cancelled(arq: Arq, pc: AsyncProgressClient,
                                        service: Service) -> None:
    """ARQ's Job.abort() cancels the function's task; the job ends cancelled."""
    arq.start_worker(service.url, ARQ_TEST_ABORT="1")
    arq_job = await arq.enqueue(arq_worker.hold, _progress=pc)
    await _until(pc, arq_job.job_id, lambda j: j["status"] == "running", arq)
    assert await arq_job.abort(timeout=15) is True
    job = await _until(pc, arq_job.job_id, _finished, arq)
    assert job["status"] == "cancelled"
    assert "ARQ worker cancelled the function" in (job["error"] or job["control_reason"] or "")


async def test_arq_abort_before_start_ends_cancelled(arq: Arq, pc: AsyncProgressClient,
                                                     service: Service) -> None:
    """Job.abort() on a job no worker has taken yet: ARQ never runs it, and the job that
    enqueue made is cancelled rather than left queued."""
    arq_job = await arq.enqueue(arq_worker.boom, _progress=pc)
    aborting = asyncio.ensure_future(arq_job.abort(timeout=15))
    await wait_for(lambda: arq.pool.zscore("arq:abort", arq_job.job_id), what="the abort")
    job = await _job(pc, arq_job.job_id)
    assert (job["status"], job["control_reason"]) == (
        "cancelled", "aborted in ARQ before it started")
    arq.start_worker(service.url, ARQ_TEST_ABORT="1")
    assert await aborting is True
    assert "aborted before start" in arq.log()  # ARQ never called the function


async def test_job_timeout_ends_cancelled(arq: Arq, pc: AsyncProgressClient,
                                          service: Service) -> None:
    """ARQ's job timeout cancels the function; the job ends cancelled, saying how long it ran."""
    arq.start_worker(service.url, ARQ_TEST_JOB_TIMEOUT="1")
    arq_job = await arq.enqueue(arq_worker.hold, _progress=pc)
    job = await _until(pc, arq_job.job_id, _finished, arq)
    assert job["status"] == "cancelled"
    with pytest.raises(asyncio.TimeoutError):
        await arq_job.result(timeout=10)


@progress_job(kind="mailed", notify_email=["ops@example.com"])
async def mailed(ctx: dict[Any, Any], job: AsyncJob) -> None:
    """Never run: its enqueue is refused."""


async def test_notification_fields_are_create_fields(arq: Arq, pc: AsyncProgressClient
                                                     ) -> None:
    """webhook, webhook_events and notify_email reach the create: this service has no
    SMTP, so the enqueue is refused naming the field (and nothing is enqueued)."""
    with pytest.raises(APIError) as refused:
        await arq.enqueue(mailed, _progress=pc)
    assert refused.value.field == "notify_email"
    assert await arq.pool.zcard(arq.queue) == 0


async def test_service_down_at_enqueue(arq: Arq, pc: AsyncProgressClient, service: Service,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With the service away, enqueue still enqueues; the worker creates the job and runs it."""
    monkeypatch.setenv("PROGRESS_SSE_URL", f"http://127.0.0.1:{free_port()}")
    started = asyncio.get_running_loop().time()
    arq_job = await arq.enqueue(arq_worker.count, 2, 0.05, _title="offline")
    assert asyncio.get_running_loop().time() - started < 5
    assert await arq_job.status() == JobStatus.queued
    handover = Handover.loads(await arq.pool.get(handover_key(arq_job.job_id)))
    assert handover.token is None and handover.spec is not None
    assert handover.spec.queue == arq.queue
    arq.start_worker(service.url)
    job = await _until(pc, arq_job.job_id, _finished, arq)
    assert (job["status"], job["queue"], job["title"], job["result"]) == (
        "succeeded", arq.queue, "offline", {"rows": 2})


@pytest.mark.slow
async def test_lost_worker_is_fenced_off_by_the_next_try(arq: Arq, pc: AsyncProgressClient,
                                                        service: Service) -> None:
    """A worker killed mid-job: ARQ runs the job again, as attempt 2; attempt 1 is refused."""
    lost = arq.start_worker(service.url, ARQ_TEST_JOB_TIMEOUT="1")
    arq_job = await arq.enqueue(arq_worker.hold, 1, _progress=pc)
    await _until(pc, arq_job.job_id, lambda j: j["status"] == "running", arq)
    lost.kill()
    await asyncio.to_thread(lost.wait, 5)
    arq.start_worker(service.url, ARQ_TEST_JOB_TIMEOUT="1")
    # ARQ takes the job again once its in-progress key expires (job timeout + 10 s)
    job = await _until(pc, arq_job.job_id, _finished, arq, timeout=30)
    assert (job["status"], job["attempt"], job["result"]) == ("succeeded", 2, "try 2")
    async with httpx.AsyncClient(base_url=service.url) as http:
        late = await http.post(f"/api/jobs/{arq_job.job_id}/progress",
                               json={"progress": 50, "attempt": 1, "seq": 99})
    assert late.status_code == 409


async def test_worker_shutdown_runs_the_job_again(arq: Arq, pc: AsyncProgressClient,
                                                  service: Service) -> None:
    """SIGTERM to the worker: the job shows cancelled, and the next worker runs attempt 2."""
    first = arq.start_worker(service.url)
    arq_job = await arq.enqueue(arq_worker.hold, 1, _progress=pc)
    await _until(pc, arq_job.job_id, lambda j: j["status"] == "running", arq)
    assert await _stop(first) == 0
    job = await _job(pc, arq_job.job_id)
    assert (job["status"], job["attempt"]) == ("cancelled", 1)
    assert "worker shutdown" in job["error"]
    assert await arq_job.status() == JobStatus.queued  # ARQ keeps it for another try
    arq.start_worker(service.url)
    job = await _until(pc, arq_job.job_id, lambda j: j["attempt"] == 2 and _finished(j), arq)
    assert (job["status"], job["result"]) == ("succeeded", "try 2")


async def test_dashboard_requeue_runs_the_new_attempt(arq: Arq, pc: AsyncProgressClient,
                                                      service: Service) -> None:
    """A requeue from the dashboard fences the running try off, and ARQ runs the job again."""
    arq.start_worker(service.url)
    arq_job = await arq.enqueue(arq_worker.hold, 1, _progress=pc)
    await _until(pc, arq_job.job_id, lambda j: j["status"] == "running", arq)
    await pc.request("POST", f"/api/jobs/{arq_job.job_id}/requeue", json={"reason": "again"})
    job = await _until(pc, arq_job.job_id, _finished, arq)
    assert (job["status"], job["attempt"], job["result"]) == ("succeeded", 2, "try 2")
    assert await arq_job.result(timeout=10) == "try 2"


async def test_service_down_during_the_function(arq: Arq, tmp_path: Path) -> None:
    """The service killed mid-job and back a second later: the function runs on, and the
    job ends succeeded with its last progress."""
    svc = ProcessService(db=str(tmp_path / "outage.db"), port=free_port())
    await asyncio.to_thread(svc.start)
    try:
        arq.start_worker(svc.url)
        async with AsyncProgressClient(svc.url) as pc:
            arq_job = await arq.enqueue(arq_worker.count, 30, 0.1, _progress=pc)
            await _until(pc, arq_job.job_id, lambda j: (j["current"] or 0) >= 5, arq)
            svc.signal(signal.SIGKILL)
            await asyncio.to_thread(svc.wait)
            await asyncio.sleep(1.0)  # the outage: the worker posts into its outbox meanwhile
            assert await arq_job.status() == JobStatus.in_progress
            await asyncio.to_thread(svc.start)
            job = await _until(pc, arq_job.job_id, _finished, arq)
            assert (job["status"], job["result"]) == ("succeeded", {"rows": 30})
            assert await arq_job.result(timeout=10) == {"rows": 30}
            last = [e["message"] for e in await _history(pc, arq_job.job_id) if e.get("message")]
            assert last[-1] == "row 30"  # sent after the outage, from the outbox or the loop
    finally:
        await asyncio.to_thread(svc.stop)


def _readme_file(name: str) -> str:
    doc = (ROOT / "README.md").read_text()
    return doc.split(f"<!-- tested: {name}")[1].split("```python\n")[1].split("```")[0]


async def test_readme_example_runs(arq: Arq, service: Service, tmp_path: Path) -> None:
    """The README's tasks.py and enqueue.py, run as written with `arq` and `python` (only
    the Redis database and the queue changed, to keep test runs apart)."""
    ours = f"RedisSettings(database={REDIS_DB})"
    tasks = _readme_file("arq-tasks").replace("RedisSettings()", ours)
    tasks += f"    queue_name = {arq.queue!r}\n"
    producer = _readme_file("arq-enqueue").replace(
        "create_pool(RedisSettings())", f"create_pool({ours}, default_queue_name={arq.queue!r})")
    assert ours in tasks and arq.queue in producer
    (tmp_path / "tasks.py").write_text(tasks)
    (tmp_path / "enqueue.py").write_text(producer)
    arq.start_worker(service.url, "tasks.WorkerSettings", cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROGRESS_SSE_URL": service.url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "enqueue.py", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, (err.decode(), arq.log())
    job_id, result = out.decode().split("\n")[:2]
    arq.job_ids.append(job_id)
    assert result == "{'rows': 30}"
    async with AsyncProgressClient(service.url) as pc:
        job = await pc.get(job_id)
    assert (job["status"], job["kind"], job["title"], job["queue"], job["result"]) == (
        "succeeded", "import", "batch.csv", arq.queue, {"rows": 30})


@pytest.mark.slow
async def test_service_down_when_the_try_starts(arq: Arq, tmp_path: Path) -> None:
    """A worker that cannot reach the service puts the try off with Retry; the next try,
    with the service back, creates the job and runs it (as attempt 2, the ARQ try)."""
    svc = ProcessService(db=str(tmp_path / "late.db"), port=free_port())
    arq.start_worker(svc.url)
    async with AsyncProgressClient(svc.url, retries=0) as producer:
        arq_job = await arq.enqueue(arq_worker.count, 2, 0.05, _progress=producer)
    try:
        await wait_for(lambda: "retrying job in 10.00s" in arq.log(), timeout=30,
                       what="the try put off")
        await asyncio.to_thread(svc.start)
        async with AsyncProgressClient(svc.url) as pc:
            job = await _until(pc, arq_job.job_id, _finished, arq, timeout=30)
        assert (job["status"], job["attempt"], job["queue"], job["result"]) == (
            "succeeded", 2, arq.queue, {"rows": 2})
    finally:
        await asyncio.to_thread(svc.stop)


async def test_with_authentication_the_worker_uses_its_ctx_token(arq: Arq, tmp_path: Path
                                                                  ) -> None:
    """With JWT authentication, a worker with a create-scope token in its ctx (nothing in
    its environment) runs the job, posts with the handed-over worker token, and requeues."""
    secret = "a-test-secret-that-is-long-enough-0123456789"
    svc = await start_service(Settings(db=str(tmp_path / "auth.db"), jwt_secret=secret))
    alice = mint_token(secret, "alice", "read create", 600)
    try:
        arq.start_worker(svc.url, ARQ_TEST_CTX_TOKEN=alice)
        async with AsyncProgressClient(svc.url, token=alice) as pc:
            arq_job = await arq.enqueue(arq_worker.flaky, _progress=pc)
            job = await _until(pc, arq_job.job_id, _finished, arq)
            assert (job["status"], job["attempt"], job["result"]) == (
                "succeeded", 2, {"tries": 2})
        async with AsyncProgressClient(svc.url, token=mint_token(secret, "bob", "read", 600)
                                       ) as bob:
            with pytest.raises(APIError) as refused:
                await bob.get(arq_job.job_id)
            assert refused.value.status_code == 404
    finally:
        await svc.stop()


async def test_the_worker_posts_with_the_handed_over_worker_token(arq: Arq, tmp_path: Path
                                                                  ) -> None:
    """A worker whose own token may only read still reports: its posts carry the job's
    worker token, which enqueue left in Redis."""
    secret = "a-test-secret-that-is-long-enough-0123456789"
    svc = await start_service(Settings(db=str(tmp_path / "auth.db"), jwt_secret=secret))
    try:
        arq.start_worker(svc.url, ARQ_TEST_CTX_TOKEN=mint_token(secret, "alice", "read", 600))
        alice = mint_token(secret, "alice", "read create", 600)
        async with AsyncProgressClient(svc.url, token=alice) as pc:
            arq_job = await arq.enqueue(arq_worker.count, 2, 0.05, _progress=pc)
            job = await _until(pc, arq_job.job_id, _finished, arq)
        assert (job["status"], job["result"]) == ("succeeded", {"rows": 2})
    finally:
        await svc.stop()


async def test_a_finish_the_service_never_records_keeps_the_result(arq: Arq,
                                                                  tmp_path: Path) -> None:
    """The service gone for good mid-job: the function ends, its finish is given up after
    the worker's finish timeout, and ARQ still records the function's result."""
    svc = ProcessService(db=str(tmp_path / "gone.db"), port=free_port())
    await asyncio.to_thread(svc.start)
    try:
        arq.start_worker(svc.url, ARQ_TEST_FINISH_TIMEOUT="1")
        async with AsyncProgressClient(svc.url) as pc:
            arq_job = await arq.enqueue(arq_worker.count, 4, 0.2, _progress=pc)
            await _until(pc, arq_job.job_id, lambda j: (j["current"] or 0) >= 1, arq)
        svc.signal(signal.SIGKILL)
        await asyncio.to_thread(svc.wait)
        assert await arq_job.result(timeout=20) == {"rows": 4}
    finally:
        await asyncio.to_thread(svc.stop)

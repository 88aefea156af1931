"""Celery tasks tracked with one decorator: a real service process, the Redis broker
(database 2, queues named for this run) and real `celery worker` processes that import
tests/celery_tasks.py.

Warnings: none of Celery's or kombu's reach pytest here (the producer side sends and
reads results without one); the worker's own (SecurityWarning when run as root) go to
its log, not to this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import kombu
import kombu.exceptions
import pytest
from celery import states
from celery.exceptions import TaskRevokedError

from progress_sse.auth import mint_token
from progress_sse.client import APIError
from progress_sse.integrations.celery import progress_task

from .helpers import ROOT, ProcessService, free_port

pytestmark = pytest.mark.slow

BROKER = "redis://127.0.0.1:6379/2"  # the ARQ tests use database 3


def until(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `check` until it answers something true; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Worker:
    """A `celery worker` process on one queue; killed with its children on stop."""

    def __init__(self, queue: str, pool: str, env: dict[str, str], logs: Path,
                 app: str = "tests.celery_tasks", cwd: Path = ROOT) -> None:
        self.log_path = logs / f"worker-{queue}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, "worker", "--loglevel=INFO",
             "-P", pool, "-c", "1", "-Q", queue, "-n", f"{queue}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            until(lambda: self.proc.poll() is not None
                  or b" ready." in self.log_path.read_bytes(), 30, "the worker to be ready")
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its pool's children too
        self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def redis_broker() -> str:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    except OSError as exc:
        pytest.skip(f"no Redis at 127.0.0.1:6379 ({exc})")
    return BROKER


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("celery")


@pytest.fixture(scope="module")
def psse(logs: Path) -> Iterator[ProcessService]:
    svc = ProcessService(db=str(logs / "progress.db"), port=free_port())
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def worker_env(psse: ProcessService, logs: Path, redis_broker: str, run_id: str
               ) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PSSE_CELERY_BROKER": redis_broker,
            "PSSE_CELERY_QUEUE": f"psse-{run_id}", "PSSE_CELERY_NOTES": str(logs),
            "PROGRESS_SSE_URL": psse.url}


@pytest.fixture(scope="module")
def solo(worker_env: dict[str, str], logs: Path, run_id: str) -> Iterator[Worker]:
    worker = Worker(f"psse-{run_id}", "solo", worker_env, logs)
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def prefork(worker_env: dict[str, str], logs: Path, run_id: str) -> Iterator[Worker]:
    worker = Worker(f"psse-{run_id}-prefork", "prefork", worker_env, logs)
    yield worker
    worker.stop()


QUEUE_ENDS = ("", "-prefork", "-lost", "-twice", "-readme", "-auth")


@pytest.fixture
def tasks(psse: ProcessService, solo: Worker, run_id: str) -> Iterator[Any]:
    """tests/celery_tasks.py, its app sending to this run's queue and service."""
    from . import celery_tasks

    conf = celery_tasks.app.conf
    conf.update(task_default_queue=f"psse-{run_id}", progress_sse_url=psse.url)
    return celery_tasks


@pytest.fixture(scope="module", autouse=True)
def clean_broker(run_id: str) -> Iterator[None]:
    """Leave nothing of this run in database 2: its queues, their bindings, and the
    messages killed workers left unacknowledged (never another run's)."""
    yield
    import redis

    queues = {f"psse-{run_id}{end}" for end in QUEUE_ENDS}
    with redis.Redis.from_url(BROKER) as r:
        r.delete(*queues, *(f"_kombu.binding.{q}" for q in queues))
        for tag, raw in r.hgetall("unacked").items():
            with contextlib.suppress(ValueError, IndexError):
                if json.loads(raw)[2] in queues:
                    r.hdel("unacked", tag)
                    r.zrem("unacked_index", tag)


@pytest.fixture
def api(psse: ProcessService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=psse.url, timeout=10) as client:
        yield client


def job_of(api: httpx.Client, job_id: str) -> dict[str, Any]:
    r = api.get(f"/api/jobs/{job_id}")
    assert r.status_code == 200, r.text
    job: dict[str, Any] = r.json()["job"]
    return job


def events_of(api: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    r = api.get(f"/api/jobs/{job_id}/events", params={"limit": 1000})
    assert r.status_code == 200, r.text
    events: list[dict[str, Any]] = r.json()["events"]
    return events


def status_is(api: httpx.Client, job_id: str, *statuses: str) -> Callable[[], bool]:
    def check() -> bool:
        r = api.get(f"/api/jobs/{job_id}")
        return r.status_code == 200 and r.json()["job"]["status"] in statuses
    return check


def test_job_follows_the_task(tasks: Any, api: httpx.Client, run_id: str) -> None:
    """Enqueue creates the job queued under the task id; the worker's progress and return
    value end it succeeded with the value as its result."""
    result = tasks.count.delay(3, 0.15)
    assert result.get(timeout=30) == {"rows": 3}
    events = events_of(api, result.id)
    created = events[0]
    assert created["type"] == "created"
    assert created["job"]["status"] == "queued"
    assert created["job"]["queue"] == f"psse-{run_id}"
    assert created["job"]["kind"] == "count"
    progress = [e for e in events if e["type"] == "progress" and e["job"]["current"]]
    currents = [e["job"]["current"] for e in progress]  # throttled: a step may merge
    assert currents == sorted(currents) and currents[-1] == 3 and len(currents) >= 2
    assert all(e["job"]["status"] == "running" for e in progress)
    assert events[-1]["type"] == "finished"
    job = job_of(api, result.id)
    assert job["status"] == "succeeded" and job["result"] == {"rows": 3}


def test_the_token_is_not_in_the_arguments(tasks: Any) -> None:
    """The hand-over travels in a header: the task's arguments are the caller's alone."""
    sent: list[dict[str, Any]] = []

    from celery.signals import before_task_publish

    def note(headers: dict[str, Any], body: Any, **_: Any) -> None:
        sent.append({"headers": headers, "body": body})

    before_task_publish.connect(note, weak=False)
    try:
        result = tasks.count.delay(1)
    finally:
        before_task_publish.disconnect(note)
    assert result.get(timeout=30) == {"rows": 1}
    header = sent[0]["headers"]["progress_sse"]
    assert header["attempt"] == 1 and header["token"]
    assert list(sent[0]["body"][0]) == [1] and sent[0]["body"][1] == {}
    assert header["token"] not in json.dumps(sent[0]["headers"]["argsrepr"])
    stored = tasks.app.backend.get_task_meta(result.id)
    assert stored["args"] == [1]  # result_extended: what the result backend (and Flower) show
    assert header["token"] not in json.dumps(stored, default=str)


def test_per_call_fields(tasks: Any, api: httpx.Client) -> None:
    """apply_async(progress_sse={...}) sets create fields for one call."""
    result = tasks.count.apply_async((1,), progress_sse={"title": "March export",
                                                         "meta": {"month": 3}})
    assert result.get(timeout=30) == {"rows": 1}
    job = job_of(api, result.id)
    assert job["title"] == "March export" and job["meta"] == {"month": 3}
    assert job["kind"] == "count"


def test_broker_refusal_cancels_the_job(tasks: Any, api: httpx.Client) -> None:
    """A message the broker did not take leaves no job waiting for it: the job created
    for it is cancelled, saying why, and the error reaches the caller."""
    task_id = str(uuid.uuid4())
    with kombu.Connection(f"redis://127.0.0.1:{free_port()}/2", transport_options={
            "max_retries": 1, "interval_start": 0, "interval_step": 0.1}) as down, \
            pytest.raises(kombu.exceptions.OperationalError):
        tasks.count.apply_async((1,), task_id=task_id, retry=False,
                                producer=tasks.app.amqp.Producer(down))
    job = job_of(api, task_id)
    assert job["status"] == "cancelled"
    assert job["control_reason"].startswith("not enqueued: OperationalError")


def test_refused_create_raises_at_enqueue(tasks: Any, api: httpx.Client) -> None:
    """Create fields the service refuses raise at enqueue (unlike an outage), and nothing
    is sent."""
    task_id = str(uuid.uuid4())
    with pytest.raises(APIError, match="stages"):
        tasks.count.apply_async((1,), task_id=task_id, progress_sse={"stages": ["a", "a"]})
    assert api.get(f"/api/jobs/{task_id}").status_code == 404
    assert tasks.app.backend.get_task_meta(task_id)["status"] == states.PENDING


def test_notification_fields_are_create_fields(tasks: Any, api: httpx.Client) -> None:
    """webhook, webhook_events and notify_email set the job, from the decorator or one
    call: this service has no SMTP and no webhook origins, so it refuses each at
    enqueue, naming it (not passed to Celery as task options and lost)."""
    mailed = progress_task(tasks.app, name=f"mailed-{uuid.uuid4()}",
                           notify_email="ops@example.com")(_no_work)
    with pytest.raises(APIError) as mail:
        mailed.delay()
    assert mail.value.field == "notify_email"
    with pytest.raises(APIError) as hook:
        tasks.count.apply_async((1,), progress_sse={"webhook": "http://127.0.0.1:9/x"})
    assert hook.value.field == "webhook"


def _no_work(job: Any) -> None:
    """A task body that is never run."""


def test_expired_task_cancels_its_job(tasks: Any, api: httpx.Client) -> None:
    """A task whose `expires` passed while it waited is not run; its job ends cancelled."""
    first = tasks.hold.delay("before-expiry", 30)
    until(status_is(api, first.id, "running"), what="the first job to run")
    expiring = tasks.count.apply_async((1,), expires=0.5)
    sent = time.monotonic()
    until(lambda: time.monotonic() - sent > 1, what="the expiry")
    api.post(f"/api/jobs/{first.id}/cancel")
    until(status_is(api, expiring.id, "cancelled"), what="the expired job to be cancelled")
    assert job_of(api, expiring.id)["error"] == "Celery: expired"


def test_wrong_arguments_create_no_job(tasks: Any, api: httpx.Client) -> None:
    """A call that does not fit the body's arguments raises at once, and leaves no job."""
    task_id = str(uuid.uuid4())
    with pytest.raises(TypeError, match="n"):
        tasks.count.apply_async((), task_id=task_id)
    assert api.get(f"/api/jobs/{task_id}").status_code == 404


def test_unstorable_return_value(tasks: Any, api: httpx.Client) -> None:
    """A return value the service cannot store still succeeds the job, without a result,
    and its log says why; the task's own result is untouched."""
    result = tasks.huge.delay()
    assert result.get(timeout=30) == {"id": 2**70}
    job = job_of(api, result.id)
    assert job["status"] == "succeeded" and job["result"] is None
    logs = [e for e in events_of(api, result.id) if e["type"] == "log"]
    assert "not stored as the job's result" in logs[0]["message"]


def test_queue_position_while_the_worker_is_busy(tasks: Any, api: httpx.Client,
                                                 logs: Path) -> None:
    """A second job waits queued at position 1 while the solo worker runs the first."""
    first = tasks.hold.delay("busy", 30)
    until(status_is(api, first.id, "running"), what="the first job to run")
    second = tasks.count.delay(1)
    waiting = until(lambda: (j := job_of(api, second.id))["queue_position"] == 1 and j,
                    what="queue position 1")
    assert waiting["status"] == "queued"
    assert api.post(f"/api/jobs/{first.id}/cancel").status_code == 202
    assert second.get(timeout=30) == {"rows": 1}
    assert job_of(api, first.id)["status"] == "cancelled"


def test_raising_task_fails_the_job(tasks: Any, api: httpx.Client) -> None:
    """An exception fails the job with its message, and the task with the exception."""
    result = tasks.boom.delay()
    with pytest.raises(ValueError, match="disk full"):
        result.get(timeout=30)
    job = job_of(api, result.id)
    assert job["status"] == "failed" and job["error"] == "disk full"
    assert result.state == states.FAILURE


def test_dashboard_cancel_ends_the_task(tasks: Any, api: httpx.Client) -> None:
    """A viewer's cancel ends the body at its checkpoint: the job is cancelled, the task
    REVOKED (not a failure), and the worker goes on to the next task."""
    result = tasks.hold.delay("cancel", 60)
    until(status_is(api, result.id, "running"), what="the job to run")
    r = api.post(f"/api/jobs/{result.id}/cancel", json={"reason": "not needed"})
    assert r.status_code == 202
    until(status_is(api, result.id, "cancelled"), what="the job to be cancelled")
    until(lambda: result.state == states.REVOKED, what="the task to be REVOKED")
    with pytest.raises(TaskRevokedError, match="not needed"):
        result.get(timeout=5)
    assert tasks.count.delay(1).get(timeout=30) == {"rows": 1}


def test_cancel_while_queued_skips_the_body(tasks: Any, api: httpx.Client,
                                            logs: Path) -> None:
    """A job cancelled before a worker takes it never runs its body."""
    first = tasks.hold.delay("ahead", 30)
    until(status_is(api, first.id, "running"), what="the first job to run")
    second = tasks.hold.delay("never", 30)
    assert api.post(f"/api/jobs/{second.id}/cancel").status_code == 200
    api.post(f"/api/jobs/{first.id}/cancel")
    until(lambda: second.state == states.REVOKED, what="the second task to be REVOKED")
    assert not (logs / "never.pid").exists()
    assert job_of(api, second.id)["status"] == "cancelled"


def test_retry_is_a_new_attempt(tasks: Any, api: httpx.Client, logs: Path) -> None:
    """autoretry_for requeues the job: attempt 2 runs and succeeds, attempt 1 did not
    fail the job, and its late posts are refused."""
    result = tasks.flaky.delay("retry")
    waits = until(lambda: (j := job_of(api, result.id))["attempt"] == 2 and j,
                  what="attempt 2")
    assert waits["status"] == "queued"  # during the retry's countdown: requeued at once
    assert result.get(timeout=30) == {"attempt": 2}
    job = job_of(api, result.id)
    assert job["attempt"] == 2 and job["status"] == "succeeded"
    events = events_of(api, result.id)
    assert not [e for e in events if e["type"] == "finished" and e["job"]["attempt"] == 1]
    requeued = [e for e in events if e["type"] == "status" and e["job"]["attempt"] == 2
                and e["job"]["status"] == "queued"]
    assert [e["reason"] for e in requeued] == ["Celery retry 1"], events
    first = json.loads((logs / "retry.json").read_text())
    late = api.post(f"/api/jobs/{result.id}/log",
                    headers={"X-Worker-Token": first["token"]},
                    json={"message": "late", "attempt": 1, "seq": first["seq"] + 100})
    assert late.status_code == 409, late.text


def pid_gone(pid: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return check


def test_revoke_terminate_on_prefork(tasks: Any, api: httpx.Client, prefork: Worker,
                                     run_id: str, logs: Path) -> None:
    """revoke(terminate=True) stops the prefork child (SIGTERM: the body sees SystemExit)
    and the job ends cancelled, by the child's handle or the worker's task_revoked,
    whichever comes first; a plain revoke of a task still waiting cancels its job when
    the worker comes to it, without running it."""
    queue = f"psse-{run_id}-prefork"
    running = tasks.hold.apply_async(("sigterm", 60), queue=queue)
    until(status_is(api, running.id, "running"), what="the job to run")
    waiting = tasks.hold.apply_async(("revoked", 60), queue=queue)
    assert job_of(api, waiting.id)["queue"] == queue
    tasks.app.control.revoke(waiting.id)
    tasks.app.control.revoke(running.id, terminate=True)
    until(status_is(api, running.id, "cancelled"), what="the running job to be cancelled")
    assert job_of(api, running.id)["error"] in ("Celery: terminated (15)",
                                                 "worker interrupted (SystemExit)")
    until(status_is(api, waiting.id, "cancelled"), what="the waiting job to be cancelled")
    assert job_of(api, waiting.id)["error"] == "Celery: revoked"
    assert not (logs / "revoked.pid").exists()
    until(lambda: running.state == waiting.state == states.REVOKED, what="REVOKED tasks")


def test_revoke_sigkill_on_prefork(tasks: Any, api: httpx.Client, prefork: Worker,
                                   run_id: str, logs: Path) -> None:
    """A child killed outright (signal="SIGKILL") cannot report: the worker's
    task_revoked ends the job cancelled."""
    running = tasks.hold.apply_async(("sigkill", 60), queue=f"psse-{run_id}-prefork")
    until(status_is(api, running.id, "running"), what="the job to run")
    child = int((logs / "sigkill.pid").read_text())
    tasks.app.control.revoke(running.id, terminate=True, signal="SIGKILL")
    until(status_is(api, running.id, "cancelled"), what="the job to be cancelled")
    assert job_of(api, running.id)["error"] == "Celery: terminated (9)"
    until(pid_gone(child), what="the child to be killed")


def test_revoke_terminate_on_solo_runs_on(tasks: Any, api: httpx.Client) -> None:
    """The solo pool cannot stop the task it runs: terminate only lands once it is over,
    and the job ends as the body decides."""
    result = tasks.hold.delay("solo", 1.5)
    until(status_is(api, result.id, "running"), what="the job to run")
    tasks.app.control.revoke(result.id, terminate=True)
    assert result.get(timeout=30) == "held"
    assert job_of(api, result.id)["status"] == "succeeded"


def test_worker_lost_with_acks_late(tasks: Any, api: httpx.Client, worker_env: dict[str, str],
                                    logs: Path, run_id: str) -> None:
    """A worker killed mid-task: the job stalls after its heartbeat timeout; with acks_late
    Redis delivers the task again (after the visibility timeout) and it runs as attempt 2."""
    queue = f"psse-{run_id}-lost"
    env = {**worker_env, "PSSE_CELERY_VISIBILITY": "2"}
    first = Worker(queue, "solo", env, logs)
    try:
        result = tasks.hold_late.apply_async(("lost", 3), queue=queue)
        until(status_is(api, result.id, "running"), what="the job to run")
    finally:
        first.stop()
    until(lambda: job_of(api, result.id)["stalled"], what="the job to stall")
    second = Worker(queue, "solo", env, logs)
    try:
        assert result.get(timeout=60) == "held"
    finally:
        second.stop()
    job = job_of(api, result.id)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    again = [e for e in events_of(api, result.id) if e["type"] == "status"
             and e["job"]["attempt"] == 2 and e["job"]["status"] == "queued"]
    assert [e["reason"] for e in again] == ["the task was delivered again"]


def test_second_delivery_fences_off_the_first(tasks: Any, api: httpx.Client,
                                              worker_env: dict[str, str], logs: Path,
                                              run_id: str) -> None:
    """A task still running when Redis hands it to a second worker (past the visibility
    timeout): the second runs it as attempt 2, and the first stops at its next post
    without touching the task's state."""
    queue = f"psse-{run_id}-twice"
    env = {**worker_env, "PSSE_CELERY_VISIBILITY": "1"}
    first = Worker(queue, "solo", env, logs)
    second = None
    try:
        result = tasks.hold_once.apply_async(("twice", 40), queue=queue)
        sent = time.monotonic()
        until(status_is(api, result.id, "running"), what="the first delivery to run")
        # a worker gives back messages past their visibility timeout when it starts (and
        # then every 100 s): start the second once the first delivery is past it
        until(lambda: time.monotonic() - sent > 1.5, what="the visibility timeout")
        second = Worker(queue, "solo", env, logs)
        assert result.get(timeout=40) == "attempt 2"
        until(lambda: b"ignored" in first.log_path.read_bytes(),
              what="the first execution to end quietly (Ignore)")
    finally:
        first.stop()
        if second is not None:
            second.stop()
    job = job_of(api, result.id)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    assert result.state == states.SUCCESS


def test_signature_creates_the_job(tasks: Any, api: httpx.Client) -> None:
    """A signature's delay goes through the same enqueue."""
    result = tasks.count.s(1).delay()
    assert job_of(api, result.id)["kind"] == "count"
    assert result.get(timeout=30) == {"rows": 1}


def test_readme_example(psse: ProcessService, api: httpx.Client, worker_env: dict[str, str],
                        logs: Path, run_id: str, tmp_path: Path) -> None:
    """The README's Celery example runs as written: its worker command and its enqueue."""
    doc = (ROOT / "README.md").read_text()
    block = doc.split("<!-- tested: celery-example")[1]
    code = block.split("```python\n")[1].split("```")[0]
    commands = block.split("```sh\n")[1].split("```")[0].strip().splitlines()
    queue = f"psse-{run_id}-readme"
    code = code.replace("redis://127.0.0.1:6379/0", BROKER).replace(
        "http://127.0.0.1:8000", psse.url)
    (tmp_path / "tasks.py").write_text(f"{code}\napp.conf.task_default_queue = {queue!r}\n")
    assert commands[0] == "celery -A tasks worker --loglevel=INFO"
    env = {k: v for k, v in worker_env.items() if k != "PROGRESS_SSE_URL"}
    worker = Worker(queue, "prefork", env, logs, app="tasks", cwd=tmp_path)
    try:
        enqueue = commands[1].removeprefix("python ")
        assert enqueue.startswith("-c '") and enqueue.endswith("'")
        out = subprocess.run([sys.executable, "-c", enqueue[4:-1]], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    finally:
        worker.stop()
    job_id, value = out.splitlines()
    assert value == "{'rows': 5}"
    job = job_of(api, job_id)
    assert job["status"] == "succeeded" and job["result"] == {"rows": 5}
    assert job["kind"] == "export" and job["queue"] == queue
    assert [s["key"] for s in job["stages"]] == ["query", "write"]
    messages = [e["job"]["message"] for e in events_of(api, job_id) if e["type"] == "progress"]
    assert "row 5 of 5" in messages


def test_service_down_during_the_task(tasks: Any, api: httpx.Client, psse: ProcessService,
                                      solo: Worker) -> None:
    """The service gone mid-task: the task goes on, and its progress and finish reach the
    job once the service is back."""
    result = tasks.count.delay(8, 0.25)
    until(lambda: (job_of(api, result.id)["current"] or 0) >= 1, what="the first step")
    lost = solo.log_path.read_bytes().count(b"the service is unreachable")
    psse.stop()
    try:
        until(lambda: solo.log_path.read_bytes().count(b"the service is unreachable") > lost,
              what="the worker to miss the service")
    finally:
        psse.start()
    assert result.get(timeout=60) == {"rows": 8}
    until(status_is(api, result.id, "succeeded"), what="the job to succeed")
    job = job_of(api, result.id)
    assert job["current"] == 8 and job["result"] == {"rows": 8}


def test_always_eager(tasks: Any, api: httpx.Client) -> None:
    """Under task_always_eager the task runs in the caller, and its job with it."""
    tasks.app.conf.task_always_eager = True
    try:
        result = tasks.count.delay(2)
    finally:
        tasks.app.conf.task_always_eager = False
    assert result.get() == {"rows": 2}
    job = job_of(api, result.id)
    assert job["status"] == "succeeded" and job["result"] == {"rows": 2}
    assert job["attempt"] == 1


def test_workers_under_authentication(tasks: Any, worker_env: dict[str, str], logs: Path,
                                      run_id: str) -> None:
    """With authentication on, a worker needs the producer's token (its subject's jobs):
    with it the job is tracked to its end; without it the service refuses the worker,
    and the task still runs, unreported."""
    secret = "s" * 40
    svc = ProcessService(db=str(logs / "auth.db"), port=free_port(),
                         env={"PROGRESS_SSE_JWT_SECRET": secret})
    svc.start()
    queue = f"psse-{run_id}-auth"
    producer = mint_token(secret, "alice", "read create", 600)
    env = {k: v for k, v in worker_env.items() if not k.startswith("PROGRESS_SSE_")}
    env["PROGRESS_SSE_URL"] = svc.url
    conf = tasks.app.conf
    conf.update(progress_sse_url=svc.url, progress_sse_token=producer)

    def job(job_id: str) -> dict[str, Any]:
        r = httpx.get(f"{svc.url}/api/jobs/{job_id}",
                      headers={"Authorization": f"Bearer {producer}"})
        assert r.status_code == 200, r.text
        found: dict[str, Any] = r.json()["job"]
        return found

    try:
        for token, outcome in ((None, "queued"), (producer, "succeeded")):
            worker = Worker(queue, "solo", {**env, **({"PROGRESS_SSE_TOKEN": token}
                                                      if token else {})}, logs)
            try:
                result = tasks.count.apply_async((2,), queue=queue)
                assert result.get(timeout=30) == {"rows": 2}
            finally:
                worker.stop()
            assert job(result.id)["status"] == outcome
        assert b"the service refused it (401" in next(
            p for p in logs.glob(f"worker-{queue}-*.log")
            if b"refused" in p.read_bytes()).read_bytes()
    finally:
        conf.update(progress_sse_token=None)
        svc.stop()


def test_service_down_at_enqueue(tasks: Any, api: httpx.Client, psse: ProcessService,
                                 solo: Worker, run_id: str) -> None:
    """With the service down, enqueue still enqueues at once; the worker creates the job
    (same id, the decorator's fields) once the service is back, and finishes it."""
    retries = solo.log_path.read_bytes().count(b"retrying POST /api/jobs")
    psse.stop()
    try:
        started = time.monotonic()
        result = tasks.count.delay(2)
        assert time.monotonic() - started < 3
        # past one create's own retries (5): the worker keeps trying until it is back
        until(lambda: solo.log_path.read_bytes().count(b"retrying POST /api/jobs")
              > retries + 6, what="the worker to try the create while the service is down")
    finally:
        psse.start()
    assert result.get(timeout=60) == {"rows": 2}
    job = job_of(api, result.id)
    assert job["status"] == "succeeded" and job["result"] == {"rows": 2}
    assert job["kind"] == "count" and job["queue"] == f"psse-{run_id}"
    assert [s["key"] for s in job["stages"]] == ["work"]

"""Celery tasks for tests/test_celery.py: the module its `celery worker` processes import.

The broker (Redis database 2) and the default queue come from the environment, so each
test run has queues of its own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery

from progress_sse.client import Job
from progress_sse.integrations.celery import progress_task

BROKER = os.environ.get("PSSE_CELERY_BROKER", "redis://127.0.0.1:6379/2")

app = Celery("progress_sse_tests", broker=BROKER, backend=BROKER)
app.conf.update(
    task_default_queue=os.environ.get("PSSE_CELERY_QUEUE", "progress-sse-tests"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
    result_extended=True,  # the stored result holds the arguments: the token must not be there
    progress_sse_start_timeout=30,
)
if "PSSE_CELERY_VISIBILITY" in os.environ:  # how soon Redis gives a lost task to another
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["PSSE_CELERY_VISIBILITY"])}


def _notes() -> Path:
    return Path(os.environ.get("PSSE_CELERY_NOTES", "."))


@progress_task(app, kind="count", stages=["work"])
def count(job: Job, n: int, delay: float = 0.0) -> dict[str, Any]:
    """Report n steps, obeying cancel and pause at each."""
    job.stage("work")
    for i in range(n):
        time.sleep(delay)
        job.progress(current=i + 1, total=n, message=f"step {i + 1}")
        job.checkpoint()
    return {"rows": n}


@progress_task(app, kind="boom")
def boom(job: Job) -> None:
    raise ValueError("disk full")


@progress_task(app, kind="huge")
def huge(job: Job) -> dict[str, int]:
    """A value Celery stores but the service does not (an integer beyond 64 bits)."""
    return {"id": 2**70}


def _hold(job: Job, name: str, seconds: float) -> str:
    """Run until cancelled or `seconds` pass; note the process's pid when it starts."""
    (_notes() / f"{name}.pid").write_text(str(os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job.progress(message="holding")
        job.checkpoint()
        time.sleep(0.05)
    return "held"


@progress_task(app, kind="hold")
def hold(job: Job, name: str, seconds: float = 60.0) -> str:
    return _hold(job, name, seconds)


@progress_task(app, kind="hold", acks_late=True, heartbeat_timeout_s=2)
def hold_late(job: Job, name: str, seconds: float = 60.0) -> str:
    """`hold`, acknowledged only once it ends: a lost worker's task is delivered again."""
    return _hold(job, name, seconds)


@progress_task(app, kind="hold", acks_late=True)
def hold_once(job: Job, name: str, seconds: float = 60.0) -> str:
    """`hold_late` on the first attempt; later attempts return at once."""
    if job.attempt == 1:
        _hold(job, name, seconds)
    return f"attempt {job.attempt}"


@progress_task(app, kind="flaky", autoretry_for=(ConnectionError,), max_retries=2,
               default_retry_delay=1)
def flaky(job: Job, name: str) -> dict[str, Any]:
    """Fail the first attempt (after a post of its own); succeed on the retry."""
    job.progress(current=1, total=2, message=f"attempt {job.attempt}")
    if job.attempt == 1:
        (_notes() / f"{name}.json").write_text(json.dumps(
            {"token": job.token, "attempt": job.attempt, "seq": job.seq}))
        raise ConnectionError("the upstream hung up")
    return {"attempt": job.attempt}

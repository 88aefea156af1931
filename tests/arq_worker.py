"""The ARQ worker that tests/test_arq.py runs as a process: `arq tests.arq_worker.WorkerSettings`.

Its queue, concurrency, abort switch and job timeout come from the environment, so each
test run has a queue of its own.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Retry, func

from progress_sse.client import AsyncJob
from progress_sse.integrations.arq import progress_job


@progress_job(kind="import", stages=["read", "write"])
async def count(ctx: dict[Any, Any], job: AsyncJob, n: int, delay: float) -> dict[str, int]:
    """Count to n, one progress post a step, obeying cancel and pause."""
    await job.stage("read")
    for i in range(n):
        await asyncio.sleep(delay)
        await job.progress(current=i + 1, total=n, message=f"row {i + 1}")
        await job.checkpoint()
    await job.stage("write")
    return {"rows": n}


@progress_job(kind="hold")
async def hold(ctx: dict[Any, Any], job: AsyncJob, tries: int = 1_000) -> str:
    """Run until cancelled, on the first `tries` tries; later tries return at once."""
    if ctx["job_try"] > tries:
        return f"try {ctx['job_try']}"
    await job.progress(1, message=f"holding (try {ctx['job_try']})")
    while True:
        await job.checkpoint()
        await asyncio.sleep(0.05)


@progress_job(kind="boom")
async def boom(ctx: dict[Any, Any], job: AsyncJob) -> None:
    """Raise before any post, as work that fails early does."""
    raise ValueError("boom: row 7 is not a number")


@progress_job(kind="stubborn", max_tries=2)
async def stubborn(ctx: dict[Any, Any], job: AsyncJob) -> None:
    """Ask for a retry on every try; ARQ allows two."""
    await job.progress(current=ctx["job_try"], total=2)
    raise Retry(defer=0.2)


@progress_job(kind="flaky")
async def flaky(ctx: dict[Any, Any], job: AsyncJob) -> dict[str, int]:
    """Ask ARQ for a retry on the first try."""
    await job.progress(current=ctx["job_try"], total=2, message=f"try {ctx['job_try']}")
    if ctx["job_try"] == 1:
        raise Retry(defer=0.5)
    return {"tries": ctx["job_try"]}


@progress_job(kind="big")
async def big(ctx: dict[Any, Any], job: AsyncJob) -> str:
    """Return more than the service stores as a result (16 KiB)."""
    return "x" * 20_000


@progress_job(kind="odd")
async def odd(ctx: dict[Any, Any], job: AsyncJob) -> set[int]:
    """Return what ARQ keeps (it pickles) but JSON has no word for."""
    return {1, 2}


class WorkerSettings:
    functions = [count, hold, boom, flaky, big, odd, func(stubborn, max_tries=2)]
    redis_settings = RedisSettings(database=int(os.environ.get("ARQ_TEST_REDIS_DB", "3")))
    queue_name = os.environ.get("ARQ_TEST_QUEUE", "arq:queue")
    max_jobs = int(os.environ.get("ARQ_TEST_MAX_JOBS", "10"))
    allow_abort_jobs = os.environ.get("ARQ_TEST_ABORT") == "1"
    job_timeout = float(os.environ.get("ARQ_TEST_JOB_TIMEOUT", "300"))
    poll_delay = 0.1
    ctx = {key: os.environ[name] for key, name in (
        ("progress_sse_token", "ARQ_TEST_CTX_TOKEN"),
        ("progress_sse_finish_timeout", "ARQ_TEST_FINISH_TIMEOUT")) if name in os.environ}

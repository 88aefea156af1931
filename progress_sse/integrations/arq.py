"""ARQ functions whose jobs report to progress-sse: one decorator, one enqueue helper.

    @progress_job(kind="import", stages=["read", "write"])
    async def import_batch(ctx, job, path):     # job: an attached AsyncJob
        ...

    await enqueue(redis, import_batch, "batch.csv")   # the job shows `queued` at once

Choices that may look odd but are deliberate:

* The job id is the ARQ job id, so `Job.job_id` names both, and a worker that creates the
  job itself (the service was down at enqueue) creates the same job.
* The worker token travels in a Redis key of its own (`progress-sse:arq:<id>`), never
  among the function's arguments: ARQ logs each job's arguments when it starts it and
  keeps them with the result (`keep_result`, an hour by default) for any `Job.info()`.
* The ARQ try is the attempt. A `Retry` requeues the job at once, so the old try is fenced
  off (its late posts are refused with 409); a try that finds the job at an older
  attempt (its worker was lost) requeues it before it starts; a try fenced off by a
  requeue from the dashboard asks ARQ for another try.
* ARQ stops a function by cancelling its task for an abort, a job timeout and a worker
  shutdown alike, and the function cannot tell which: all three end the job `cancelled`,
  saying how long it ran. After a shutdown ARQ runs the job again; that try requeues it.
  A job aborted before any worker took it never reaches a function, so the Job that
  `enqueue` answers cancels it itself (ProgressArqJob).
* The service being unreachable never fails the user's job: enqueue still enqueues (the
  worker creates the job when it starts), posts wait in the SDK's outbox, and a finish
  that could not be recorded is logged, not raised. Only a start with the service away
  is put off, with ARQ's `Retry`, since the function needs its job handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast

from arq.connections import ArqRedis
from arq.jobs import Job as ArqJob
from arq.jobs import JobStatus
from arq.worker import Retry

from ..client import (
    APIError,
    AsyncJob,
    AsyncProgressClient,
    Cancelled,
    CreatedJob,
    ProgressClientError,
    ServiceUnavailable,
    StageSpec,
    StaleAttemptError,
)

log = logging.getLogger("progress_sse.integrations.arq")

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

HANDOVER_PREFIX = "progress-sse:arq:"
HANDOVER_TTL_S = 2 * 86_400  # beyond ARQ's own keys (a job expires after a day by default)
START_RETRY_S = 10.0  # a try that could not reach the service runs again this much later
ENQUEUE_TIMEOUT_S = 2.0  # enqueue waits at most about this long for an unreachable service
FINISH_TIMEOUT_S = 30.0  # a worker's finish retries this long while the service is away
ARQ_MAX_TRIES = 5  # ARQ's default max_tries
INTERRUPTED_FINISH_S = 5.0  # ARQ waits for a cancelled function: record the cancel this fast

JobFunction = Callable[Concatenate[dict[Any, Any], AsyncJob, P], Awaitable[R]]


@dataclass(frozen=True)
class JobSpec:
    """The job's create fields: from the decorator, with the queue and title of one enqueue."""

    kind: str
    title: str = ""
    queue: str | None = None
    stages: tuple[StageSpec, ...] = ()
    total: float | None = None
    meta: Mapping[str, Any] | None = None
    heartbeat_timeout_s: float | None = None
    webhook: str | None = None
    webhook_events: tuple[str, ...] | None = None
    notify_email: str | tuple[str, ...] | None = None

    async def create(self, pc: AsyncProgressClient, job_id: str) -> CreatedJob:
        """Create the job with this id; a repeat answers the existing job."""
        return await pc.create(kind=self.kind, title=self.title, queue=self.queue,
                               stages=self.stages or None, total=self.total, meta=self.meta,
                               id=job_id, heartbeat_timeout_s=self.heartbeat_timeout_s,
                               webhook=self.webhook, webhook_events=self.webhook_events,
                               notify_email=self.notify_email)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "stages": [
            dict(s) if isinstance(s, Mapping) else s for s in self.stages]}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> JobSpec:
        lists = {k: tuple(v) for k in ("stages", "webhook_events", "notify_email")
                 if isinstance(v := doc.get(k), list)}
        return cls(**{**doc, "stages": (), **lists})


class ProgressFunction(Protocol[P, R_co]):
    """A worker function made by `progress_job`: what ARQ calls, and the job it creates."""

    __qualname__: str
    progress_spec: JobSpec

    async def __call__(self, ctx: dict[Any, Any], *args: P.args,
                       **kwargs: P.kwargs) -> R_co | None: ...


@dataclass(frozen=True)
class Handover:
    """What enqueue leaves for the worker in Redis: the worker token, and the create
    fields when the service could not take the job at enqueue."""

    token: str | None = None
    spec: JobSpec | None = None

    def dumps(self) -> str:
        return json.dumps({"token": self.token,
                           "spec": None if self.spec is None else self.spec.to_json()})

    @classmethod
    def loads(cls, raw: bytes | str | None) -> Handover:
        if not raw:
            return cls()
        doc = json.loads(raw)
        return cls(doc.get("token"), None if doc.get("spec") is None
                   else JobSpec.from_json(doc["spec"]))


def handover_key(job_id: str) -> str:
    return HANDOVER_PREFIX + job_id


async def _save(redis: ArqRedis, job_id: str, handover: Handover) -> None:
    await redis.set(handover_key(job_id), handover.dumps(), ex=HANDOVER_TTL_S)


# ---------------------------------------------------------------- the producer


class ProgressArqJob(ArqJob):
    """ARQ's Job, as `enqueue` answers it: `abort()` also cancels a job still waiting.

    ARQ never calls the function of a job aborted before a worker takes it, so its
    worker could not end the job; this does, before asking ARQ to abort.
    """

    __slots__ = ("_service",)

    def __init__(self, job: ArqJob, redis: ArqRedis, queue_name: str,
                 service: tuple[str | None, str | None]) -> None:
        super().__init__(job.job_id, redis, _queue_name=queue_name,
                         _deserializer=redis.job_deserializer)
        self._service = service

    async def abort(self, *, timeout: float | None = None, poll_delay: float = 0.5) -> bool:
        if await self.status() in (JobStatus.deferred, JobStatus.queued):
            url, token = self._service
            async with AsyncProgressClient(url, token=token, retries=1,
                                           timeout=ENQUEUE_TIMEOUT_S) as pc:
                await _abandon(pc, self.job_id, "aborted in ARQ before it started")
        return await super().abort(timeout=timeout, poll_delay=poll_delay)


async def enqueue(redis: ArqRedis, function: ProgressFunction[..., Any] | str, *args: Any,
                  _job_id: str | None = None, _queue_name: str | None = None,
                  _defer_until: datetime | None = None,
                  _defer_by: int | float | timedelta | None = None,
                  _expires: int | float | timedelta | None = None,
                  _title: str | None = None, _progress: AsyncProgressClient | None = None,
                  **kwargs: Any) -> ProgressArqJob | None:
    """Create the job (`queued`, the ARQ queue as its `queue`), then enqueue it in ARQ.

    The progress job's id is the ARQ job's `job_id`. None, as ARQ's `enqueue_job`
    answers, when a job with `_job_id` already exists; its `abort()` also cancels
    the job while it waits (ProgressArqJob). `_progress` is the client to
    create with (default: $PROGRESS_SSE_URL and $PROGRESS_SSE_TOKEN, with one retry and
    a timeout of ENQUEUE_TIMEOUT_S, so an unreachable service delays the enqueue by at
    most about twice that).
    """
    name = function if isinstance(function, str) else function.__qualname__
    spec = JobSpec(kind=name) if isinstance(function, str) else function.progress_spec
    job_id = _job_id or uuid.uuid4().hex
    queue = _queue_name or redis.default_queue_name
    spec = dataclasses.replace(spec, queue=queue,
                               title=spec.title if _title is None else _title)
    handover = await _create(_progress, spec, job_id)
    try:
        if handover.token is not None or handover.spec is not None:
            await _save(redis, job_id, handover)
        job = await redis.enqueue_job(name, *args, _job_id=job_id, _queue_name=queue,
                                      _defer_until=_defer_until, _defer_by=_defer_by,
                                      _expires=_expires, **kwargs)
    except Exception:
        if handover.token is not None:  # do not leave a job queued that nobody will run
            await _abandon(_progress, job_id, "could not be enqueued in ARQ")
        raise
    if job is None:
        return None
    log.info("arq job %s enqueued on %s; progress job %s", job_id, queue,
             "created" if handover.spec is None else "to be created by its worker")
    service = (None, None) if _progress is None else (_progress.url, _progress.token)
    return ProgressArqJob(job, redis, queue, service)


async def _create(pc: AsyncProgressClient | None, spec: JobSpec, job_id: str) -> Handover:
    """Create the job; when the service is away, the create fields for the worker."""
    try:
        if pc is not None:
            created = await spec.create(pc, job_id)
        else:
            async with AsyncProgressClient(retries=1, backoff=0.25,
                                           timeout=ENQUEUE_TIMEOUT_S) as own:
                created = await spec.create(own, job_id)
    except ServiceUnavailable as exc:
        log.warning("job %s: the service is unreachable (%s); enqueued anyway, its worker "
                    "creates it", job_id, exc)
        return Handover(spec=spec)
    except APIError as exc:
        if exc.status_code < 500:
            raise
        log.warning("job %s: the service answered %s; enqueued anyway, its worker creates it",
                    job_id, exc)
        return Handover(spec=spec)
    return Handover(token=created.worker_token)


async def _abandon(pc: AsyncProgressClient | None, job_id: str, reason: str) -> None:
    try:
        if pc is not None:
            await pc.cancel(job_id, reason)
        else:
            async with AsyncProgressClient(retries=1, timeout=ENQUEUE_TIMEOUT_S) as own:
                await own.cancel(job_id, reason)
    except ProgressClientError as exc:
        log.warning("job %s stays queued: could not cancel it (%s)", job_id, exc)


# ---------------------------------------------------------------- the worker


def progress_job(*, kind: str | None = None, title: str = "",
                 stages: Sequence[StageSpec] | None = None, total: float | None = None,
                 meta: Mapping[str, Any] | None = None,
                 heartbeat_timeout_s: float | None = None, webhook: str | None = None,
                 webhook_events: Sequence[str] | None = None,
                 notify_email: str | Sequence[str] | None = None,
                 max_tries: int = ARQ_MAX_TRIES
                 ) -> Callable[[JobFunction[P, R]], ProgressFunction[P, R]]:
    """Make `async def f(ctx, job, ...)` an ARQ function whose job reports to progress-sse.

    The create fields are those of `AsyncProgressClient.create` (`kind` defaults to the
    function's name). The worker finds the service in `ctx["progress_sse_url"]` and
    `ctx["progress_sse_token"]` (WorkerSettings.ctx), else $PROGRESS_SSE_URL and
    $PROGRESS_SSE_TOKEN; `ctx["progress_sse_finish_timeout"]` bounds how long a finish
    waits for an unreachable service (FINISH_TIMEOUT_S).

    `max_tries` is ARQ's for this function (its default is 5): a `Retry` raised on the
    last try ends the job `failed` rather than queued for a try ARQ will not run.
    """

    def decorate(fn: JobFunction[P, R]) -> ProgressFunction[P, R]:
        spec = JobSpec(kind=kind or fn.__name__, title=title, stages=tuple(stages or ()),
                       total=total, meta=dict(meta) if meta else None,
                       heartbeat_timeout_s=heartbeat_timeout_s, webhook=webhook,
                       webhook_events=None if webhook_events is None else tuple(webhook_events),
                       notify_email=notify_email if notify_email is None
                       or isinstance(notify_email, str) else tuple(notify_email))

        async def run(ctx: dict[Any, Any], *args: P.args, **kwargs: P.kwargs) -> R | None:
            return await _Run(ctx, spec, max_tries).run(
                lambda job: fn(ctx, job, *args, **kwargs))

        run.__name__ = fn.__name__
        run.__qualname__ = fn.__qualname__
        run.__doc__ = fn.__doc__
        run.__module__ = fn.__module__
        made = cast(ProgressFunction[P, R], run)
        made.progress_spec = spec
        return made

    return decorate


class _Run:
    """One ARQ try of a decorated function: its job from start to outcome."""

    def __init__(self, ctx: dict[Any, Any], spec: JobSpec, max_tries: int) -> None:
        self.ctx = ctx
        self.spec = spec
        self.max_tries = max_tries
        self.job_id = str(ctx["job_id"])
        self.job_try = int(ctx.get("job_try") or 1)
        self.redis: ArqRedis = ctx["redis"]

    async def run(self, body: Callable[[AsyncJob], Awaitable[R]]) -> R | None:
        async with AsyncProgressClient(
                self.ctx.get("progress_sse_url"), token=self.ctx.get("progress_sse_token"),
                finish_timeout=float(self.ctx.get("progress_sse_finish_timeout",
                                                  FINISH_TIMEOUT_S))) as pc:
            handover = Handover.loads(await self.redis.get(handover_key(self.job_id)))
            try:
                token, attempt = await self._start(pc, handover)
            except ServiceUnavailable as exc:
                log.warning("job %s: the service is unreachable (%s); ARQ runs this try "
                            "again in %.0fs", self.job_id, exc, START_RETRY_S)
                raise Retry(defer=START_RETRY_S) from exc
            job = pc.attach(self.job_id, token=token, attempt=attempt)
            try:
                value = await self._attached(pc, job, body)
            except (Retry, asyncio.CancelledError):
                raise  # ARQ may run it again: the next try needs the handover
            except BaseException:
                await self.redis.delete(handover_key(self.job_id))
                raise
            await self.redis.delete(handover_key(self.job_id))
            return value

    async def _start(self, pc: AsyncProgressClient, handover: Handover
                     ) -> tuple[str | None, int]:
        """Make sure the job exists at this try's attempt; its worker token and attempt."""
        token = handover.token
        try:
            state = await pc.get(self.job_id)
        except APIError as exc:
            if exc.status_code != 404:
                raise
            created = await (handover.spec or self.spec).create(pc, self.job_id)
            state, token = created.job, created.worker_token or token
            if created.worker_token is not None:
                await _save(self.redis, self.job_id, Handover(token=created.worker_token))
            log.info("job %s created by its worker (try %d)", self.job_id, self.job_try)
        while int(state.get("attempt") or 1) < self.job_try and state["status"] != "succeeded":
            # the previous try's worker was lost (or its requeue did not get through)
            await pc.request("POST", f"/api/jobs/{self.job_id}/requeue",
                             json={"reason": f"ARQ try {self.job_try}"})
            state = await pc.get(self.job_id)
        return token, int(state.get("attempt") or 1)

    async def _attached(self, pc: AsyncProgressClient, job: AsyncJob,
                        body: Callable[[AsyncJob], Awaitable[R]]) -> R | None:
        """Run the function on its job; the job's outcome follows the function's."""
        started = time.monotonic()
        value: R | None = None
        try:
            async with job:
                if job.control.status == "cancelled":  # cancelled while it was queued
                    log.info("job %s was cancelled before it started", self.job_id)
                    return None
                try:
                    value = await body(job)
                except Retry as exc:
                    if self.job_try >= self.max_tries:
                        await self._record(job, "failed", f"try {self.job_try} of "
                                           f"{self.max_tries} asked ARQ for a retry: {exc!r}")
                    else:
                        await self._retry(pc, job, exc)
                    raise
                except asyncio.CancelledError:
                    await self._interrupted(job, time.monotonic() - started)
                    raise
                if _is_json(value):
                    job.result = value
                else:
                    await job.log(f"the result was not stored: a {type(value).__name__} is "
                                  "not JSON", level="warning")
        except StaleAttemptError as exc:  # requeued from the dashboard: run the new attempt
            log.info("job %s: this try was fenced off (%s); ARQ runs it again", self.job_id, exc)
            raise Retry(defer=0) from exc
        except ServiceUnavailable as exc:  # the finish was not recorded: the work stands
            log.warning("job %s: %s", self.job_id, exc)
        except APIError as exc:  # the service refused the result (too large, say)
            if exc.field != "result":
                raise
            with contextlib.suppress(ProgressClientError):
                await job.log(f"the result was not stored: {exc.message}", level="warning")
            await self._record(job, "succeeded", None)
        return value

    async def _retry(self, pc: AsyncProgressClient, job: AsyncJob, exc: Retry) -> None:
        """Start the next attempt now, so this try's late posts are refused."""
        defer = (exc.defer_score or 0) / 1000
        try:
            await job.log(f"ARQ retries the job in {defer:g}s (try {self.job_try + 1})",
                          level="warning")
            await pc.request("POST", f"/api/jobs/{self.job_id}/requeue",
                             json={"reason": f"ARQ retry (try {self.job_try + 1})"})
            await job.refresh()
            await job.checkpoint()  # learns of the new attempt: the handle stops here
        except StaleAttemptError:
            return
        except ProgressClientError as err:  # the next try requeues it when it starts
            log.warning("job %s: could not requeue for the retry (%s)", self.job_id, err)

    async def _interrupted(self, job: AsyncJob, ran: float) -> None:
        """ARQ cancelled the function: an abort, a job timeout or a worker shutdown."""
        try:
            async with asyncio.timeout(INTERRUPTED_FINISH_S):
                await self._record(job, "cancelled", f"the ARQ worker cancelled the function "
                                   f"after {ran:.1f}s (an abort, a job timeout or a worker "
                                   "shutdown)")
        except TimeoutError:
            log.warning("job %s: could not record the cancel in %gs", self.job_id,
                        INTERRUPTED_FINISH_S)

    async def _record(self, job: AsyncJob, status: str, error: str | None) -> None:
        """Finish the job; a finish the service did not record is logged, not raised."""
        try:
            await job.finish(status, error=error)
        except (ProgressClientError, Cancelled) as exc:  # Cancelled: it was, meanwhile
            log.warning("job %s: could not record %s (%s)", self.job_id, status, exc)


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True

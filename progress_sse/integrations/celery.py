"""Celery tasks tracked by progress-sse with one decorator (the `[celery]` extra).

    app = Celery("demo", broker="redis://127.0.0.1:6379/0")

    @progress_task(app, kind="export")
    def export(job, n):
        for i in range(n):
            job.progress(current=i + 1, total=n)
            job.checkpoint()
        return {"rows": n}

Choices that may look odd but are deliberate:

* Enqueueing (`delay`, `apply_async`, a signature's) creates the job, `queued`, under
  the Celery task id, with the Celery queue as the job's `queue`. The job's worker token
  and attempt travel in one message header (`progress_sse`), never in the task's
  arguments: Flower, the task events and the result backend (even with
  `result_extended`) show arguments, not custom headers. Whoever reads the broker sees
  it, as they see the tasks themselves; it opens this one job only.
* The job's record decides what a delivery does, so one that should not run does not:
  a job cancelled while queued skips the body; a job this attempt already started
  (the message came again: a worker lost under `acks_late`, a visibility timeout) is
  requeued first, a new attempt that fences off the earlier execution; a message of a
  superseded attempt is dropped (Ignore).
* A retry (`self.retry()`, `autoretry_for`) re-sends the message through
  `apply_async`, which requeues the job: a new attempt, `queued` until a worker takes
  it, and the old attempt's posts are refused (409).
* A dashboard cancel ends the body at its next `checkpoint()`; the job ends
  `cancelled` and the Celery task is stored REVOKED (as `revoke` would) and ends with
  Ignore: not a failure, and never retried (autoretry lets Ignore through).
* `revoke()` reaches a job through the worker's `task_revoked` signal, which finishes
  it `cancelled`: for a task still waiting, when a worker comes to its message; for a
  running one only where `terminate=True` can stop it (prefork: the child is killed).
  The solo and threads pools cannot terminate a running task; it runs on.
* An outage never breaks the task. Enqueue tries the service once, briefly, and
  enqueues anyway (a refusal, though, raises: the create's fields or token are
  wrong); the worker then creates the job (same id, the create fields from the header)
  when it starts, waiting for the service up to `progress_sse_start_timeout` seconds
  (default 60), after which the body runs with a job that reports nothing. During the
  body the SDK keeps posts until the service is back; a finish it could not record is
  logged, and the task's outcome stands.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from celery import Celery, Task
from celery.exceptions import Ignore, Retry
from celery.signals import task_revoked
from celery.utils import uuid

from ..client import (
    OUTAGE_RETRY_CAP_S,
    Control,
    Job,
    JobFinishedError,
    ProgressClient,
    ProgressClientError,
    StaleAttemptError,
)
from ..client.protocol import unreachable
from ..schema import check_document

__all__ = ["CREATE_FIELDS", "HEADER", "ProgressTask", "progress_task"]

log = logging.getLogger("progress_sse.integrations.celery")

HEADER = "progress_sse"  # the message header that carries the job's hand-over
OPTION = "progress_sse"  # apply_async(..., progress_sse={...}): create fields for one call
CREATE_FIELDS = frozenset({"kind", "title", "stages", "total", "meta", "heartbeat_timeout_s",
                           "webhook", "webhook_events", "notify_email"})
ENQUEUE_TIMEOUT_S = 3.0  # enqueue waits at most this long for the service
DEFAULT_START_TIMEOUT_S = 60.0


class _Request(Protocol):
    """The part of Celery's task request (`task.request`, untyped) read here."""

    id: str
    retries: int
    delivery_info: Mapping[str, Any] | None

    def get(self, key: str, default: Any = None) -> Any: ...


@dataclass(frozen=True)
class _Handoff:
    """What enqueue hands the worker in the message header."""

    attempt: int | None = None  # None: the enqueue did not reach the service
    token: str | None = None
    spec: Mapping[str, Any] | None = None  # the create fields, when the job may not exist

    def header(self) -> dict[str, Any]:
        return {k: v for k, v in (("attempt", self.attempt), ("token", self.token),
                                  ("spec", self.spec)) if v is not None}

    @classmethod
    def read(cls, value: Any) -> _Handoff | None:
        if not isinstance(value, Mapping):
            return None
        attempt, token, spec = value.get("attempt"), value.get("token"), value.get("spec")
        return cls(attempt if isinstance(attempt, int) else None,
                   token if isinstance(token, str) else None,
                   spec if isinstance(spec, Mapping) else None)


def _config(app: Celery, name: str) -> Any:
    """A setting of the app: `progress_sse_url` and `progress_sse_token` (None: the SDK
    reads $PROGRESS_SSE_URL and $PROGRESS_SSE_TOKEN), `progress_sse_start_timeout`."""
    return cast(Mapping[str, Any], app.conf).get(name)


def _queue_name(task: Task, options: Mapping[str, Any], args: Any, kwargs: Any) -> str:
    """The queue Celery will route this message to (routes, the task's own, the default)."""
    merged = {**task._get_exec_options(), **options}
    routed = cast(Mapping[str, Any], task.app.amqp.router.route(
        merged, task.name, args or (), kwargs or {}, task))
    queue = routed.get("queue")
    return str(getattr(queue, "name", queue) or task.app.conf.task_default_queue)


class ProgressTask(Task):  # type: ignore[misc]  # celery ships no type information
    """A Celery task whose enqueue creates (or, on a retry, requeues) its job."""

    progress_fields: Mapping[str, Any] = {}
    _progress_clients: dict[tuple[Any, ...], ProgressClient] | None = None

    def progress_client(self, *, producer: bool = False) -> ProgressClient:
        """The client for enqueue (`producer`: one try, briefly, since the message goes
        out regardless) or for the task's executions (the SDK's retries and timeouts).

        One of each per process and configuration, kept on the task as Celery suggests
        for resources (a client costs ~40 ms to make, mostly its TLS context); a forked
        child makes its own.
        """
        if self._progress_clients is None:
            self._progress_clients = {}
        url, token = _config(self.app, "progress_sse_url"), _config(self.app, "progress_sse_token")
        key = (os.getpid(), producer, url, token)
        if key not in self._progress_clients:
            self._progress_clients[key] = (
                ProgressClient(url, token=token, retries=0, timeout=ENQUEUE_TIMEOUT_S)
                if producer else ProgressClient(url, token=token))
        return self._progress_clients[key]

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    *rest: Any, **options: Any) -> Any:
        if self.typing:  # Celery checks the arguments too, but only after the create
            self.__header__(*(args or ()), **(kwargs or {}))
        task_id = task_id or str(uuid())
        fields = options.pop(OPTION, None) or {}
        headers = dict(options.get("headers") or {})
        earlier = _Handoff.read(headers.get(HEADER))
        if earlier is not None:  # a message re-sent from its request: a retry
            handoff = self._requeue(task_id, earlier, options.get("retries"))
        else:
            spec = {**self.progress_spec(), **fields,
                    "queue": _queue_name(self, options, args, kwargs)}
            handoff = self._create(task_id, spec)
        options["headers"] = {**headers, HEADER: handoff.header()}
        try:
            return super().apply_async(args, kwargs, task_id, *rest, **options)
        except Exception as exc:  # not enqueued (the broker is down): no job waits for it
            if earlier is None and handoff.attempt is not None:
                self._abandon(task_id, exc)
            raise

    def _abandon(self, task_id: str, exc: Exception) -> None:
        with contextlib.suppress(ProgressClientError):
            self.progress_client(producer=True).cancel(
                task_id, reason=f"not enqueued: {exc!r}"[:200])

    def progress_spec(self) -> dict[str, Any]:
        """The create fields from the decorator, with the task's name as kind and title."""
        return {"kind": self.name, "title": self.name, **self.progress_fields}

    def _create(self, task_id: str, spec: dict[str, Any]) -> _Handoff:
        try:
            created = self.progress_client(producer=True).create(id=task_id, **spec)
        except ProgressClientError as exc:
            if not unreachable(exc):  # refused (a bad field, a bad token): say so now
                raise
            log.warning("job %s: not created at enqueue (%s); the worker creates it", task_id,
                        exc)
            return _Handoff(spec=spec)
        return _Handoff(int(created.job.get("attempt") or 1), created.worker_token)

    def _requeue(self, task_id: str, earlier: _Handoff, retries: Any) -> _Handoff:
        """Start the job's next attempt, so the retried execution's posts are its own."""
        expected = (earlier.attempt or 1) + 1
        try:
            answer = self.progress_client(producer=True).request(
                "POST", f"/api/jobs/{task_id}/requeue", json={"reason": f"Celery retry {retries}"})
            attempt = int(answer["job"]["attempt"])
        except ProgressClientError as exc:  # the worker requeues when it starts
            log.warning("job %s: not requeued at retry (%s)", task_id, exc)
            attempt = expected
        return _Handoff(attempt, earlier.token, earlier.spec)


def progress_task(app: Celery, **fields: Any) -> Callable[[Callable[..., Any]], Any]:
    """A decorator: the function becomes a Celery task of `app` whose first argument is
    its attached SDK job. Create fields (kind, title, stages, total, meta,
    heartbeat_timeout_s, webhook, webhook_events, notify_email) set the job; every other
    keyword goes to `app.task` (name, queue, autoretry_for, acks_late, ...)."""
    create = {k: v for k, v in fields.items() if k in CREATE_FIELDS}
    options = {k: v for k, v in fields.items() if k not in CREATE_FIELDS}
    task_revoked.connect(_on_revoked, weak=False, dispatch_uid=f"{__name__}.revoked")

    def decorate(fn: Callable[..., Any]) -> Any:
        @functools.wraps(fn)
        def run(task: ProgressTask, *args: Any, **kwargs: Any) -> Any:
            return _execute(task, fn, args, kwargs)

        # Celery reads the arguments a call must match from here: the body's, whose first
        # (`job`) stands where a bound task's `self` would
        run.__dict__["__signature__"] = inspect.signature(fn)

        return app.task(run, bind=True, base=ProgressTask, progress_fields=create,
                        **options)

    return decorate


# ---------------------------------------------------------------- the worker


def _execute(task: ProgressTask, fn: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
    """Run the body with its job attached, and finish the job by how the body ended."""
    request = cast(_Request, task.request)
    pc = task.progress_client()
    try:
        job = _start(task, pc, request)
    except _Skip as skip:
        if skip.revoked:
            _store_revoked(task, request, "cancelled from progress-sse before it started")
        raise Ignore() from None
    try:
        value = fn(job, *args, **kwargs)
    except Retry:  # apply_async requeued the job: this attempt ends without a finish
        job.__exit__(StaleAttemptError, _superseded(job), None)
        raise
    except (StaleAttemptError, JobFinishedError):
        # a newer execution of the task owns the job (and may have finished it): this
        # one ends without a finish and leaves the task's state to that one
        job.__exit__(StaleAttemptError, _superseded(job), None)
        raise Ignore() from None
    except BaseException as exc:
        if _autoretried(task, request, exc):  # autoretry_for calls retry() next
            with contextlib.suppress(ProgressClientError):
                job.log(f"attempt {job.attempt} raised {exc!r}; Celery retries it",
                        level="warning")
            job.__exit__(StaleAttemptError, _superseded(job), None)
            raise
        if not job.__exit__(type(exc), exc, exc.__traceback__):
            raise
        # checkpoint() obeyed a cancel
        _store_revoked(task, request, job.control.reason or "cancelled from progress-sse")
        raise Ignore() from None
    job.result = _storable(job, value)
    try:
        job.__exit__(None, None, None)
    except ProgressClientError as exc:  # not recorded, or refused: the task's result stands
        log.warning("job %s: the finish was not recorded (%s); the task succeeded",
                    job.id, exc)
    return value


class _Skip(Exception):
    """This delivery must not run the body; `revoked`: the job was cancelled."""

    def __init__(self, revoked: bool = False) -> None:
        super().__init__()
        self.revoked = revoked


def _start(task: ProgressTask, pc: ProgressClient, request: _Request) -> Job:
    """The job attached for this delivery; raises _Skip when it must not run."""
    handoff = _Handoff.read(_header(request)) or _Handoff()
    spec = dict(handoff.spec or {**task.progress_spec(), "queue": _delivered_queue(request)})
    deadline = time.monotonic() + float(_config(task.app, "progress_sse_start_timeout")
                                        or DEFAULT_START_TIMEOUT_S)
    failures = 0
    while True:
        try:
            return _attach(pc, request.id, handoff, spec)
        except (StaleAttemptError, JobFinishedError) as exc:  # changed meanwhile
            log.info("job %s: %s; the delivery is skipped", request.id, exc)
            raise _Skip() from None
        except ProgressClientError as exc:
            if not unreachable(exc):
                log.error("job %s: the service refused it (%s); the task runs unreported",
                          request.id, exc)
                return _Unreported(pc, request.id)
            if time.monotonic() >= deadline:
                log.warning("job %s: the service stayed unreachable (%s); the task runs "
                            "unreported", request.id, exc)
                return _Unreported(pc, request.id)
            failures += 1
            time.sleep(min(OUTAGE_RETRY_CAP_S, 0.25 * 2**failures) * random.uniform(0.5, 1))


def _attach(pc: ProgressClient, job_id: str, handoff: _Handoff, spec: dict[str, Any]) -> Job:
    created = pc.create(id=job_id, **spec)  # the job as it is, if it exists
    token = handoff.token or created.worker_token
    job, attempt = created.job, int(created.job.get("attempt") or 1)
    wanted = handoff.attempt or attempt
    if attempt > wanted:
        log.info("job %s: attempt %s was superseded by %s; skipped", job_id, wanted, attempt)
        raise _Skip()
    status = job.get("status")
    if status == "cancelling":  # its worker was lost while cancelling: do what it would
        with contextlib.suppress(ProgressClientError):
            pc.post_worker(job_id, "finish", {"status": "cancelled", "attempt": attempt},
                           token=token)
        raise _Skip(revoked=True)
    if status in ("succeeded", "failed", "cancelled"):
        log.info("job %s is %s; the delivery is skipped", job_id, status)
        raise _Skip(revoked=status == "cancelled")
    if attempt < wanted or job.get("started_at") is not None:
        # the retry's requeue did not get through, or an earlier delivery of this
        # attempt started it (a lost worker's message came again): a new attempt
        answer = pc.request("POST", f"/api/jobs/{job_id}/requeue",
                            json={"reason": "the task was delivered again"})
        attempt = int(answer["job"]["attempt"])
    attached = pc.attach(job_id, token=token, attempt=attempt)
    attached.__enter__()
    return attached


def _header(request: _Request) -> Any:
    """The hand-over: a message header is an attribute of the request; under
    `task_always_eager` (apply) it is only in the request's `headers`."""
    return request.get(HEADER) or (request.get("headers") or {}).get(HEADER)


def _delivered_queue(request: _Request) -> str | None:
    info = request.delivery_info or {}
    queue = info.get("routing_key")
    return str(queue) if queue else None


def _autoretried(task: ProgressTask, request: _Request, exc: BaseException) -> bool:
    """Whether Celery's autoretry (which wraps this run) will retry on `exc`: then the
    requeue, not a failure, ends this attempt."""
    retry_on = tuple(getattr(task, "autoretry_for", ()) or ())
    never = tuple(getattr(task, "dont_autoretry_for", ()) or ())
    if not retry_on or not isinstance(exc, retry_on) or (never and isinstance(exc, never)):
        return False
    limit = getattr(task, "override_max_retries", None)
    if limit is None:
        kwargs = getattr(task, "retry_kwargs", None) or {}
        limit = kwargs["max_retries"] if "max_retries" in kwargs else task.max_retries
    return limit is None or request.retries < int(limit)


def _superseded(job: Job) -> StaleAttemptError:
    """What ends a handle without a finish: its attempt is another's now."""
    return StaleAttemptError(409, "stale_attempt", f"attempt {job.attempt} was superseded",
                             "attempt")


def _storable(job: Job, value: Any) -> Any:
    """The return value as the job's result, if the service can store it; else None, and
    a line in the job's log saying why."""
    try:
        return check_document(json.loads(json.dumps(value, allow_nan=False)))
    except (TypeError, ValueError) as exc:
        with contextlib.suppress(ProgressClientError):
            job.log(f"the task's return value is not stored as the job's result: {exc}",
                    level="warning")
        return None


def _store_revoked(task: ProgressTask, request: _Request, reason: str) -> None:
    """Store the task REVOKED, as revoke would, so its state says what happened."""
    with contextlib.suppress(Exception):  # a backend that stores nothing, or is down
        task.backend.mark_as_revoked(request.id, reason, request=request)


def _on_revoked(sender: Any = None, request: Any = None, terminated: bool = False,
                signum: Any = None, expired: bool = False, **_: Any) -> None:
    """A revoke reached the worker: finish the job `cancelled` (a no-op if it is over)."""
    if not isinstance(sender, ProgressTask) or request is None:
        return
    req = cast(_Request, request)
    handoff = _Handoff.read(_header(req)) or _Handoff()
    why = "expired" if expired else f"terminated ({signum})" if terminated else "revoked"
    body: dict[str, Any] = {"status": "cancelled", "error": f"Celery: {why}"}
    if handoff.attempt is not None:
        body["attempt"] = handoff.attempt
    try:
        sender.progress_client(producer=True).post_worker(req.id, "finish", body,
                                                          token=handoff.token)
    except ProgressClientError as exc:
        log.info("job %s: not finished after the revoke (%s)", req.id, exc)


class _Unreported(Job):
    """The job of a task that runs while the service stays unreachable: reports nothing."""

    def __init__(self, pc: ProgressClient, job_id: str) -> None:
        super().__init__(pc, job_id=job_id, token=None, attempt=None, spec=None)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: Any) -> Literal[False]:
        return False

    def progress(self, *args: Any, **kwargs: Any) -> Control:
        return self.control

    def stage(self, *args: Any, **kwargs: Any) -> Control:
        return self.control

    def log(self, *args: Any, **kwargs: Any) -> Control:
        return self.control

    def checkpoint(self) -> None:
        return None

    def finish(self, *args: Any, **kwargs: Any) -> None:
        return None

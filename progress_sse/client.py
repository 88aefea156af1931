"""Worker SDK: report a job's progress from Python, sync or async, with the same shape.

    with ProgressClient("http://127.0.0.1:8000") as pc:
        with pc.job(kind="video", title="intro.mp4", stages=["fetch", "encode"]) as job:
            job.stage("fetch")
            for i, chunk in enumerate(chunks):
                job.progress(current=i + 1, total=len(chunks))
                job.checkpoint()  # raises Cancelled on a cancel request; blocks while paused

Choices that may look odd but are deliberate:

* Every worker post carries `seq` (increasing per job attempt) and `attempt`. A post
  retried after a lost answer is then stored once, and a worker whose attempt was
  superseded (the job was requeued) is refused instead of writing into the new one.
  A handle that created its job counts from 1; one that attaches to an existing job
  starts from the clock (`clock_seq()`), so it is ahead of any earlier worker.
* Every post goes through one ordered outbox. Progress is throttled, never dropped: a
  value that comes too soon waits there (newer values replace it) and goes out at the
  next allowed moment, from the caller or from the background heartbeat. Stage
  changes, log lines and the finish are never merged away, so the stored order is the
  order of the calls.
* Reporting must never end the work it reports on. When the service is unreachable
  (connection refused or reset, a timeout, 5xx, 408, 429), posts stay in the outbox
  and the call returns at once; the background retries with backoff and flushes the
  outbox in order when the service is back. A post keeps the `seq` of its first
  attempt, so a re-send whose first answer was lost is stored once. The outbox is
  bounded: progress is merged (only the newest value counts), log lines beyond
  `max_buffered_logs` drop the oldest (counted, and one warning line says so).
  Only `finish` waits, up to `finish_timeout`; then it raises NotRecorded.
* A block swallows the `Cancelled` of its own job: the cancel was obeyed and the job
  ended `cancelled`, which `job.status` shows. Every other exception propagates.
* Worker posts authenticate with the job's worker token when there is one; everything
  else with the client's token (`Authorization: Bearer`).
* `events()` reads a stream and resumes it by itself (Last-Event-ID, the stream's
  `retry:` delay). The wire is parsed by httpx-sse, a maintained parser that splits
  lines on CR, LF and CRLF only, not by one of our own; its one surprise, an event
  without data for a blank line once an id was seen, is dropped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import secrets
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncGenerator, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import EventSource, ServerSentEvent

log = logging.getLogger("progress_sse.client")

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "PROGRESS_SSE_URL"
TOKEN_ENV = "PROGRESS_SSE_TOKEN"
LONG_POLL_S = 25.0  # one control long-poll while paused; the server caps it (max_wait_s)
MAX_ERROR_CHARS = 8000  # the server's limit for `error` and log messages
ABANDONED = "worker interrupted while starting"
WORKER_POSTS = frozenset({"progress", "log", "finish", "heartbeat"})
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_RETRY_S = 1.0  # the reconnect delay until a stream's `retry:` says otherwise
MAX_RECONNECT_S = 30.0  # the longest backoff between failed reconnects (unless `retry:` is longer)
STREAM_READ_TIMEOUT_S = 60.0  # several keep-alives (15 s by default): a silent stream is dead

StageSpec = str | Mapping[str, Any]


# ---------------------------------------------------------------- errors


class ProgressClientError(Exception):
    """Base of every error the SDK raises."""


class ServiceUnavailable(ProgressClientError):
    """The service stayed unreachable (or kept answering 5xx) through every retry."""


class NotRecorded(ServiceUnavailable):
    """`finish` ran out of `finish_timeout` with the service unreachable.

    The message names what the job's record lacks: the finish itself, how many
    progress and log posts were still waiting, and how many log lines were dropped.
    """

    def __init__(self, job_id: str | None, *, status: str | None, progress_posts: int,
                 log_lines: int, dropped_logs: int, waited: float) -> None:
        parts = [f"the finish ({status})" if status else "the finish"]
        if progress_posts:
            parts.append(_count(progress_posts, "progress post"))
        if log_lines:
            parts.append(_count(log_lines, "log line"))
        dropped = (f"; {_count(dropped_logs, 'log line')} had already been dropped"
                   if dropped_logs else "")
        super().__init__(f"job {job_id}: the service stayed unreachable for {waited:.0f}s; "
                         f"not recorded: {', '.join(parts)}{dropped}")
        self.job_id = job_id
        self.status = status
        self.progress_posts = progress_posts
        self.log_lines = log_lines
        self.dropped_logs = dropped_logs


class APIError(ProgressClientError):
    """The service refused a request; `status_code`, `code` and `field` say why."""

    def __init__(self, status_code: int, code: str, message: str,
                 field: str | None = None) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.field = field


class JobFinishedError(APIError):
    """The job has already finished (someone else finished it); it takes no more posts."""


class StaleAttemptError(APIError):
    """The job was requeued: this worker's attempt was superseded, so it must stop."""


class Cancelled(Exception):
    """A cancel was requested for the job. Raised by `checkpoint()`; the job's block swallows it."""

    def __init__(self, job_id: str | None, reason: str | None = None) -> None:
        super().__init__(f"job {job_id} was cancelled" + (f": {reason}" if reason else ""))
        self.job_id = job_id
        self.reason = reason


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class Control:
    """What the worker must obey, as of the last answer from the service."""

    cancel_requested: bool = False
    pause_requested: bool = False
    reason: str | None = None
    status: str | None = None
    attempt: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Control:
        return cls(bool(d.get("cancel_requested")), bool(d.get("pause_requested")),
                   d.get("reason"), d.get("status"), d.get("attempt"))

    def as_dict(self) -> dict[str, Any]:
        return {"cancel_requested": self.cancel_requested,
                "pause_requested": self.pause_requested, "reason": self.reason,
                "status": self.status, "attempt": self.attempt}


@dataclass(frozen=True)
class CreatedJob:
    """A producer's view of a new job: the job and the token its worker needs."""

    job: dict[str, Any]
    worker_token: str | None  # None when the id already existed (a repeat of the create)
    created: bool

    @property
    def id(self) -> str:
        return str(self.job["id"])


@dataclass(frozen=True)
class _Options:
    max_rate: float | None
    retries: int
    backoff: float
    timeout: float
    heartbeat_interval: float | None
    control_max_age: float
    finish_timeout: float = 120.0
    max_buffered_logs: int = 1000


# ---------------------------------------------------------------- pure helpers


def resolve_url(url: str | None) -> str:
    """The service URL: the argument, else $PROGRESS_SSE_URL, else the local default."""
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def resolve_token(token: str | None) -> str | None:
    return token if token is not None else (os.environ.get(TOKEN_ENV) or None)


def clock_seq() -> int:
    """A first `seq` ahead of any earlier worker's: the clock in 10-microsecond units.

    The service takes numbers up to 1e15, which this stays under until the year 2286.
    """
    return time.time_ns() // 10_000


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _retry_delays(retries: int, backoff: float, cap: float = 8.0) -> Iterator[float]:
    """Exponential backoff with jitter, so many workers do not retry in step."""
    for i in range(retries):
        yield min(cap, backoff * 2**i) * random.uniform(0.5, 1.0)


def _retryable(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def _unreachable(exc: BaseException) -> bool:
    """A failure that says nothing about the post itself: keep it and send it again later."""
    return isinstance(exc, ServiceUnavailable) or (
        isinstance(exc, APIError) and _retryable(exc.status_code))


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _retry_after(response: httpx.Response) -> float:
    raw = response.headers.get("retry-after", "")
    return min(float(raw), 30.0) if raw.replace(".", "", 1).isdigit() else 0.0


def _api_error(response: httpx.Response) -> APIError:
    try:
        err = response.json()["error"]
        code, message, field = str(err["code"]), str(err["message"]), err.get("field")
    except (ValueError, KeyError, TypeError):
        code, message, field = "http_error", response.text[:200] or response.reason_phrase, None
    kind = {"job_finished": JobFinishedError, "stale_attempt": StaleAttemptError}.get(
        code, APIError)
    return kind(response.status_code, code, message, field)


def _decode(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise _api_error(response)
    if response.status_code == 204 or not response.content:
        return {}
    body: dict[str, Any] = response.json()
    return body


def _clean(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Text the service accepts: no control characters, within its length limit."""
    text = _CONTROL_CHARS.sub("?", text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _fields(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _merge(pending: dict[str, Any] | None, update: dict[str, Any]) -> dict[str, Any]:
    """The newest progress wins; a newer `current` makes an older `progress` stale."""
    merged = dict(pending or {})
    if "current" in update and "progress" not in update:
        merged.pop("progress", None)
    merged.update(update)
    return merged


def _job_spec(*, kind: str, title: str, queue: str | None, stages: Sequence[StageSpec] | None,
              total: float | None, meta: Mapping[str, Any] | None, id: str | None,
              heartbeat_timeout_s: float | None) -> dict[str, Any]:
    """The create body; a client-made id makes a retried create safe."""
    return _fields(id=id or f"j_{secrets.token_hex(8)}", kind=kind, title=title, queue=queue,
                   stages=[dict(s) if isinstance(s, Mapping) else s for s in stages or ()] or None,
                   total=total, meta=dict(meta) if meta else None,
                   heartbeat_timeout_s=heartbeat_timeout_s)


def _control_params(wait: float, cancel_requested: bool, pause_requested: bool
                    ) -> dict[str, str]:
    return {"wait": f"{wait:g}", "cancel_requested": str(cancel_requested).lower(),
            "pause_requested": str(pause_requested).lower()}


class _Pacer:
    """At most `rate` posts per second: each post comes 1/rate after the previous one."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self._last = -math.inf

    def delay(self) -> float:
        return max(0.0, self._last + self.interval - time.monotonic())

    def note(self) -> None:
        self._last = time.monotonic()


OUTAGE_RETRY_CAP_S = 2.0  # the longest wait between tries while the service is unreachable


@dataclass
class _Post:
    """One worker post waiting in the outbox, in the order of the calls."""

    what: str
    body: dict[str, Any]
    merge: bool = False  # plain progress: a newer value replaces it until it is first sent
    seq: int | None = None  # given at the first attempt and kept, so a re-send is stored once


@dataclass(frozen=True)
class _ExitPlan:
    status: str | None  # None: do not finish (already finished, or fenced off)
    error: str | None = None
    traceback: str | None = None
    suppress: bool = False


# ---------------------------------------------------------------- the job handle's state


class _JobCore:
    """State shared by the sync and async handles; no I/O here."""

    def __init__(self, opts: _Options, *, job_id: str | None, token: str | None,
                 attempt: int | None, spec: dict[str, Any] | None) -> None:
        self.id: str | None = job_id
        self.token = token
        self.attempt = attempt
        self.state: dict[str, Any] = {}
        self.control = Control()
        self.result: Any = None  # sent with `succeeded` when the block ends normally
        self._opts = opts
        self._spec = spec
        self._seq = 0
        self._outbox: deque[_Post] = deque()  # posts not yet recorded, in call order
        self._logs = 0  # log lines in the outbox (the drop marker not counted)
        self._marker: _Post | None = None  # the unsent "N log lines dropped" line
        self._marker_count = 0
        self.dropped_logs = 0  # log lines dropped because the outbox was full
        self._outage = False  # unreachable, or still flushing what waited meanwhile
        self._failures = 0
        self._retry_at = 0.0  # while unreachable: when to try again
        self._stage: str | None = None
        self._pacer = _Pacer(opts.max_rate)
        self._done = False  # finished, or fenced off by a newer attempt
        self._posted = False
        self._last_post = time.monotonic()
        self._control_at = time.monotonic()
        self._bg_error: BaseException | None = None

    @property
    def status(self) -> str | None:
        status = self.state.get("status")
        return None if status is None else str(status)

    @property
    def cancel_requested(self) -> bool:
        return self.control.cancel_requested

    @property
    def pause_requested(self) -> bool:
        return self.control.pause_requested

    @property
    def seq(self) -> int:
        """The last `seq` used."""
        return self._seq

    @property
    def pending(self) -> int:
        """Posts not yet recorded by the service (throttled, or waiting out an outage)."""
        return len(self._outbox)

    @property
    def unreachable(self) -> bool:
        """True from a failed post until the outbox is flushed after the service is back."""
        return self._outage

    def _adopt(self, job: dict[str, Any], control: Mapping[str, Any] | None,
               created: bool) -> None:
        """Take the job as the service returned it on create or attach."""
        self.id = str(job["id"])
        if self.attempt is None:
            self.attempt = int(job.get("attempt") or 1)
        elif self.attempt < int(job.get("attempt") or 1):
            raise StaleAttemptError(409, "stale_attempt", f"attempt {self.attempt} was "
                                    f"superseded by attempt {job['attempt']}", "attempt")
        self._seq = 0 if created else clock_seq()
        self.state = job
        self._stage = job.get("stage")
        self._set_control(Control.from_dict(control or job))
        if job.get("status") in ("succeeded", "failed"):
            raise JobFinishedError(409, "job_finished", f"job {self.id} is {job['status']}")
        if job.get("status") == "cancelled":
            self._done = True
            self._set_control(Control(cancel_requested=True, reason=job.get("control_reason"),
                                      status="cancelled", attempt=self.attempt))

    def _set_control(self, control: Control) -> None:
        self.control = control
        self._control_at = time.monotonic()

    def _absorb(self, answer: Mapping[str, Any]) -> None:
        """Keep the job and its control state current from a worker post's answer."""
        if "job" in answer:
            self.state = answer["job"]
            self._stage = self.state.get("stage")
        if "control" in answer:
            self._set_control(Control.from_dict(answer["control"]))
        self._last_post = time.monotonic()
        self._posted = True

    def _stamp(self, post: _Post) -> dict[str, Any]:
        """The body to send: the post's seq is fixed at its first attempt."""
        if post.seq is None:
            self._seq += 1
            post.seq = self._seq
        return {**post.body, "seq": post.seq, "attempt": self.attempt}

    def _check(self) -> None:
        """Raise what the background learned, and refuse posts once the job is over."""
        if self._bg_error is not None:
            err, self._bg_error = self._bg_error, None
            raise err
        if self._done and self.control.status == "cancelled":
            raise Cancelled(self.id, self.control.reason)
        if self._done:
            raise ProgressClientError(f"job {self.id} is over; it takes no more posts")

    def _verdict(self) -> None:
        """Raise when the control state says to stop: cancel requested, or superseded."""
        c = self.control
        if c.attempt is not None and self.attempt is not None and c.attempt > self.attempt:
            self._done = True
            raise StaleAttemptError(409, "stale_attempt", f"attempt {self.attempt} was "
                                    f"superseded by attempt {c.attempt}", "attempt")
        if c.status in ("succeeded", "failed", "cancelled"):
            self._done = True
        if c.cancel_requested or c.status == "cancelled":
            raise Cancelled(self.id, c.reason)

    def _queue(self, what: str, body: dict[str, Any], *, merge: bool = False) -> None:
        """Add a post to the outbox; plain progress merges into an unsent progress tail."""
        tail = self._outbox[-1] if self._outbox else None
        if merge and tail is not None and tail.merge and tail.seq is None:
            tail.body = _merge(tail.body, body)
            return
        self._outbox.append(_Post(what, dict(body), merge))
        if what == "log":
            self._logs += 1
            if self._logs > self._opts.max_buffered_logs:
                self._drop_oldest_log()

    def _drop_oldest_log(self) -> None:
        """Keep the outbox bounded: the oldest unsent log line gives way, and is counted."""
        i = next((n for n, post in enumerate(self._outbox) if post.what == "log"
                  and post.seq is None and post is not self._marker), None)
        if i is None:
            return
        self._logs -= 1
        self.dropped_logs += 1
        if self._marker is not None and self._marker.seq is None:
            self._marker_count += 1
            del self._outbox[i]
            if 0 < i < len(self._outbox):
                a, b = self._outbox[i - 1], self._outbox[i]
                if a.merge and b.merge and a.seq is None and b.seq is None:
                    a.body = _merge(a.body, b.body)
                    del self._outbox[i]
        else:
            self._marker, self._marker_count = _Post("log", {"level": "warning"}), 1
            self._outbox[i] = self._marker
        self._marker.body["message"] = (
            f"{_count(self._marker_count, 'log line')} dropped while the service was "
            "unreachable (the worker's buffer was full)")

    def _sent(self, post: _Post) -> None:
        """Take a post out of the outbox: recorded, or refused for good."""
        if self._outbox and self._outbox[0] is post:
            self._outbox.popleft()
        if post.what == "log" and post is not self._marker:
            self._logs -= 1
        if post is self._marker:
            self._marker = None

    def _failed(self, exc: BaseException) -> None:
        """The service is unreachable: keep posting into the outbox, and try again later."""
        if not self._outage:
            log.warning("job %s: the service is unreachable (%s); the worker goes on and its "
                        "posts wait until it is back", self.id, exc)
        self._outage = True
        self._failures += 1
        step = min(OUTAGE_RETRY_CAP_S, self._opts.backoff * 2 ** min(self._failures - 1, 10))
        self._retry_at = time.monotonic() + step * random.uniform(0.5, 1.0)

    def _reached(self) -> None:
        """A post got through; the outage is over once the outbox is flushed."""
        self._failures = 0
        self._retry_at = 0.0
        if self._outage and not self._outbox:
            self._outage = False
            log.warning("job %s: the service is back; every waiting post is recorded", self.id)

    def _waiting_out(self) -> bool:
        """Unreachable, and too soon to try again."""
        return self._outage and time.monotonic() < self._retry_at

    def _unrecorded(self, waited: float) -> NotRecorded:
        finish = next((p for p in self._outbox if p.what == "finish"), None)
        return NotRecorded(
            self.id, status=None if finish is None else str(finish.body.get("status")),
            progress_posts=sum(p.what == "progress" for p in self._outbox),
            log_lines=sum(p.what == "log" and p is not self._marker for p in self._outbox),
            dropped_logs=self.dropped_logs, waited=waited)

    def _heartbeat_interval(self) -> float:
        if self._opts.heartbeat_interval:
            return self._opts.heartbeat_interval
        timeout = float(self.state.get("heartbeat_timeout_s") or 60.0)
        return min(30.0, max(0.2, timeout / 3.0))

    def _seconds_to_duty(self) -> float:
        """Until the next heartbeat, until waiting posts may go out, or the next retry."""
        if self._outage:
            return max(0.0, self._retry_at - time.monotonic())
        interval = self._heartbeat_interval()
        if not self._posted:
            interval = min(interval, 1.0)  # mark the job running soon, with an event
        due = self._last_post + interval - time.monotonic()
        if self._outbox:
            due = min(due, self._pacer.delay())
        return max(0.0, due)

    def _heartbeat_due(self) -> bool:
        return time.monotonic() - self._last_post >= self._heartbeat_interval() or (
            not self._posted and time.monotonic() - self._last_post >= 1.0)

    def _exit_plan(self, exc: BaseException | None) -> _ExitPlan:
        ours = isinstance(exc, Cancelled) and exc.job_id in (None, self.id)
        if self._done:
            return _ExitPlan(None, suppress=ours)
        if exc is None:
            return _ExitPlan("succeeded")
        if ours:
            return _ExitPlan("cancelled", suppress=True)
        if isinstance(exc, StaleAttemptError):
            return _ExitPlan(None)
        if isinstance(exc, Exception):
            message = str(exc) or type(exc).__name__
            tb = "".join(traceback.format_exception(exc))
            return _ExitPlan("failed", _clean(message), _clean(tb))
        return _ExitPlan("cancelled", f"worker interrupted ({type(exc).__name__})")


def _finish_body(status: str, result: Any, error: str | None) -> dict[str, Any]:
    return _fields(status=status, result=result, error=None if error is None else _clean(error))


# ---------------------------------------------------------------- reading events


@dataclass(frozen=True)
class Event:
    """One event of a stream, as `events()` yields it: never a keep-alive or an empty frame.

    `data` is the parsed JSON the stream's `data:` line carried (the same object the JSON
    history answers); `raw` is that line as received.
    """

    id: int
    type: str  # snapshot, created, progress, log, status, finished
    data: dict[str, Any]
    raw: str = field(default="", repr=False, compare=False)

    @property
    def job_id(self) -> str | None:
        value = self.data.get("job_id")
        return None if value is None else str(value)

    @property
    def job(self) -> dict[str, Any] | None:
        """The job's state after this event (None for a snapshot: see `jobs`)."""
        job = self.data.get("job")
        return job if isinstance(job, dict) else None

    @property
    def jobs(self) -> list[dict[str, Any]]:
        """A snapshot's jobs (empty for other events)."""
        jobs = self.data.get("jobs")
        return jobs if isinstance(jobs, list) else []

    @property
    def reset(self) -> bool:
        """A snapshot sent because the resume point was older than the service keeps:
        events in between are lost, and this snapshot replaces what the reader knew."""
        return bool(self.data.get("reset"))


class _Reading:
    """One `events()` call's cursor and reconnect policy, shared by the sync and async
    readers; no I/O here. The wire is parsed by httpx-sse (lines split on CR, LF and
    CRLF only, as the spec says); this only turns its events into ours."""

    def __init__(self, job: str | None, jobs: Sequence[str], kinds: Sequence[str],
                 last_event_id: int | None, reconnect: bool, give_up_after: float | None,
                 read_timeout: float, timeout: float) -> None:
        if job is not None and jobs:
            raise ValueError("give `job` (one job's stream) or `jobs` (a filter), not both")
        self.job = job
        self.path = f"/api/jobs/{job}/events" if job is not None else "/api/events"
        pairs: list[tuple[str, str | int | float | bool | None]] = [("job", j) for j in jobs]
        self.params = httpx.QueryParams(pairs + [("kind", k) for k in kinds])
        self.last_id = last_event_id
        self.reconnect = reconnect
        self.give_up_after = give_up_after
        self.timeout = httpx.Timeout(timeout, read=read_timeout)
        self.retry_s = DEFAULT_RETRY_S  # until the service says otherwise
        self.done = False
        self._failing_since: float | None = None
        self._failures = 0

    def headers(self, token: str | None) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store", **_auth(token)}
        if self.last_id is not None:
            headers["Last-Event-ID"] = str(self.last_id)
        return headers

    def opened(self, response: httpx.Response) -> bool:
        """Whether to read this answer as a stream; False: the stream is over (204)."""
        if response.status_code == 204:  # the job finished and the caller saw its end
            self.done = True
            return False
        content_type = response.headers.get("content-type", "").partition(";")[0].strip()
        if response.status_code != 200 or content_type != "text/event-stream":
            raise ProgressClientError(f"GET {self.path}: expected an event stream, got "
                                      f"{response.status_code} {content_type or 'no type'}")
        self._failing_since, self._failures = None, 0
        return True

    def take(self, sse: ServerSentEvent) -> Event | None:
        """Our event for one of httpx-sse's, or None when it has no data.

        httpx-sse dispatches an event at every blank line once any id was seen (the id
        persists), so a blank line with nothing before it comes out as an event without
        data: never one for the caller. Its `retry` is the service's reconnect delay.
        """
        if sse.retry is not None and sse.retry >= 0:
            self.retry_s = sse.retry / 1000.0
        if not sse.data:
            return None
        try:
            data = json.loads(sse.data)
        except ValueError as exc:
            raise ProgressClientError(f"GET {self.path}: an event that is not JSON: "
                                      f"{sse.data[:200]!r}") from exc
        if not isinstance(data, dict):
            raise ProgressClientError(f"GET {self.path}: an event that is not an object")
        raw_id = sse.id if sse.id.isdigit() else data.get("id")
        if raw_id is None:
            raise ProgressClientError(f"GET {self.path}: an event without an id")
        event = Event(int(raw_id), sse.event, data, sse.data)
        self.last_id = event.id
        if self.job is not None:
            self.done = _job_ended(event, self.job)
        return event

    def ended(self) -> float | None:
        """The stream ended without an error (a restart or shutdown): the wait before
        reconnecting, or None to stop."""
        return self.retry_s if self.reconnect else None

    def refused(self, response: httpx.Response) -> float:
        """An answer other than a stream (its body read): the wait before trying again;
        raises what the caller must see."""
        status = response.status_code
        if not _retryable(status):
            raise _api_error(response)
        if status >= 500:
            return self.failed(ServiceUnavailable(f"GET {self.path}: {status}"))
        return self.failed(_api_error(response), at_least=_retry_after(response))

    def failed(self, exc: Exception, at_least: float = 0.0) -> float:
        """The wait before reconnecting after a failure; raises once it has gone on for
        `give_up_after` seconds (at once without `reconnect`)."""
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if not self.reconnect or (self.give_up_after is not None
                                  and now - self._failing_since >= self.give_up_after):
            if isinstance(exc, ProgressClientError):
                raise exc
            raise ServiceUnavailable(f"GET {self.path}: {exc!r}") from exc
        self._failures += 1
        backoff: float = self.retry_s * 2 ** min(self._failures - 1, 5)
        delay = max(self.retry_s, min(backoff, MAX_RECONNECT_S)) * random.uniform(1.0, 1.25)
        log.info("reconnecting to %s in %.2fs: %r", self.path, delay, exc)
        return max(delay, at_least)


def _job_ended(event: Event, job_id: str) -> bool:
    """The end of one job's stream: its `finished` event, or a snapshot showing it over."""
    if event.type == "finished":
        return event.job_id == job_id
    if event.type == "snapshot":
        return any(j.get("id") == job_id and j.get("status") in TERMINAL for j in event.jobs)
    return False


# ---------------------------------------------------------------- sync


class ProgressClient:
    """A connection to the service, for workers (`job`, `attach`) and producers (`create`).

    `url` and `token` default to $PROGRESS_SSE_URL and $PROGRESS_SSE_TOKEN. `max_rate` is
    the most posts per second per job (None: no limit); failed requests are retried
    `retries` times with exponential backoff from `backoff` seconds.
    """

    def __init__(self, url: str | None = None, *, token: str | None = None,
                 max_rate: float | None = 10.0, retries: int = 5, backoff: float = 0.25,
                 timeout: float = 10.0, heartbeat_interval: float | None = None,
                 control_max_age: float = 1.0, finish_timeout: float = 120.0,
                 max_buffered_logs: int = 1000,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = resolve_url(url)
        self.token = resolve_token(token)
        self.options = _Options(max_rate, retries, backoff, timeout, heartbeat_interval,
                                control_max_age, finish_timeout, max_buffered_logs)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers={"User-Agent": "progress-sse-client"})

    def __enter__(self) -> ProgressClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, json: Any = None,
                params: Mapping[str, str] | None = None, token: str | None = None,
                request_timeout: float | None = None, retries: int | None = None
                ) -> dict[str, Any]:
        """Send one request, retrying connection errors, 5xx and 429; the decoded answer.

        `retries` overrides the client's count (0: one attempt).
        """
        delays = _retry_delays(self.options.retries if retries is None else retries,
                               self.options.backoff)
        headers = _auth(token or self.token)
        limit = (httpx.Timeout(request_timeout) if request_timeout is not None
                 else httpx.USE_CLIENT_DEFAULT)
        while True:
            try:
                response = self._http.request(method, path, json=json, params=params,
                                              headers=headers, timeout=limit)
            except httpx.TransportError as exc:
                delay = next(delays, None)
                if delay is None:
                    raise ServiceUnavailable(f"{method} {path}: {exc!r}") from exc
                log.info("retrying %s %s in %.2fs: %r", method, path, delay, exc)
                time.sleep(delay)
                continue
            if _retryable(response.status_code):
                delay = next(delays, None)
                if delay is not None:
                    time.sleep(max(delay, _retry_after(response)))
                    continue
                if response.status_code >= 500:
                    raise ServiceUnavailable(f"{method} {path}: {response.status_code}")
            return _decode(response)

    # producers and viewers

    def create(self, *, kind: str = "job", title: str = "", queue: str | None = None,
               stages: Sequence[StageSpec] | None = None, total: float | None = None,
               meta: Mapping[str, Any] | None = None, id: str | None = None,
               heartbeat_timeout_s: float | None = None) -> CreatedJob:
        """Create a queued job for some worker to attach to."""
        spec = _job_spec(kind=kind, title=title, queue=queue, stages=stages, total=total,
                         meta=meta, id=id, heartbeat_timeout_s=heartbeat_timeout_s)
        answer = self.request("POST", "/api/jobs", json=spec)
        return CreatedJob(answer["job"], answer.get("worker_token"), bool(answer["created"]))

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's current state."""
        job: dict[str, Any] = self.request("GET", f"/api/jobs/{job_id}")["job"]
        return job

    def control(self, job_id: str, *, wait: float = 0.0, cancel_requested: bool = False,
                pause_requested: bool = False, token: str | None = None,
                retries: int | None = None) -> Control:
        """The control state; with `wait`, long-poll until it differs from what you know."""
        answer = self.request("GET", f"/api/jobs/{job_id}/control",
                              params=_control_params(wait, cancel_requested, pause_requested),
                              token=token, request_timeout=wait + self.options.timeout,
                              retries=retries)
        return Control.from_dict(answer["control"])

    def cancel(self, job_id: str, reason: str | None = None) -> Control:
        return self._viewer_request(job_id, "cancel", reason)

    def pause(self, job_id: str, reason: str | None = None) -> Control:
        return self._viewer_request(job_id, "pause", reason)

    def resume(self, job_id: str, reason: str | None = None) -> Control:
        return self._viewer_request(job_id, "resume", reason)

    def _viewer_request(self, job_id: str, action: str, reason: str | None) -> Control:
        answer = self.request("POST", f"/api/jobs/{job_id}/{action}", json=_fields(reason=reason))
        return Control.from_dict(answer["control"])

    # readers

    def events(self, job: str | None = None, *, jobs: Sequence[str] = (),
               kinds: Sequence[str] = (), last_event_id: int | None = None,
               reconnect: bool = True, give_up_after: float | None = 60.0,
               read_timeout: float = STREAM_READ_TIMEOUT_S) -> Generator[Event, None, None]:
        """Events as they happen, resuming by itself, so a backend needs no reconnect loop.

        With `job`, that job's stream: it ends after the job's `finished` event (or at
        once, after the snapshot, if the job is already over). Without it, every job the
        token may see (`jobs`, `kinds` filter them), until you stop iterating. A fresh
        read (no `last_event_id`) starts with a `snapshot` event whose `jobs` are the
        current states; a resume yields each event after `last_event_id`, once, in order
        (a snapshot with `reset` true if the service no longer keeps them all).

        A dropped connection, 5xx or 429 is retried after the service's `retry:` delay
        (backing off while it fails), resuming with `Last-Event-ID`; after
        `give_up_after` seconds of failing (None: never) it raises ServiceUnavailable.
        Other refusals raise APIError. Keep-alives and empty frames are never yielded.
        """
        reading = _Reading(job, jobs, kinds, last_event_id, reconnect, give_up_after,
                           read_timeout, self.options.timeout)
        while True:
            delay: float | None
            try:
                with self._http.stream("GET", reading.path, params=reading.params,
                                       headers=reading.headers(self.token),
                                       timeout=reading.timeout) as response:
                    if response.status_code >= 300:
                        response.read()
                        delay = reading.refused(response)
                    elif not reading.opened(response):
                        return
                    else:
                        for sse in EventSource(response).iter_sse():
                            event = reading.take(sse)
                            if event is not None:
                                yield event
                                if reading.done:
                                    return
                        delay = reading.ended()
            except httpx.TransportError as exc:
                delay = reading.failed(exc)
            if delay is None:
                return
            time.sleep(delay)

    # workers

    def job(self, *, kind: str = "job", title: str = "", queue: str | None = None,
            stages: Sequence[StageSpec] | None = None, total: float | None = None,
            meta: Mapping[str, Any] | None = None, id: str | None = None,
            heartbeat_timeout_s: float | None = None) -> Job:
        """A job created when its block is entered, and finished when the block is left."""
        spec = _job_spec(kind=kind, title=title, queue=queue, stages=stages, total=total,
                         meta=meta, id=id, heartbeat_timeout_s=heartbeat_timeout_s)
        return Job(self, job_id=None, token=None, attempt=None, spec=spec)

    def attach(self, job_id: str, *, token: str | None = None, attempt: int | None = None) -> Job:
        """Work on a job a producer created, with the worker token it was given."""
        return Job(self, job_id=job_id, token=token, attempt=attempt, spec=None)

    def post_worker(self, job_id: str, what: str, body: Mapping[str, Any], *,
                    token: str | None = None) -> dict[str, Any]:
        """One worker post (progress, log, finish, heartbeat) as is; the service's answer."""
        if what not in WORKER_POSTS:
            raise ValueError(f"what must be one of {sorted(WORKER_POSTS)}")
        return self.request("POST", f"/api/jobs/{job_id}/{what}", json=dict(body), token=token)


class Job(_JobCore):
    """One job as its worker sees it. Use it as a context manager (see the module doc)."""

    def __init__(self, client: ProgressClient, *, job_id: str | None, token: str | None,
                 attempt: int | None, spec: dict[str, Any] | None) -> None:
        super().__init__(client.options, job_id=job_id, token=token, attempt=attempt, spec=spec)
        self._client = client
        self._send_lock = threading.Lock()  # held from taking a seq until its answer
        self._state_lock = threading.Lock()  # guards the pending progress
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Job:
        if self._spec is not None:
            try:
                answer = self._client.request("POST", "/api/jobs", json=self._spec)
            except Exception:
                raise
            except BaseException:  # interrupted: the job may exist; do not leave it queued
                with contextlib.suppress(Exception):
                    self._client.request("POST", f"/api/jobs/{self._spec['id']}/cancel",
                                         json={"reason": ABANDONED})
                raise
            self.token = self.token or answer.get("worker_token")
            self._adopt(answer["job"], None, created=bool(answer.get("created")))
        else:
            assert self.id is not None
            answer = self._client.request("GET", f"/api/jobs/{self.id}")
            self._adopt(answer["job"], answer.get("control"), created=False)
        self._thread = threading.Thread(target=self._background, daemon=True,
                                        name=f"progress-sse-{self.id}")
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        self._stop_background()
        plan = self._exit_plan(exc)
        try:
            self._conclude(plan)
        except Cancelled:
            pass  # cancelled meanwhile: the job already ended as cancelled
        except Exception:
            if exc is None:
                raise
            log.warning("could not finish job %s", self.id, exc_info=True)
        return plan.suppress

    # the worker's calls

    def progress(self, progress: float | None = None, *, current: float | None = None,
                 total: float | None = None, message: str | None = None, data: Any = None,
                 stage: str | None = None) -> Control:
        """Report progress (0-100, of the current stage for a staged job), throttled.

        Never raises because the service is unreachable: the value waits in the outbox.
        """
        self._check()
        update = _fields(progress=progress, current=current, total=total, message=message,
                         data=data)
        if stage is not None and stage != self._stage:
            self._send("progress", {**update, "stage": stage})
            return self.control
        with self._state_lock:
            self._queue("progress", update, merge=True)
        if not self._outage and self._pacer.delay() <= 0 \
                and self._send_lock.acquire(blocking=False):
            try:
                self._drain(wait=False)
            finally:
                self._send_lock.release()
        else:
            self._wake.set()
        return self.control

    def stage(self, key: str, *, message: str | None = None, progress: float | None = None,
              current: float | None = None, total: float | None = None) -> Control:
        """Enter a stage; never merged away, sent after any pending progress."""
        self._check()
        self._send("progress", _fields(stage=key, message=message, progress=progress,
                                       current=current, total=total))
        return self.control

    def log(self, message: str, level: str = "info") -> Control:
        """Add a log line to the job; never merged away, sent after any pending progress."""
        self._check()
        self._send("log", {"level": level, "message": message})
        return self.control

    def checkpoint(self) -> None:
        """Raise Cancelled when a cancel was requested; block while a pause is requested.

        While the service is unreachable it goes by the last control state it knew.
        """
        self._check()
        if not self._outage and time.monotonic() - self._control_at > self._opts.control_max_age:
            try:
                self._set_control(self._client.control(self._id(), token=self.token,
                                                       retries=0))
            except ProgressClientError as exc:
                if not _unreachable(exc):
                    raise
                with self._state_lock:
                    self._failed(exc)
                self._wake.set()
        self._verdict()
        if self.control.pause_requested:
            self._pause()

    def finish(self, status: str = "succeeded", *, result: Any = None,
               error: str | None = None) -> None:
        """Finish now (leaving the block does it otherwise); retried up to `finish_timeout`."""
        self._check()
        self._finish(_finish_body(status, result, error))

    def refresh(self) -> dict[str, Any]:
        """Read the job and its control state from the service."""
        answer = self._client.request("GET", f"/api/jobs/{self._id()}")
        self.state = answer["job"]
        self._set_control(Control.from_dict(answer["control"]))
        return self.state

    # internals

    def _id(self) -> str:
        if self.id is None:
            raise ProgressClientError("the job is not started: use it in a `with` block")
        return self.id

    def _pause(self) -> None:
        """Acknowledge the pause, wait until it is lifted, then say so."""
        self._send("progress", {"paused": True})
        while self.control.pause_requested and not self.control.cancel_requested \
                and self.control.status not in ("cancelled", "failed", "succeeded"):
            try:
                self._set_control(self._client.control(
                    self._id(), wait=LONG_POLL_S, pause_requested=True, token=self.token,
                    retries=0))
            except ProgressClientError as exc:
                if not _unreachable(exc):
                    raise
                with self._state_lock:
                    self._failed(exc)
                time.sleep(max(0.0, self._retry_at - time.monotonic()))
        self._verdict()
        self._send("progress", {"paused": False})

    def _send(self, what: str, body: dict[str, Any]) -> None:
        """Queue a post that is never merged, and send the outbox in order unless the
        service is unreachable (then the post waits, and the caller goes on)."""
        with self._state_lock:
            self._queue(what, body)
        if self._outage:
            self._wake.set()
            return
        with self._send_lock:
            self._drain(wait=True)

    def _finish(self, body: dict[str, Any]) -> None:
        """Queue the finish and send the outbox, retrying up to `finish_timeout`."""
        with self._state_lock:
            self._queue("finish", body)
        started = time.monotonic()
        while True:
            with self._send_lock:
                if self._drain(wait=True):
                    self._done = True
                    return
            waited = time.monotonic() - started
            if waited >= self._opts.finish_timeout:
                self._done = True
                with self._state_lock:
                    raise self._unrecorded(waited)
            time.sleep(max(0.01, min(self._opts.finish_timeout - waited,
                                     self._retry_at - time.monotonic())))

    def _drain(self, *, wait: bool) -> bool:
        """Send the outbox in order (the send lock is held). False: the service is
        unreachable, and what is left waits. Without `wait`, stop at the throttle."""
        while True:
            with self._state_lock:
                if not self._outbox:
                    self._reached()
                    return True
                if self._waiting_out():
                    return False
                head = self._outbox[0]
            if not wait and self._pacer.delay() > 0:
                return True
            time.sleep(self._pacer.delay())
            with self._state_lock:
                body = self._stamp(head)
            try:
                self._post(head.what, body)
            except Exception as exc:
                with self._state_lock:
                    if _unreachable(exc):
                        self._failed(exc)
                        return False
                    self._sent(head)
                raise
            with self._state_lock:
                self._sent(head)
                self._reached()

    def _post(self, what: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send one numbered post, once, and learn from the answer."""
        job_id = self._id()
        self._pacer.note()
        try:
            answer = self._client.request("POST", f"/api/jobs/{job_id}/{what}", json=body,
                                          token=self.token, retries=0)
        except JobFinishedError as exc:
            self._done = True
            self.refresh()
            if self.status == "cancelled":
                self.control = Control(True, False, self.control.reason, "cancelled",
                                       self.attempt)
                raise Cancelled(job_id, self.control.reason) from exc
            raise
        except StaleAttemptError:
            self._done = True
            raise
        self._absorb(answer)
        return answer

    def _conclude(self, plan: _ExitPlan) -> None:
        if plan.status is None:
            return
        if plan.traceback:
            with self._state_lock:
                self._queue("log", {"level": "error", "message": plan.traceback})
        result = self.result if plan.status == "succeeded" else None
        self._finish(_finish_body(plan.status, result, plan.error))

    def _background(self) -> None:
        """Heartbeat while the worker is busy, send waiting posts when they may go, and
        retry them while the service is unreachable."""
        while True:
            self._wake.wait(self._seconds_to_duty())
            self._wake.clear()
            if self._stop.is_set() or self._done:
                return
            try:
                self._duties()
            except Exception as exc:  # the worker's next call raises it; keep beating
                self._bg_error = exc

    def _duties(self) -> None:
        if self._waiting_out():
            return
        if self._outbox:
            with self._send_lock:
                self._drain(wait=True)
            return
        if not (self._outage or self._heartbeat_due()):
            return
        self._last_post = time.monotonic()  # a failed beat is tried again an interval on
        if not self._posted:
            with self._state_lock:
                self._queue("progress", {}, merge=True)  # an event: viewers see the start
            with self._send_lock:
                self._drain(wait=True)
            return
        try:
            answer = self._client.request("POST", f"/api/jobs/{self._id()}/heartbeat",
                                          json={"attempt": self.attempt}, token=self.token,
                                          retries=0)
        except ProgressClientError as exc:
            if not _unreachable(exc):
                raise
            with self._state_lock:
                self._failed(exc)
            return
        with self._state_lock:
            self._reached()
        self._absorb(answer)

    def _stop_background(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self._opts.timeout)
        if isinstance(self._bg_error, (ServiceUnavailable, APIError)):
            log.warning("job %s: background post failed: %s", self.id, self._bg_error)
            self._bg_error = None


# ---------------------------------------------------------------- async


class AsyncProgressClient:
    """The async twin of ProgressClient: the same methods, awaited."""

    def __init__(self, url: str | None = None, *, token: str | None = None,
                 max_rate: float | None = 10.0, retries: int = 5, backoff: float = 0.25,
                 timeout: float = 10.0, heartbeat_interval: float | None = None,
                 control_max_age: float = 1.0, finish_timeout: float = 120.0,
                 max_buffered_logs: int = 1000,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = resolve_url(url)
        self.token = resolve_token(token)
        self.options = _Options(max_rate, retries, backoff, timeout, heartbeat_interval,
                                control_max_age, finish_timeout, max_buffered_logs)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport,
                                       headers={"User-Agent": "progress-sse-client"})

    async def __aenter__(self) -> AsyncProgressClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: Mapping[str, str] | None = None, token: str | None = None,
                      request_timeout: float | None = None, retries: int | None = None
                      ) -> dict[str, Any]:
        """Send one request, retrying connection errors, 5xx and 429; the decoded answer.

        `retries` overrides the client's count (0: one attempt).
        """
        delays = _retry_delays(self.options.retries if retries is None else retries,
                               self.options.backoff)
        headers = _auth(token or self.token)
        limit = (httpx.Timeout(request_timeout) if request_timeout is not None
                 else httpx.USE_CLIENT_DEFAULT)
        while True:
            try:
                response = await self._http.request(method, path, json=json, params=params,
                                                    headers=headers, timeout=limit)
            except httpx.TransportError as exc:
                delay = next(delays, None)
                if delay is None:
                    raise ServiceUnavailable(f"{method} {path}: {exc!r}") from exc
                log.info("retrying %s %s in %.2fs: %r", method, path, delay, exc)
                await asyncio.sleep(delay)
                continue
            if _retryable(response.status_code):
                delay = next(delays, None)
                if delay is not None:
                    await asyncio.sleep(max(delay, _retry_after(response)))
                    continue
                if response.status_code >= 500:
                    raise ServiceUnavailable(f"{method} {path}: {response.status_code}")
            return _decode(response)

    async def create(self, *, kind: str = "job", title: str = "", queue: str | None = None,
                     stages: Sequence[StageSpec] | None = None, total: float | None = None,
                     meta: Mapping[str, Any] | None = None, id: str | None = None,
                     heartbeat_timeout_s: float | None = None) -> CreatedJob:
        """Create a queued job for some worker to attach to."""
        spec = _job_spec(kind=kind, title=title, queue=queue, stages=stages, total=total,
                         meta=meta, id=id, heartbeat_timeout_s=heartbeat_timeout_s)
        answer = await self.request("POST", "/api/jobs", json=spec)
        return CreatedJob(answer["job"], answer.get("worker_token"), bool(answer["created"]))

    async def get(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = (await self.request("GET", f"/api/jobs/{job_id}"))["job"]
        return job

    async def control(self, job_id: str, *, wait: float = 0.0, cancel_requested: bool = False,
                      pause_requested: bool = False, token: str | None = None,
                      retries: int | None = None) -> Control:
        answer = await self.request(
            "GET", f"/api/jobs/{job_id}/control",
            params=_control_params(wait, cancel_requested, pause_requested), token=token,
            request_timeout=wait + self.options.timeout, retries=retries)
        return Control.from_dict(answer["control"])

    async def cancel(self, job_id: str, reason: str | None = None) -> Control:
        return await self._viewer_request(job_id, "cancel", reason)

    async def pause(self, job_id: str, reason: str | None = None) -> Control:
        return await self._viewer_request(job_id, "pause", reason)

    async def resume(self, job_id: str, reason: str | None = None) -> Control:
        return await self._viewer_request(job_id, "resume", reason)

    async def _viewer_request(self, job_id: str, action: str, reason: str | None) -> Control:
        answer = await self.request("POST", f"/api/jobs/{job_id}/{action}",
                                    json=_fields(reason=reason))
        return Control.from_dict(answer["control"])

    async def events(self, job: str | None = None, *, jobs: Sequence[str] = (),
                     kinds: Sequence[str] = (), last_event_id: int | None = None,
                     reconnect: bool = True, give_up_after: float | None = 60.0,
                     read_timeout: float = STREAM_READ_TIMEOUT_S
                     ) -> AsyncGenerator[Event, None]:
        """Events as they happen, resuming by itself: see ProgressClient.events.

        To stop early, leave the loop inside `contextlib.aclosing(pc.events(...))`, so
        the connection closes then rather than when the generator is collected.
        """
        reading = _Reading(job, jobs, kinds, last_event_id, reconnect, give_up_after,
                           read_timeout, self.options.timeout)
        while True:
            delay: float | None
            try:
                async with self._http.stream("GET", reading.path, params=reading.params,
                                             headers=reading.headers(self.token),
                                             timeout=reading.timeout) as response:
                    if response.status_code >= 300:
                        await response.aread()
                        delay = reading.refused(response)
                    elif not reading.opened(response):
                        return
                    else:
                        async with contextlib.aclosing(
                                EventSource(response).aiter_sse()) as stream:
                            async for sse in stream:
                                event = reading.take(sse)
                                if event is not None:
                                    yield event
                                    if reading.done:
                                        return
                        delay = reading.ended()
            except httpx.TransportError as exc:
                delay = reading.failed(exc)
            if delay is None:
                return
            await asyncio.sleep(delay)

    def job(self, *, kind: str = "job", title: str = "", queue: str | None = None,
            stages: Sequence[StageSpec] | None = None, total: float | None = None,
            meta: Mapping[str, Any] | None = None, id: str | None = None,
            heartbeat_timeout_s: float | None = None) -> AsyncJob:
        """A job created when its block is entered, and finished when the block is left."""
        spec = _job_spec(kind=kind, title=title, queue=queue, stages=stages, total=total,
                         meta=meta, id=id, heartbeat_timeout_s=heartbeat_timeout_s)
        return AsyncJob(self, job_id=None, token=None, attempt=None, spec=spec)

    def attach(self, job_id: str, *, token: str | None = None,
               attempt: int | None = None) -> AsyncJob:
        """Work on a job a producer created, with the worker token it was given."""
        return AsyncJob(self, job_id=job_id, token=token, attempt=attempt, spec=None)

    async def post_worker(self, job_id: str, what: str, body: Mapping[str, Any], *,
                          token: str | None = None) -> dict[str, Any]:
        """One worker post (progress, log, finish, heartbeat) as is; the service's answer."""
        if what not in WORKER_POSTS:
            raise ValueError(f"what must be one of {sorted(WORKER_POSTS)}")
        return await self.request("POST", f"/api/jobs/{job_id}/{what}", json=dict(body),
                                  token=token)


class AsyncJob(_JobCore):
    """The async twin of Job: `async with`, and every call awaited."""

    def __init__(self, client: AsyncProgressClient, *, job_id: str | None, token: str | None,
                 attempt: int | None, spec: dict[str, Any] | None) -> None:
        super().__init__(client.options, job_id=job_id, token=token, attempt=attempt, spec=spec)
        self._client = client
        self._send_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncJob:
        if self._spec is not None:
            try:
                answer = await self._client.request("POST", "/api/jobs", json=self._spec)
            except Exception:
                raise
            except BaseException:  # interrupted: the job may exist; do not leave it queued
                with contextlib.suppress(Exception):
                    await self._client.request("POST", f"/api/jobs/{self._spec['id']}/cancel",
                                               json={"reason": ABANDONED})
                raise
            self.token = self.token or answer.get("worker_token")
            self._adopt(answer["job"], None, created=bool(answer.get("created")))
        else:
            assert self.id is not None
            answer = await self._client.request("GET", f"/api/jobs/{self.id}")
            self._adopt(answer["job"], answer.get("control"), created=False)
        self._task = asyncio.create_task(self._background(), name=f"progress-sse-{self.id}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        await self._stop_background()
        plan = self._exit_plan(exc)
        try:
            await self._conclude(plan)
        except Cancelled:
            pass  # cancelled meanwhile: the job already ended as cancelled
        except Exception:
            if exc is None:
                raise
            log.warning("could not finish job %s", self.id, exc_info=True)
        return plan.suppress

    async def progress(self, progress: float | None = None, *, current: float | None = None,
                       total: float | None = None, message: str | None = None,
                       data: Any = None, stage: str | None = None) -> Control:
        """Report progress (0-100, of the current stage for a staged job), throttled.

        Never raises because the service is unreachable: the value waits in the outbox.
        """
        self._check()
        update = _fields(progress=progress, current=current, total=total, message=message,
                         data=data)
        if stage is not None and stage != self._stage:
            await self._send("progress", {**update, "stage": stage})
            return self.control
        self._queue("progress", update, merge=True)
        if not self._outage and self._pacer.delay() <= 0 and not self._send_lock.locked():
            async with self._send_lock:
                await self._drain(wait=False)
        else:
            self._wake.set()
        return self.control

    async def stage(self, key: str, *, message: str | None = None,
                    progress: float | None = None, current: float | None = None,
                    total: float | None = None) -> Control:
        """Enter a stage; never merged away, sent after any pending progress."""
        self._check()
        await self._send("progress", _fields(stage=key, message=message, progress=progress,
                                             current=current, total=total))
        return self.control

    async def log(self, message: str, level: str = "info") -> Control:
        """Add a log line to the job; never merged away, sent after any pending progress."""
        self._check()
        await self._send("log", {"level": level, "message": message})
        return self.control

    async def checkpoint(self) -> None:
        """Raise Cancelled when a cancel was requested; wait while a pause is requested.

        While the service is unreachable it goes by the last control state it knew.
        """
        self._check()
        if not self._outage and time.monotonic() - self._control_at > self._opts.control_max_age:
            try:
                self._set_control(await self._client.control(self._id(), token=self.token,
                                                             retries=0))
            except ProgressClientError as exc:
                if not _unreachable(exc):
                    raise
                self._failed(exc)
                self._wake.set()
        self._verdict()
        if self.control.pause_requested:
            await self._pause()

    async def finish(self, status: str = "succeeded", *, result: Any = None,
                     error: str | None = None) -> None:
        """Finish now (leaving the block does it otherwise); retried up to `finish_timeout`."""
        self._check()
        await self._finish(_finish_body(status, result, error))

    async def refresh(self) -> dict[str, Any]:
        """Read the job and its control state from the service."""
        answer = await self._client.request("GET", f"/api/jobs/{self._id()}")
        self.state = answer["job"]
        self._set_control(Control.from_dict(answer["control"]))
        return self.state

    def _id(self) -> str:
        if self.id is None:
            raise ProgressClientError("the job is not started: use it in an `async with` block")
        return self.id

    async def _pause(self) -> None:
        """Acknowledge the pause, wait until it is lifted, then say so."""
        await self._send("progress", {"paused": True})
        while self.control.pause_requested and not self.control.cancel_requested \
                and self.control.status not in ("cancelled", "failed", "succeeded"):
            try:
                self._set_control(await self._client.control(
                    self._id(), wait=LONG_POLL_S, pause_requested=True, token=self.token,
                    retries=0))
            except ProgressClientError as exc:
                if not _unreachable(exc):
                    raise
                self._failed(exc)
                await asyncio.sleep(max(0.0, self._retry_at - time.monotonic()))
        self._verdict()
        await self._send("progress", {"paused": False})

    async def _send(self, what: str, body: dict[str, Any]) -> None:
        """Queue a post that is never merged, and send the outbox in order unless the
        service is unreachable (then the post waits, and the caller goes on)."""
        self._queue(what, body)
        if self._outage:
            self._wake.set()
            return
        async with self._send_lock:
            await self._drain(wait=True)

    async def _finish(self, body: dict[str, Any]) -> None:
        """Queue the finish and send the outbox, retrying up to `finish_timeout`."""
        self._queue("finish", body)
        started = time.monotonic()
        while True:
            async with self._send_lock:
                if await self._drain(wait=True):
                    self._done = True
                    return
            waited = time.monotonic() - started
            if waited >= self._opts.finish_timeout:
                self._done = True
                raise self._unrecorded(waited)
            await asyncio.sleep(max(0.01, min(self._opts.finish_timeout - waited,
                                              self._retry_at - time.monotonic())))

    async def _drain(self, *, wait: bool) -> bool:
        """Send the outbox in order (the send lock is held). False: the service is
        unreachable, and what is left waits. Without `wait`, stop at the throttle."""
        while True:
            if not self._outbox:
                self._reached()
                return True
            if self._waiting_out():
                return False
            head = self._outbox[0]
            if not wait and self._pacer.delay() > 0:
                return True
            await asyncio.sleep(self._pacer.delay())
            body = self._stamp(head)
            try:
                await self._post(head.what, body)
            except Exception as exc:
                if _unreachable(exc):
                    self._failed(exc)
                    return False
                self._sent(head)
                raise
            self._sent(head)
            self._reached()

    async def _post(self, what: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send one numbered post, once, and learn from the answer."""
        job_id = self._id()
        self._pacer.note()
        try:
            answer = await self._client.request("POST", f"/api/jobs/{job_id}/{what}",
                                                json=body, token=self.token, retries=0)
        except JobFinishedError as exc:
            self._done = True
            await self.refresh()
            if self.status == "cancelled":
                self.control = Control(True, False, self.control.reason, "cancelled",
                                       self.attempt)
                raise Cancelled(job_id, self.control.reason) from exc
            raise
        except StaleAttemptError:
            self._done = True
            raise
        self._absorb(answer)
        return answer

    async def _conclude(self, plan: _ExitPlan) -> None:
        if plan.status is None:
            return
        if plan.traceback:
            self._queue("log", {"level": "error", "message": plan.traceback})
        result = self.result if plan.status == "succeeded" else None
        await self._finish(_finish_body(plan.status, result, plan.error))

    async def _background(self) -> None:
        """Heartbeat while the worker is busy, send waiting posts when they may go, and
        retry them while the service is unreachable."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._seconds_to_duty())
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping or self._done:
                return
            try:
                await self._duties()
            except Exception as exc:  # the worker's next call raises it; keep beating
                self._bg_error = exc

    async def _duties(self) -> None:
        if self._waiting_out():
            return
        if self._outbox:
            async with self._send_lock:
                await self._drain(wait=True)
            return
        if not (self._outage or self._heartbeat_due()):
            return
        self._last_post = time.monotonic()  # a failed beat is tried again an interval on
        if not self._posted:
            self._queue("progress", {}, merge=True)  # an event, so viewers see the start
            async with self._send_lock:
                await self._drain(wait=True)
            return
        try:
            answer = await self._client.request("POST", f"/api/jobs/{self._id()}/heartbeat",
                                                json={"attempt": self.attempt},
                                                token=self.token, retries=0)
        except ProgressClientError as exc:
            if not _unreachable(exc):
                raise
            self._failed(exc)
            return
        self._reached()
        self._absorb(answer)

    async def _stop_background(self) -> None:
        """Stop the heartbeat task; a post it has in flight is let finish, not torn."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self._opts.timeout)
            except TimeoutError:
                task.cancel()
            except asyncio.CancelledError:
                task.cancel()
                raise
        if isinstance(self._bg_error, (ServiceUnavailable, APIError)):
            log.warning("job %s: background post failed: %s", self.id, self._bg_error)
            self._bg_error = None

"""What a job handle knows, and the rules that change it; no I/O here.

The job as the service last answered, its control state, seq, pacing and outage
backoff, and what each answer or control state means for the worker. The flows of the
handle's calls (`core`) read and change it; the drivers never do.
"""

from __future__ import annotations

import logging
import math
import random
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .calls import _ClientCore
from .errors import Cancelled, JobFinishedError, ProgressClientError, StaleAttemptError
from .outbox import _Outbox, _Post
from .protocol import TERMINAL, Control, _clean, clock_seq

log = logging.getLogger("progress_sse.client")  # one logger for the whole SDK

OUTAGE_RETRY_CAP_S = 2.0  # the longest wait between tries while the service is unreachable


class _Pacer:
    """At most `rate` posts per second: each post comes 1/rate after the previous one."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self._last = -math.inf

    def delay(self) -> float:
        return max(0.0, self._last + self.interval - time.monotonic())

    def note(self) -> None:
        self._last = time.monotonic()


@dataclass(frozen=True)
class _ExitPlan:
    status: str | None  # None: do not finish (already finished, or fenced off)
    error: str | None = None
    traceback: str | None = None
    suppress: bool = False


class _JobState:
    """The state shared by the sync and async handles."""

    _block = "`with`"  # how the handle is used, for the error of a handle not started

    def __init__(self, client: _ClientCore[Any], *, job_id: str | None, token: str | None,
                 attempt: int | None, spec: dict[str, Any] | None) -> None:
        self.id: str | None = job_id
        self.token = token
        self.attempt = attempt
        self.state: dict[str, Any] = {}
        self.control = Control()
        self.result: Any = None  # sent with `succeeded` when the block ends normally
        self._client = client
        self._opts = client.options
        self._spec = spec
        self._seq = 0
        self._outbox = _Outbox(self._opts.max_buffered_logs)
        self._outage = False  # unreachable, or still flushing what waited meanwhile
        self._failures = 0
        self._retry_at = 0.0  # while unreachable: when to try again
        self._current_stage: str | None = None
        self._pacer = _Pacer(self._opts.max_rate)
        self._done = False  # finished, or fenced off by a newer attempt
        self._stopping = False  # the block is left: the background ends
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
    def dropped_logs(self) -> int:
        """Log lines dropped because the outbox was full."""
        return self._outbox.dropped

    @property
    def unreachable(self) -> bool:
        """True from a failed post until the outbox is flushed after the service is back."""
        return self._outage


    def _id(self) -> str:
        if self.id is None:
            raise ProgressClientError(f"the job is not started: use it in a {self._block} block")
        return self.id

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
        self._current_stage = job.get("stage")
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
            self._current_stage = self.state.get("stage")
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
        if c.status in TERMINAL:
            self._done = True
        if c.cancel_requested or c.status == "cancelled":
            raise Cancelled(self.id, c.reason)

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
        if self._outage and not len(self._outbox):
            self._outage = False
            log.warning("job %s: the service is back; every waiting post is recorded", self.id)

    def _waiting_out(self) -> bool:
        """Unreachable, and too soon to try again."""
        return self._outage and time.monotonic() < self._retry_at

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
        if len(self._outbox):
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

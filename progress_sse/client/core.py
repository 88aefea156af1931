"""The job handle's calls as flows: every decision it makes; no I/O here.

Outbox, pacing, seq, outage backoff, heartbeats, pauses and what each answer means
are decided here once (on the state in `state`). Each call of the handle is a flow
(see `flow`): the sync and async handles (sync_job.Job, aio_job.AsyncJob) run it,
sending, sleeping and waiting for it, each in its own way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from .errors import (
    APIError,
    Cancelled,
    JobFinishedError,
    ProgressClientError,
    ServiceUnavailable,
    StaleAttemptError,
)
from .flow import WAKE, Exclusive, Flow, Idle, Sleep
from .protocol import (
    ABANDONED,
    LONG_POLL_S,
    TERMINAL,
    Control,
    _fields,
    _finish_body,
    unreachable,
)
from .state import OUTAGE_RETRY_CAP_S, _JobState

log = logging.getLogger("progress_sse.client")  # one logger for the whole SDK

__all__ = ["OUTAGE_RETRY_CAP_S", "_JobCore"]


class _JobCore(_JobState):
    """The flows of the handle's calls, for the sync and async drivers to run."""


    def _enter(self) -> Flow[None]:
        """Create the job (or read the one attached to) and take it as the service has it."""
        if self._spec is None:
            answer = yield from self._client._request("GET", f"/api/jobs/{self.id}")
            self._adopt(answer["job"], answer.get("control"), created=False)
            return
        try:
            answer = yield from self._client._request("POST", "/api/jobs", json=self._spec)
        except (Exception, GeneratorExit):
            raise
        except BaseException:  # interrupted: the job may exist; do not leave it queued
            with contextlib.suppress(Exception):
                yield from self._client._request("POST", f"/api/jobs/{self._spec['id']}/cancel",
                                                 json={"reason": ABANDONED})
            raise
        self.token = self.token or answer.get("worker_token")
        self._adopt(answer["job"], None, created=bool(answer.get("created")))

    def _exit(self, exc: BaseException | None) -> Flow[bool]:
        """Finish the job by how its block ended (the background has stopped); whether
        to swallow the block's exception."""
        if isinstance(self._bg_error, (ServiceUnavailable, APIError)):
            log.warning("job %s: background post failed: %s", self.id, self._bg_error)
            self._bg_error = None
        plan = self._exit_plan(exc)
        try:
            if plan.status is not None:
                if plan.traceback:
                    self._outbox.add("log", {"level": "error", "message": plan.traceback})
                result = self.result if plan.status == "succeeded" else None
                yield from self._record_finish(_finish_body(plan.status, result, plan.error))
        except Cancelled:
            pass  # cancelled meanwhile: the job already ended as cancelled
        except Exception:
            if exc is None:
                raise
            log.warning("could not finish job %s", self.id, exc_info=True)
        return plan.suppress

    def _progress(self, progress: float | None, current: float | None, total: float | None,
                  message: str | None, data: Any, stage: str | None) -> Flow[Control]:
        """Throttled progress: merged into the outbox, sent now if the pace allows and no
        other send is under way, else by the background when it may go."""
        self._check()
        update = _fields(progress=progress, current=current, total=total, message=message,
                         data=data)
        if stage is not None and stage != self._current_stage:
            yield from self._send("progress", {**update, "stage": stage})
            return self.control
        self._outbox.add("progress", update, merge=True)
        if self._outage or self._pacer.delay() > 0 or \
                (yield Exclusive(self._drain(wait=False), blocking=False)) is None:
            yield WAKE
        return self.control

    def _stage(self, key: str, message: str | None, progress: float | None,
                    current: float | None, total: float | None) -> Flow[Control]:
        self._check()
        yield from self._send("progress", _fields(stage=key, message=message, progress=progress,
                                                  current=current, total=total))
        return self.control

    def _log(self, message: str, level: str) -> Flow[Control]:
        self._check()
        yield from self._send("log", {"level": level, "message": message})
        return self.control

    def _checkpoint(self) -> Flow[None]:
        """Read the control state if it is old (unless unreachable), then obey it."""
        self._check()
        if not self._outage and time.monotonic() - self._control_at > self._opts.control_max_age:
            try:
                self._set_control((yield from self._client._control(
                    self._id(), token=self.token, retries=0)))
            except ProgressClientError as exc:
                if not unreachable(exc):
                    raise
                self._failed(exc)
                yield WAKE
        self._verdict()
        if self.control.pause_requested:
            yield from self._pause()

    def _finish(self, status: str, result: Any, error: str | None) -> Flow[None]:
        self._check()
        yield from self._record_finish(_finish_body(status, result, error))

    def _refresh(self) -> Flow[dict[str, Any]]:
        answer = yield from self._client._request("GET", f"/api/jobs/{self._id()}")
        self.state = answer["job"]
        self._set_control(Control.from_dict(answer["control"]))
        return self.state

    def _background(self) -> Flow[None]:
        """Heartbeat while the worker is busy, send waiting posts when they may go, and
        retry them while the service is unreachable."""
        while True:
            yield Idle(self._seconds_to_duty())
            if self._stopping or self._done:
                return
            try:
                yield from self._duties()
            except Exception as exc:  # the worker's next call raises it; keep beating
                self._bg_error = exc

    # ------------------------------------------------------------ the flows they share

    def _pause(self) -> Flow[None]:
        """Acknowledge the pause, wait until it is lifted, then say so."""
        yield from self._send("progress", {"paused": True})
        while self.control.pause_requested and not self.control.cancel_requested \
                and self.control.status not in TERMINAL:
            try:
                self._set_control((yield from self._client._control(
                    self._id(), wait=LONG_POLL_S, pause_requested=True, token=self.token,
                    retries=0)))
            except ProgressClientError as exc:
                if not unreachable(exc):
                    raise
                self._failed(exc)
                yield Sleep(max(0.0, self._retry_at - time.monotonic()))
        self._verdict()
        yield from self._send("progress", {"paused": False})

    def _send(self, what: str, body: dict[str, Any]) -> Flow[None]:
        """Queue a post that is never merged, and send the outbox in order unless the
        service is unreachable (then the post waits, and the caller goes on)."""
        self._outbox.add(what, body)
        if self._outage:
            yield WAKE
        else:
            yield Exclusive(self._drain(wait=True))

    def _record_finish(self, body: dict[str, Any]) -> Flow[None]:
        """Queue the finish and send the outbox, retrying up to `finish_timeout`."""
        self._outbox.add("finish", body)
        started = time.monotonic()
        while not (yield Exclusive(self._drain(wait=True))):
            waited = time.monotonic() - started
            if waited >= self._opts.finish_timeout:
                self._done = True
                raise self._outbox.unrecorded(self.id, waited)
            yield Sleep(max(0.01, min(self._opts.finish_timeout - waited,
                                      self._retry_at - time.monotonic())))
        self._done = True

    def _drain(self, *, wait: bool) -> Flow[bool]:
        """Send the outbox in order (under the send lock). False: the service is
        unreachable, and what is left waits. Without `wait`, stop at the throttle."""
        while len(self._outbox):
            if self._waiting_out():
                return False
            if (delay := self._pacer.delay()) > 0:
                if not wait:
                    return True
                yield Sleep(delay)
                continue  # the head may have changed meanwhile (merged, or dropped)
            head = self._outbox.head
            try:
                yield from self._post(head.what, self._stamp(head))
            except Exception as exc:
                if unreachable(exc):
                    self._failed(exc)
                    return False
                self._outbox.sent(head)
                raise
            self._outbox.sent(head)
            self._reached()
        self._reached()
        return True

    def _post(self, what: str, body: dict[str, Any]) -> Flow[dict[str, Any]]:
        """Send one numbered post, once, and learn from the answer."""
        job_id = self._id()
        self._pacer.note()
        try:
            answer = yield from self._client._request(
                "POST", f"/api/jobs/{job_id}/{what}", json=body, token=self.token, retries=0)
        except JobFinishedError as exc:
            self._done = True
            yield from self._refresh()
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

    def _duties(self) -> Flow[None]:
        """The background's round: flush waiting posts, or beat (the first beat an event,
        so viewers see the job start)."""
        if self._waiting_out():
            return
        if len(self._outbox):
            yield Exclusive(self._drain(wait=True))
            return
        if not (self._outage or self._heartbeat_due()):
            return
        self._last_post = time.monotonic()  # a failed beat is tried again an interval on
        if not self._posted:
            self._outbox.add("progress", {}, merge=True)
            yield Exclusive(self._drain(wait=True))
            return
        try:
            answer = yield from self._client._request(
                "POST", f"/api/jobs/{self._id()}/heartbeat", json={"attempt": self.attempt},
                token=self.token, retries=0)
        except ProgressClientError as exc:
            if not unreachable(exc):
                raise
            self._failed(exc)
            return
        self._reached()
        self._absorb(answer)

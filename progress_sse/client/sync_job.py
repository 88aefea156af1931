"""The sync job handle: a background thread heartbeats and flushes the outbox."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .core import _ExitPlan, _JobCore
from .errors import (
    APIError,
    Cancelled,
    JobFinishedError,
    ProgressClientError,
    ServiceUnavailable,
    StaleAttemptError,
)
from .protocol import ABANDONED, LONG_POLL_S, Control, _fields, _finish_body, _unreachable

if TYPE_CHECKING:
    from .sync import ProgressClient

log = logging.getLogger("progress_sse.client")  # one logger for the whole SDK


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



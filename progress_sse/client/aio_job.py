"""The async job handle: a background task heartbeats and flushes the outbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
    from .aio import AsyncProgressClient

log = logging.getLogger("progress_sse.client")  # one logger for the whole SDK


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

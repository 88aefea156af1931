"""One command under one job: what the runner knows, and its posts to the service.

The runner's parts (`output`, `control`, `run`) share this state; each is a mixin over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import deque
from typing import Any

from ..client import (
    AsyncProgressClient,
    CreatedJob,
    JobFinishedError,
    ProgressClientError,
    ServiceUnavailable,
    StaleAttemptError,
)
from .options import MAX_MESSAGE, RETRY_S, RunOptions, _Bucket, say


class _RunState:
    """One command under one job: its state, its posts, its process group."""

    def __init__(self, pc: AsyncProgressClient, created: CreatedJob, opts: RunOptions) -> None:
        self.pc = pc
        self.opts = opts
        self.job_id = created.id
        self.token: str = created.worker_token or ""
        self.attempt = int(created.job.get("attempt") or 1)
        timeout = float(created.job.get("heartbeat_timeout_s") or 60.0)
        self.heartbeat_s = min(30.0, max(0.2, timeout / 3.0))
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: deque[tuple[str, str]] = deque()
        self.have_lines = asyncio.Event()
        self.idle = True  # the poster waits for lines, none is on its way
        self.bucket = _Bucket(max(opts.log_rate, 0.01), max(1.0, opts.log_rate * 5.0))
        self.skipped = 0  # over the rate (or the queue's bound), not yet reported
        self.lost = 0  # the service could not take them, not yet reported
        self.stderr_tail: deque[str] = deque(maxlen=max(1, opts.error_lines))
        self.stop_reason: str | None = None  # why the job ends cancelled
        self.stop_signal = signal.SIGTERM
        self.killer: asyncio.Task[None] | None = None
        self.paused = False
        self.pause_refused = False
        self.job_over = False  # finished by someone else (the command itself, say)
        self.unreachable = False


    async def post(self, what: str, body: dict[str, Any]) -> dict[str, Any]:
        """One worker post, without `seq` (see the module doc); learns of a finished job."""
        try:
            answer = await self.pc.post_worker(self.job_id, what,
                                               {**body, "attempt": self.attempt},
                                               token=self.token)
        except (JobFinishedError, StaleAttemptError):
            self.job_over = True
            raise
        self.service_back()
        return answer

    def service_down(self, exc: Exception) -> None:
        if not self.unreachable:
            self.unreachable = True
            say(f"the service is unreachable ({exc}); the command goes on")

    def service_back(self) -> None:
        if self.unreachable:
            self.unreachable = False
            say("the service is reachable again")


    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def finish(self, status: str, *, error: str | None = None,
                     result: Any = None) -> None:
        """Record the outcome, retrying while the service is away (finish_timeout_s)."""
        body: dict[str, Any] = {"status": status}
        if error is not None and status != "succeeded":
            body["error"] = error[:MAX_MESSAGE]
        if result is not None:
            body["result"] = result
        deadline = time.monotonic() + self.opts.finish_timeout_s
        while True:
            try:
                await self.post("finish", body)
                return
            except (JobFinishedError, StaleAttemptError):
                return  # the command (or a requeue) ended the job: that outcome stands
            except ServiceUnavailable as exc:
                if time.monotonic() >= deadline:
                    say(f"could not record the outcome ({status}) of job {self.job_id}: {exc}")
                    return
                self.service_down(exc)
                await asyncio.sleep(RETRY_S)
            except ProgressClientError as exc:
                say(f"the service refused the outcome ({status}) of job {self.job_id}: {exc}")
                return

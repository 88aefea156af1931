"""The SQLite store's write deadline and health: when writes cannot succeed, say so.

A write not answered within write_timeout_s is answered 503 (WriteHealth._expire),
whatever holds it up: a slow or stalled disk, another process holding the database
locked. health() and trouble() say why writes cannot succeed now, for /healthz and
/metrics. SQLiteStore has these from here.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from typing import Any

import structlog

from ..errors import Unavailable
from . import Write, WriteResult
from .writer import Writer, WriterError

log = structlog.get_logger("progress_sse.store")

WRITE_TIMEOUT_S = 5.0  # longest wait for a write's answer, then 503 (settings.write_timeout_s)
PROBE_EVERY_S = 0.25  # health probes the writer only when nothing was confirmed this recently
# a failed commit keeps health at 503 until a commit succeeds or, with none tried, this
# long: no probe short of a real write can tell that the disk has room again
FAILED_HOLD_S = 30.0


class Pending:
    """A submitted write, waiting for its answer or its deadline."""

    __slots__ = ("future", "since", "write")

    def __init__(self, write: Write, future: asyncio.Future[WriteResult], since: float) -> None:
        self.write = write
        self.future = future
        self.since = since  # loop time of the submit: its deadline is this + write_timeout_s


class WriteHealth:
    """The deadline and health half of SQLiteStore, on the state its __init__ sets."""

    _writer: Writer | None
    _queue: deque[Pending | None]  # waiting writes, in submit order
    _waiting: deque[Pending]  # submitted, maybe unanswered, in order
    _watch: asyncio.TimerHandle | None  # at the oldest one's deadline
    _confirmed_at: float  # loop time of the last commit or probe confirmed
    _failed: tuple[float, str] | None  # the last commit failed: when, why
    _probe: asyncio.Future[Any] | None
    write_timeout_s: float
    failed_hold_s: float
    timeouts: int  # writes answered 503 at their deadline (for /metrics)

    def _expire(self) -> None:
        """The write deadline: answer 503 to each write older than write_timeout_s. One
        still queued is taken out, so surely not stored; one already taken into a batch
        goes on (its batch-mates' fate is bound to it), so it may still be stored, once:
        a retry with the same seq then gets the stored event back."""
        self._watch = None
        loop = asyncio.get_running_loop()
        timeout = self.write_timeout_s
        limit = loop.time() - timeout + 0.001  # the timer may fire a hair early
        queue, waiting = self._queue, self._waiting
        dropped = late = 0
        # the queue is in submit order (a batch taken back goes first, and it is older):
        # the expired writes still in it are at its front
        while queue and (p := queue[0]) is not None and p.since <= limit:
            queue.popleft()
            if not p.future.done():
                dropped += 1
                p.future.set_exception(Unavailable(
                    f"the store did not take the write within {timeout:g} s (the writer is"
                    " stalled, slow, or the database is locked); it was not stored",
                    headers={"Retry-After": "1"}))
        while waiting:
            p = waiting[0]
            if not p.future.done():
                if p.since > limit:
                    break
                late += 1
                p.future.set_exception(Unavailable(
                    f"the store did not confirm the write within {timeout:g} s (the writer is"
                    " stalled, slow, or the database is locked); it may still be stored, once:"
                    " send it again with the same seq to get its outcome",
                    headers={"Retry-After": "1"}))
            waiting.popleft()
        if dropped or late:
            self.timeouts += dropped + late
            log.warning("store.write_timeout", timeout_s=timeout, not_stored=dropped,
                        unconfirmed=late)
        if waiting:
            self._arm(loop, waiting[0].since)

    def _arm(self, loop: asyncio.AbstractEventLoop, since: float) -> None:
        # a context of its own: not the request's that happened to arm it (its log lines
        # would carry that request's id)
        self._watch = loop.call_at(since + self.write_timeout_s, self._expire,
                                   context=contextvars.Context())

    def trouble(self) -> str | None:
        """Why writes cannot succeed now, from what the store knows without asking (for
        /metrics; health() also asks the writer)."""
        writer = self._writer
        if writer is None:
            return "the store is not open"
        now = asyncio.get_running_loop().time()
        waited = writer.waited(now)
        if waited > self.write_timeout_s:
            return (f"the writer has answered nothing for {waited:.1f} s (the disk stalls,"
                    " or another process holds the database locked)")
        if self._failed is not None and now - self._failed[0] < self.failed_hold_s:
            return f"the last commit failed and none has succeeded since: {self._failed[1]}"
        return None

    async def health(self) -> str | None:
        """None when a write can succeed now, or why not. With no write confirmed in the
        last PROBE_EVERY_S, ask the writer to take the write lock and let it go
        (another process may hold the database locked); answers within write_timeout_s."""
        trouble = self.trouble()
        if trouble is not None:
            return trouble
        loop = asyncio.get_running_loop()
        if loop.time() - self._confirmed_at < PROBE_EVERY_S:
            return None
        assert self._writer is not None
        timeout = self.write_timeout_s
        probe = self._probe
        if probe is None:  # one at a time: health checks meanwhile wait for this one
            try:
                probe = self._probe = self._writer.probe(int(min(timeout / 2, 1.0) * 1000))
            except WriterError as exc:
                return f"the writer is not running ({exc})"
            probe.add_done_callback(self._probed)
        # the oldest request's age is the probe's, or more (trouble() said it is young)
        remaining = timeout - self._writer.waited(loop.time())
        await asyncio.wait((probe,), timeout=max(remaining, 0.0))
        if not probe.done():
            return (f"the writer did not answer within {timeout:g} s (the disk stalls, or"
                    " another process holds the database locked)")
        refused = probe.exception()
        if refused is not None:
            return f"the database cannot be locked for writing: {refused}"
        return None

    def _probed(self, probe: asyncio.Future[Any]) -> None:
        self._probe = None
        if not probe.cancelled() and probe.exception() is None:
            self._confirmed_at = probe.get_loop().time()

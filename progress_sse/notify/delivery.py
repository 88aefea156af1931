"""The deliverer: one background task per service instance that sends what the outbox
holds, at least once, and never holds anything else up.

Each pass claims due rows in pages (at most as many as it has free slots, so what is
in flight is bounded: `concurrency` rows and their bodies), and sends each in a task
of its own, with a deadline per attempt. Fairness: a page takes at most `per_target`
rows of one target, round robin, and none of a target that already has that many in
flight, so a dead receiver with a thousand due rows holds a few slots (fewer than
2 x `per_target`) and the others keep theirs. Posts and streams never wait for it:
it only reads and updates the outbox's rows (short statements), and the rows
themselves were written by the event's own commit.

After a failed attempt the row is due again after an exponential backoff with jitter
(`retry_min_s` doubled per attempt, at most `retry_max_s`, times a random 0.5-1), until
`max_age_s` after its event: then it is `failed`, logged once with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import structlog

from .outbox import Delivery, Outbox
from .webhook import SendError

log = structlog.get_logger("progress_sse.notify")

Send = Callable[[Delivery], Awaitable[None]]  # one attempt; SendError when not taken
PENDING_EVERY_S = 1.0  # how often the pending count (/metrics) is read again
STOP_RELEASE_S = 2.0  # at most this long letting go of interrupted rows at stop
PRUNE_EVERY_S = 600.0  # how often ended rows older than keep_s are deleted
PRUNE_PAGE = 1000  # rows per delete (one short transaction each)
T = TypeVar("T")


@dataclass(frozen=True)
class Policy:
    max_age_s: float = 86400.0
    timeout_s: float = 10.0
    retry_min_s: float = 5.0
    retry_max_s: float = 3600.0
    concurrency: int = 16
    per_target: int = 2
    poll_s: float = 1.0  # look for due rows at least this often (retries, other instances)
    keep_s: float = 0.0  # delete delivered and failed rows this long after (0: keep them)

    @property
    def lease_s(self) -> float:
        """How long a claim holds a row: past any attempt, with room for the updates."""
        return 2 * self.timeout_s + 5.0

    def backoff(self, attempts: int) -> float:
        """The wait after the `attempts`-th failed attempt: doubled each time, jittered."""
        base = min(self.retry_max_s, self.retry_min_s * 2.0 ** min(attempts - 1, 40))
        return base * random.uniform(0.5, 1.0)


class Deliverer:
    def __init__(self, outbox: Outbox, senders: Mapping[str, Send], policy: Policy) -> None:
        self.outbox = outbox
        self.senders = senders
        self.policy = policy
        self.delivered = 0  # by this instance (for /metrics)
        self.failed = 0  # given up by this instance
        self.pending = 0  # in the outbox (every instance's), read every PENDING_EVERY_S
        self._inflight: dict[asyncio.Task[None], Delivery] = {}  # attempt -> its row
        self._targets: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._troubled = False  # the outbox could not be read: logged once until it can

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="progress-sse-notify")

    async def stop(self) -> None:
        """Stop claiming and end the attempts in flight; their rows are let go, due at
        once (for another instance, or this one's next start; if even that fails, their
        lease runs out)."""
        interrupted = list(self._inflight.values())
        tasks = [t for t in (self._task, *self._inflight) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._task = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_RELEASE_S):
                for d in interrupted:
                    await self._quietly(self.outbox.retry(
                        d.id, 0.0, "the service stopped during the attempt"))

    def nudge(self) -> None:
        """Something may be due now (an event that asks for notifications was stored)."""
        self._wake.set()

    async def _run(self) -> None:
        """The deliverer's life: a bug in a pass is logged and the next pass goes on,
        rather than ending every delivery of the instance."""
        while True:
            try:
                await self._passes()
            except Exception:
                log.exception("notify.deliverer_failed")
                await asyncio.sleep(self.policy.poll_s)

    async def _passes(self) -> None:
        await self._quietly(self.outbox.recover())
        counted = -PENDING_EVERY_S
        pruned = time.monotonic()  # not at start: a restart loop would prune each time
        p = self.policy
        while True:
            self._wake.clear()
            free = p.concurrency - len(self._inflight)
            claimed = 0
            if free > 0:
                busy = [t for t, n in self._targets.items() if n >= p.per_target]
                rows = await self._quietly(self.outbox.claim(free, p.per_target, busy,
                                                             p.lease_s))
                for d in rows or ():
                    self._launch(d)
                claimed = len(rows or ())
            if time.monotonic() - counted >= PENDING_EVERY_S:
                counted = time.monotonic()
                pending = await self._quietly(self.outbox.pending())
                if pending is not None:
                    self.pending = pending
            if p.keep_s and time.monotonic() - pruned >= PRUNE_EVERY_S:
                pruned = time.monotonic()
                await self.prune()
            if claimed and claimed == free:
                continue  # a full page: there may be more due already (after a slot frees)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), p.poll_s)

    async def prune(self) -> int:
        """Delete the ended rows older than keep_s, a page at a time; how many went."""
        gone = 0
        while True:
            n = await self._quietly(self.outbox.prune(self.policy.keep_s, PRUNE_PAGE)) or 0
            gone += n
            if n < PRUNE_PAGE:
                if gone:
                    log.info("notify.pruned", rows=gone)
                return gone

    async def _quietly(self, step: Awaitable[T]) -> T | None:
        """A step on the outbox; None (logged once until one succeeds) if it failed."""
        try:
            result = await step
        except Exception as exc:
            if not self._troubled:
                log.warning("notify.outbox_unavailable", error=str(exc))
            self._troubled = True
            return None
        self._troubled = False
        return result

    def _launch(self, d: Delivery) -> None:
        task = asyncio.create_task(self._attempt(d), name=f"progress-sse-notify-{d.id}")
        self._inflight[task] = d
        self._targets[d.target] += 1
        task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task[None]) -> None:
        target = self._inflight.pop(task).target
        self._targets[target] -= 1
        if self._targets[target] <= 0:
            del self._targets[target]
        self._wake.set()  # a slot is free

    async def _attempt(self, d: Delivery) -> None:
        p = self.policy
        started = time.monotonic()
        if d.age_s > p.max_age_s:  # the service was down, or far behind
            said = f"; the last attempt: {d.last_error}" if d.last_error else ""
            await self._give_up(d, f"not sent within {p.max_age_s:g} s of its event{said}")
            return
        send = self.senders.get(d.channel)
        try:
            if send is None:
                raise SendError(f"no {d.channel} channel is configured")
            async with asyncio.timeout(p.timeout_s):
                await send(d)
        except SendError as exc:
            error = str(exc)
        except TimeoutError:
            error = f"no answer within {p.timeout_s:g} s"
        except Exception as exc:  # a bug in a channel: the row is retried, the task lives
            log.exception("notify.attempt_crashed", notification=d.id)
            error = f"{type(exc).__name__}: {exc}"[:300]
        else:
            self.delivered += 1  # counted before the row says so: /metrics never lags it
            self.pending = max(0, self.pending - 1)
            await self._quietly(self.outbox.delivered(d.id))
            log.info("notify.delivered", notification=d.id, job_id=d.job_id,
                     channel=d.channel, attempts=d.attempts)
            return
        delay = p.backoff(d.attempts)
        if d.age_s + (time.monotonic() - started) + delay > p.max_age_s:
            await self._give_up(d, f"{error} (attempt {d.attempts}; retried for "
                                   f"{p.max_age_s:g} s)")
            return
        log.debug("notify.retry", notification=d.id, error=error, in_s=round(delay, 3))
        await self._quietly(self.outbox.retry(d.id, delay, error))

    async def _give_up(self, d: Delivery, reason: str) -> None:
        self.failed += 1
        self.pending = max(0, self.pending - 1)
        await self._quietly(self.outbox.failed(d.id, reason))
        log.warning("notify.gave_up", notification=d.id, job_id=d.job_id,
                    channel=d.channel, attempts=d.attempts, reason=reason)

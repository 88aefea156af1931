"""The hub: an in-memory tail of the newest committed events, live streams, wake-ups.

The hub is a cache, not a queue: it holds no per-subscriber buffer and never drops
anything for anyone. A stream keeps its own cursor, reads what is newer from the
tail, and reads from the store when its cursor is older than the tail.

A stream that has caught up subscribes: from then on each publish hands it the new
events at once (`Subscriber.push`), and the stream writes them if its connection
takes them without waiting. One that cannot (a slow reader) unsubscribes and
catches up again at its own pace, from its cursor. So a publish to a thousand
live streams is a thousand writes in one loop turn, with no task woken per stream.

Long-polling workers wait on one-shot `Wake`s, one per job, replaced at its publish:
a waiter holds the wake it took before reading, so a publish between its read and
its wait still wakes it, and there is no lock that a cancelled waiter could leave held.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from .store import Event


class Subscriber(Protocol):
    """A live stream, as the hub sees it."""

    def push(self, events: Sequence[Event], shared: dict[Any, Any]) -> None:
        """Take events published after everything pushed before; `shared` lets streams
        with the same filter build their chunk once per publish."""

    def keep_alive(self, now: float) -> None: ...

    def fall_behind(self, cursor: int) -> None:
        """Catch up from `cursor` at your own pace: the tail broke off after it."""

    def stop(self, why: str) -> None: ...


class Wake:
    """A one-shot wake-up shared by every long poll waiting for the same job's publish.

    Every waiter parks its own future, so cancelling one (a timed-out poll) touches
    nobody else, and `set` resolves them all."""

    __slots__ = ("_futures", "_set")

    def __init__(self) -> None:
        self._futures: list[asyncio.Future[None]] = []
        self._set = False

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        futures, self._futures = self._futures, []
        for fut in futures:
            if not fut.done():  # a cancelled waiter's future is done already
                fut.set_result(None)

    async def wait(self) -> None:
        if self._set:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.append(fut)
        await fut


class Hub:
    def __init__(self, tail_size: int = 4096, tail_bytes: int = 8 << 20) -> None:
        self.tail_size = tail_size
        self.tail_bytes = tail_bytes
        self.head = 0
        self._tail: list[Event] = []
        self._bytes = 0
        self._first = 1  # id of self._tail[0]
        self._by_job: dict[str, Wake] = {}
        self._watched: Counter[str] = Counter()  # long polls watching each job
        self.closed = False
        self._open: dict[Subscriber, None] = {}  # every open stream, live or catching up
        self._live: dict[Subscriber, None] = {}  # live streams woken by any event
        self._live_by_job: dict[str, dict[Subscriber, None]] = {}  # ... by one job's
        self.catch_ups = 0  # times a stream read on from its cursor: at open, or fallen behind
        self.published = 0  # events published since start (for /metrics)

    @property
    def streams(self) -> int:
        return len(self._open)

    @property
    def live(self) -> int:
        """Streams caught up and pushed each event as it is published."""
        return len(self._live) + sum(len(subs) for subs in self._live_by_job.values())

    def opened(self, sub: Subscriber) -> None:
        self._open[sub] = None

    def released(self, sub: Subscriber, key: str | None) -> None:
        self.unsubscribe(sub, key)
        self._open.pop(sub, None)

    def subscribe(self, sub: Subscriber, key: str | None) -> None:
        """Push `sub` every later event (of job `key`, if named). Call with its cursor at head."""
        if key is None:
            self._live[sub] = None
        else:
            self._live_by_job.setdefault(key, {})[sub] = None

    def unsubscribe(self, sub: Subscriber, key: str | None) -> None:
        if key is None:
            self._live.pop(sub, None)
            return
        subs = self._live_by_job.get(key)
        if subs is not None:
            subs.pop(sub, None)
            if not subs:
                del self._live_by_job[key]

    def reset(self, head: int) -> None:
        """Start from the store's head (nothing cached yet)."""
        self.head = head
        self._tail = []
        self._bytes = 0
        self._first = head + 1

    def publish(self, events: Sequence[Event]) -> None:
        """Append committed events (ids contiguous, after head), push them to the live
        streams, and wake the waiters."""
        if not events:
            return
        before = self.head
        gap = events[0].id != before + 1
        if gap:
            # a gap (ids skipped, e.g. by another writer): the tail restarts here,
            # older cursors read from the store
            self._tail = []
            self._bytes = 0
            self._first = events[0].id
        self._tail.extend(events)
        self._bytes += sum(len(e.frame) for e in events)
        self.head = events[-1].id
        self.published += len(events)
        if len(self._tail) > self.tail_size * 1.25 or self._bytes > self.tail_bytes * 1.25:
            self._trim()
        if gap:
            for sub in self._all_live():
                sub.fall_behind(before)
        else:
            self._push(events)
        by_job = self._by_job
        if by_job:
            for ev in events:
                waiter = by_job.pop(ev.job_id, None)
                if waiter is not None:
                    waiter.set()

    def _all_live(self) -> list[Subscriber]:
        """A copy: a stream may unsubscribe while it is handled."""
        return [*self._live, *(s for subs in self._live_by_job.values() for s in subs)]

    def _push(self, events: Sequence[Event]) -> None:
        shared: dict[Any, Any] = {}
        for sub in list(self._live):
            sub.push(events, shared)
        by_job = self._live_by_job
        if by_job:
            for job_id in {e.job_id for e in events} if len(events) > 1 else (events[0].job_id,):
                subs = by_job.get(job_id)
                if subs:
                    for sub in list(subs):
                        sub.push(events, shared)

    def _trim(self) -> None:
        """Drop the oldest events down to both bounds (amortised: only when 25% over)."""
        drop, size = 0, self._bytes
        count = len(self._tail)
        while drop < count - 1 and (count - drop > self.tail_size or size > self.tail_bytes):
            size -= len(self._tail[drop].frame)
            drop += 1
        del self._tail[:drop]
        self._bytes = size
        self._first += drop

    @contextlib.contextmanager
    def watching(self, job_id: str) -> Iterator[None]:
        """Hold wake-ups for a job while the block runs (see `waiter`); the last watcher
        to leave frees them, so a job nobody waits on costs nothing here."""
        self._watched[job_id] += 1
        try:
            yield
        finally:
            self._watched[job_id] -= 1
            if not self._watched[job_id]:
                del self._watched[job_id]
                self._by_job.pop(job_id, None)

    def waiter(self, job_id: str) -> Wake:
        """The wake-up the next publish of this job will set. Take it before reading,
        inside `watching(job_id)`."""
        ev = self._by_job.get(job_id)
        if ev is None:
            ev = self._by_job[job_id] = Wake()
        return ev

    @property
    def watched(self) -> int:
        """Jobs with long polls waiting (a wake-up is held only for these)."""
        return len(self._watched)

    def after(self, cursor: int, limit: int) -> list[Event] | None:
        """Events with id > cursor from the tail, or None when the tail no longer reaches back."""
        if cursor + 1 < self._first:
            return None
        start = cursor + 1 - self._first
        return self._tail[start:start + limit]

    def tick(self) -> None:
        """Let live streams send a keep-alive; no timer per stream."""
        now = time.monotonic()
        for sub in self._all_live():
            sub.keep_alive(now)

    async def keep_alive(self, interval: float) -> None:
        """Tick every `interval` seconds until closed."""
        while not self.closed:
            await asyncio.sleep(interval)
            self.tick()

    def close(self) -> None:
        """End every stream; waiters see `closed` when woken."""
        self.closed = True
        for sub in list(self._open):
            sub.stop("shutdown")
        for ev in self._by_job.values():
            ev.set()
        self._by_job.clear()

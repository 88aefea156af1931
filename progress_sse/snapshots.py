"""Snapshot frames for streams that start fresh: read and encoded once for every stream
with the same filter that opens meanwhile.

A storm of opens (a dashboard reloaded in a loop, a script that reconnects without
`Last-Event-ID`) would otherwise read and encode up to `limit` jobs per open, and
queue those reads behind each other long after their clients left. Here opens with
one filter share one read while it runs, and take its frame for `reuse_s` after it;
a read whose every waiter has gone is cancelled with them. Any such frame is a
correct start: the stream goes on with every event after the frame's head.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from .codec import dumps
from .store import Filter, Store

Key = tuple[Filter, bool]


@dataclass(frozen=True, slots=True)
class Taken:
    """A snapshot as a stream sends it."""

    frame: bytes  # the whole `snapshot` event, id to blank line
    head: int  # its id: the stream goes on after it
    oldest: int | None  # the first id after the horizon, read with it
    finished: frozenset[str]  # jobs in it whose `finished` event is at or before head


class Snapshots:
    def __init__(self, store: Store, limit: int = 500, reuse_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.limit = limit
        self.reuse_s = reuse_s
        self._clock = clock
        self._reads: dict[Key, tuple[asyncio.Task[Taken], list[int]]] = {}
        self._recent: dict[Key, tuple[float, Taken]] = {}
        self._swept = 0.0
        self.reads = 0  # snapshot reads made (for /metrics and tests)

    async def take(self, flt: Filter, reset: bool, fresh: bool = False) -> Taken:
        """The snapshot of what `flt` shows; `reset` marks one sent instead of a resume.
        `fresh`: read now, for a stream whose cursor was pruned under it (a shared one
        may be from before events it has sent)."""
        if fresh:
            return await self._read(flt, reset)
        key = (flt, reset)
        now = self._clock()
        recent = self._recent.get(key)
        if recent is not None and now - recent[0] < self.reuse_s:
            return recent[1]
        if now - self._swept > self.reuse_s:
            self._swept = now
            self._recent = {k: v for k, v in self._recent.items()
                            if now - v[0] < self.reuse_s}
        entry = self._reads.get(key)
        if entry is None:
            task = asyncio.create_task(self._read(flt, reset))
            entry = self._reads[key] = (task, [0])
            task.add_done_callback(lambda t: self._landed(key, t))
        task, waiting = entry
        waiting[0] += 1
        try:
            return await asyncio.shield(task)
        finally:
            waiting[0] -= 1
            if not waiting[0] and not task.done():
                task.cancel()  # nobody wants it any more: not read, or not encoded

    def _landed(self, key: Key, task: asyncio.Task[Taken]) -> None:
        if self._reads.get(key, (None,))[0] is task:
            del self._reads[key]
        if not task.cancelled() and task.exception() is None:
            self._recent[key] = (self._clock(), task.result())

    async def _read(self, flt: Filter, reset: bool) -> Taken:
        self.reads += 1
        snap = await self.store.snapshot(flt, self.limit)
        now = time.time()
        doc: dict[str, object] = {"id": snap.head, "type": "snapshot"}
        if reset:
            doc["reset"] = True
        doc["jobs"] = [j.public(now) for j in snap.jobs]
        finished = frozenset(j.id for j in snap.jobs
                             if j.final_event_id is not None and j.final_event_id <= snap.head)
        frame = f"id: {snap.head}\nevent: snapshot\ndata: {dumps(doc)}\n\n".encode()
        return Taken(frame, snap.head, snap.oldest, finished)

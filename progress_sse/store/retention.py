"""Retention and compaction: what is deleted, when, and how the horizon moves; shared by
both stores, which each do the deleting in their own SQL (sqlite_retention.py,
postgres_retention.py).

Three deletions, each in small transactions (`retention_batch` rows):

* expiry: events older than `retention_days`, and all but the newest
  `retention_events`; then jobs that finished before that point, whose events are
  all gone;
* compaction: `compact_after` a job finished, its `progress` events (its `created`,
  `status`, `log` and `finished` events and its job row stay);
* reclaiming: the space freed (SQLite's incremental vacuum; PostgreSQL's autovacuum
  does it there).

The horizon is the id up to which events may be missing: every event after it is
still in the log. Each deletion raises it in the transaction that deletes, so a
read that sees the deletion sees the horizon too: a resume from before it, and a
reader catching up from the store whose cursor it passed, are answered with a reset
snapshot, never a silent gap (Page.reset, streams.py).

How an event's age is known: by time marks, not a column. Each round of the pruner
writes one row (head, at): every event up to `head` was written by `at`. Events
older than N days are those up to the newest mark at least N days old. A column on
events would cost every post (a wider row, a wider commit) to learn what a mark per
round tells as well; the price is precision: an event is deleted up to one round
(`retention_every_s`) after its time, and events written before marks existed count
as written when the first was (the migration writes it).

Pruning never stalls the service: a background task, one transaction at a time, and
after each one a rest of REST times as long as it took (at least MIN_REST_S), so
pruning takes at most a tenth of the database's time however far behind it is (with
a rest of 4x, a fifth, `make bench` measured 0.74-0.96x the posts/s without pruning;
with 9x, 0.92-1.0x, pruning 10-16k old events/s under that load). On
SQLite the transactions go through the writer's own queue, between its commits, so
they never wait for the write lock nor make a commit wait for it; on PostgreSQL one
instance prunes at a time, the holder of the 'retention' lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

import structlog

if TYPE_CHECKING:
    from ..settings import Settings

log = structlog.get_logger("progress_sse.store.retention")

REST = 9.0  # rest this many times a transaction's duration after it
MIN_REST_S = 0.005
COMPACT_JOBS = 100  # jobs looked at per compaction transaction
DAY_S = 86400.0


class Retained(NamedTuple):
    """What the log still holds: every event after `horizon` (the oldest point a
    resume can start from), and the oldest event kept (None: none)."""

    horizon: int
    oldest: int | None


@dataclass(frozen=True)
class Policy:
    """What to keep (0: no limit of that kind) and how to prune."""

    max_age_s: float = 0.0
    max_events: int = 0
    compact_after_s: float = 0.0
    every_s: float = 60.0
    batch: int = 2000

    @property
    def active(self) -> bool:
        return bool(self.max_age_s or self.max_events or self.compact_after_s)

    @classmethod
    def of(cls, settings: Settings) -> Policy:
        return cls(max_age_s=settings.retention_days * DAY_S,
                   max_events=settings.retention_events,
                   compact_after_s=settings.compact_after,
                   every_s=settings.retention_every_s, batch=settings.retention_batch)


# what a pruning transaction did: rows deleted (pages, for reclaim), and whether more
# is left to do
Done = tuple[int, bool]
KEEP_ALL = Policy()


class Steps(Protocol):
    """A store's pruning transactions; each deletes at most `policy.batch` rows."""

    # write a time mark (when `stamp`: expiry uses them); False: another instance prunes
    async def mark(self, stamp: bool) -> bool: ...
    async def expire(self, policy: Policy) -> Done: ...
    async def compact(self, policy: Policy) -> Done: ...
    async def drop_jobs(self, policy: Policy) -> Done: ...
    async def reclaim(self, policy: Policy) -> Done: ...
    async def retained(self) -> Retained: ...


class Pruner:
    """The background task that runs a store's Steps every `policy.every_s` (sooner
    when woken: retention by count, see nudge)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.retained = Retained(0, None)  # as last read (for /metrics, /healthz)
        self.expired = 0  # rows deleted since start: events by age or count
        self.compacted = 0  # progress events compacted away
        self.dropped = 0  # jobs deleted
        self.rounds = 0
        self.longest_s = 0.0  # the longest transaction of the last round, as awaited
        self._steps: Steps | None = None
        self._task: asyncio.Task[None] | None = None
        self._woken = asyncio.Event()

    def start(self, steps: Steps, retained: Retained) -> None:
        self._steps = steps
        self.retained = retained
        self._task = asyncio.create_task(self._run(), name="progress-sse-retention")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def nudge(self, head: int) -> None:
        """A commit reached `head`: with retention by count, prune once 10% over it."""
        keep = self.policy.max_events
        if keep and head - self.retained.horizon >= keep * 1.1:
            self._woken.set()

    async def _run(self) -> None:
        if not self.policy.active:
            return  # keep everything: nothing to do, ever
        while True:
            try:
                await self.prune()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is down, say: the next round tries again
                log.warning("retention.failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.policy.every_s)
            self._woken.clear()

    async def prune(self) -> None:
        """One round: mark the time, expire, compact, drop jobs, reclaim space."""
        steps, policy = self._steps, self.policy
        assert steps is not None
        self.rounds += 1
        self.longest_s = 0.0
        if await steps.mark(bool(policy.max_age_s or policy.max_events)):
            expired = await self._repeat(steps.expire, policy, "expired")
            compacted = await self._repeat(steps.compact, policy, "compacted") \
                if policy.compact_after_s else 0
            dropped = await self._repeat(steps.drop_jobs, policy, "dropped")
            await self._repeat(steps.reclaim, policy, None)
            if expired or compacted or dropped:
                log.info("retention.pruned", events=expired, compacted=compacted,
                         jobs=dropped, longest_ms=round(self.longest_s * 1000, 1))
        self.retained = await steps.retained()

    async def _repeat(self, step: Callable[[Policy], Awaitable[Done]], policy: Policy,
                      counter: Literal["expired", "compacted", "dropped"] | None) -> int:
        """Run `step` until it has nothing left, resting after each transaction; count
        its rows in `counter` as it goes."""
        total = 0
        while True:
            started = time.monotonic()
            rows, more = await step(policy)
            took = time.monotonic() - started
            self.longest_s = max(self.longest_s, took)
            total += rows
            if counter is not None and rows:
                setattr(self, counter, getattr(self, counter) + rows)
                assert self._steps is not None
                self.retained = await self._steps.retained()  # /metrics follows a long round
            if not more:
                return total
            await asyncio.sleep(max(MIN_REST_S, took * REST))

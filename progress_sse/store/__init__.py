"""The store: the durable log and the jobs' current state. The source of truth."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from ..codec import escape_separators
from ..jobs import Job, Outcome
from .retention import Pruner as Pruner
from .retention import Retained as Retained


class Event(NamedTuple):
    """A committed event. `frame` is its SSE encoding, built once and shared by every stream.

    A named tuple: immutable and about five times cheaper to build than a frozen
    dataclass, which counts when a replay builds a hundred thousand of them."""

    id: int
    job_id: str
    owner: str
    kind: str
    type: str
    body: str
    frame: bytes

    @classmethod
    def build(cls, id: int, job_id: str, owner: str, kind: str, type: str, body: str) -> Event:
        """An event whose body codec.dumps wrote (line separators already escaped)."""
        frame = f"id: {id}\nevent: {type}\ndata: {body}\n\n".encode()
        return cls(id, job_id, owner, kind, type, body, frame)

    @classmethod
    def stored(cls, id: int, job_id: str, owner: str, kind: str, type: str,
               body: str) -> Event:
        """An event read back from a store: its body may be from before line separators
        were escaped when written, so they are escaped here."""
        return cls.build(id, job_id, owner, kind, type, escape_separators(body))


Apply = Callable[[Job | None, float], Outcome]


class Page(NamedTuple):
    """Events read from the log, and the id up to which the read is complete: a reader's
    cursor may move to `upto` and no further (a filtered read may end on no event).
    `reset`: events after the reader's cursor were pruned under it (its cursor is older
    than the horizon, seen in the read's own snapshot): no events, start over."""

    events: list[Event]
    upto: int
    reset: bool = False


class Snapshot(NamedTuple):
    """Jobs as of the event `head`, and the first id after the horizon (a resume from
    before it is reset), from one read."""

    jobs: list[Job]
    head: int
    oldest: int | None


# per-request values: slots, not frozen (a frozen dataclass's __init__ measured 10x slower)
@dataclass(slots=True)
class Write:
    """One request for the writer: a job, the rule to apply to it, and its idempotency key."""

    job_id: str
    apply: Apply
    seq: int | None = None
    attempt: int | None = None
    # create: an existing job with this id is returned as it is (idempotent create)
    create: bool = False
    # may this caller touch the job? Run first, before even a repeated seq is answered
    check: Callable[[Job | None], object] | None = None


@dataclass(slots=True)
class WriteResult:
    job: Job
    events: Sequence[Event]
    job_json: str
    duplicate: bool = False
    created: bool = False


@dataclass(frozen=True)
class Filter:
    """Which events and jobs a reader may see and asked for."""

    owner: str | None = None  # None: every owner (admin)
    job_ids: frozenset[str] | None = None
    kinds: frozenset[str] | None = None
    statuses: frozenset[str] = field(default_factory=frozenset)

    def constraints(self, job_column: str = "id") -> list[tuple[str, list[str]]]:
        """(column, allowed values) for each column the filter constrains, for a store's
        query on the jobs table or (job_column="job_id") the events; each store writes
        its own placeholders."""
        found: list[tuple[str, list[str]]] = []
        for column, values in (("owner", None if self.owner is None else {self.owner}),
                               (job_column, self.job_ids), ("kind", self.kinds),
                               ("status", self.statuses or None)):
            if values is not None:
                found.append((column, sorted(values)))
        return found

    def matches(self, event: Event) -> bool:
        if self.owner is not None and event.owner != self.owner:
            return False
        if self.job_ids is not None and event.job_id not in self.job_ids:
            return False
        return not (self.kinds is not None and event.kind not in self.kinds)


class Store(Protocol):
    """What the service needs from a store; SQLite now, PostgreSQL next."""

    batches: int  # group commits so far
    writes: int  # write requests they carried
    redone: int  # writes done again one at a time after their batch failed
    timeouts: int  # writes answered 503 at the write deadline
    retention: Pruner  # pruning, and what the log holds as it last saw (for /metrics)

    async def start(self, publish: Callable[[Sequence[Event]], None]) -> int: ...
    async def close(self) -> None: ...
    async def submit(self, write: Write) -> WriteResult: ...
    async def get_job(self, job_id: str) -> Job | None: ...
    async def list_jobs(
        self, flt: Filter, limit: int, before: int | None
    ) -> tuple[list[Job], int, int | None]: ...
    async def snapshot(self, flt: Filter, limit: int) -> Snapshot: ...
    async def events_after(
        self, after: int, upto: int, flt: Filter, limit: int, max_bytes: int = 0
    ) -> Page: ...
    # the first id after the horizon (a resume from before it is reset) and the head
    async def bounds(self) -> tuple[int | None, int]: ...
    async def stale_jobs(self, now: float) -> list[str]: ...
    async def check(self) -> None: ...
    async def health(self) -> str | None: ...  # why writes cannot succeed now, or None
    def trouble(self) -> str | None: ...  # the same from what is known, without asking


class Caller(Protocol):
    """A write's caller, waiting on its answer."""

    future: asyncio.Future[WriteResult]


def settle(batch: Sequence[Caller], answers: Sequence[WriteResult | Exception]) -> None:
    """Answer each caller of a committed batch, in order; one gone already is skipped."""
    for caller, answer in zip(batch, answers, strict=True):
        if caller.future.done():
            continue
        if isinstance(answer, BaseException):
            caller.future.set_exception(answer)
        else:
            caller.future.set_result(answer)

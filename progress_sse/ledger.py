"""The job ledger: the rules that turn a batch of writes into events and changed jobs.

Kept apart from the store, and free of SQL, so that every store shares it unchanged
(SQLite now, PostgreSQL next): a store only persists what a batch produced and reads
it back. The ledger owns the writer's committed state (the active jobs, the queues,
the finished runs the estimates learn from, the next event id) and, for each write in
turn: the caller's permission check (run before even a repeated seq is answered), the
idempotent create, seq de-duplication and attempt fencing, the job rule itself, queue
places and waits, estimate refreshes, and the events with their ids and bodies.

A store builds a batch on the state (`build`), sends its commit, and only then takes
its changes as committed (`adopt`): the next batch is built on them while this one is
written. After a failed commit the store reads the state back from its database
(`reset`, `learn`, `learn_history`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from orjson import Fragment

from .codec import dumps
from .errors import Conflict, ProgressError
from .eta import FinishedRun, estimate_wait
from .jobs import Draft, Job
from .notify.rules import Rule
from .store import Event, Write, WriteResult
from .worker_rules import check_seq, finished_run, with_estimate, with_queue_position

HISTORY = 50  # finished runs per kind that the estimator learns from

# the stored event of (job id, attempt, seq), or None: how a repeated seq is answered
Lookup = Callable[[str, int, int], Awaitable[Event | None]]


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


class Ledger:
    """The writer's committed state, and the rules that build a batch on it."""

    def __init__(self, estimate_every_s: float = 1.0, notify: Rule | None = None) -> None:
        self.estimate_every_s = estimate_every_s
        self.notify = notify  # the outbox rows an event asks for (notify/rules.py)
        self.jobs: dict[str, Job] = {}  # active jobs' committed state; the writer owns it
        self.queues: dict[str, list[str]] = {}  # queued job ids per queue, in order
        self.history: dict[str, list[FinishedRun]] = {}  # succeeded runs per kind
        self.next_id = 1

    # ------------------------------------------------------------ state from a store

    def reset(self, head: int, active: Iterable[Job]) -> None:
        """Start again from what is committed: the head id and the active jobs in the
        order they were created; the history is learnt again as it is needed."""
        self.next_id = head + 1
        self.jobs.clear()
        self.queues.clear()
        self.history.clear()
        for job in active:
            self.jobs[job.id] = job
            if job.status == "queued":
                self.queues.setdefault(job.queue, []).append(job.id)

    def unknown(self, job_ids: Iterable[str]) -> list[str]:
        """The jobs the store is to read before a batch touches them (finished ones)."""
        return [j for j in job_ids if j and j not in self.jobs]

    def kinds_to_learn(self, kinds: Iterable[str]) -> set[str]:
        """The kinds whose history the store is to read before a batch uses it."""
        return set(kinds) - set(self.history)

    def learn(self, job: Job) -> None:
        """A job read back from the store."""
        self.jobs[job.id] = job

    def learn_history(self, kind: str, jobs: Iterable[Job]) -> None:
        """A kind's latest succeeded jobs, oldest first, read back from the store."""
        runs = [finished_run(job) for job in jobs]
        self.history[kind] = [r for r in runs if r is not None]

    # ------------------------------------------------------------ batches

    async def build(self, writes: Sequence[Write], now: float, lookup: Lookup) -> Batch:
        """Apply the rules to each write in turn, on the committed state and the changes
        of the writes before it; nothing is taken as committed until `adopt`. A write the
        rules refuse is answered with its error and changes nothing."""
        b = Batch(self, now, {w.job_id for w in writes})
        answers = b.answers
        for w in writes:
            job = b.working.get(w.job_id) or self.jobs.get(w.job_id)
            try:
                if w.check is not None:
                    w.check(job)
                if job is not None and w.create:
                    answers.append(WriteResult(job, (), dumps(job.public(now))))
                    continue
                if job is not None and (w.attempt is None or w.attempt == job.attempt) \
                        and check_seq(job, w.seq):
                    assert w.seq is not None
                    key = (job.id, job.attempt, w.seq)
                    dup = b.seqs.get(key) or await lookup(*key)
                    if dup is None:
                        raise Conflict(f"seq {w.seq} is not after the last seq "
                                       f"({job.last_seq})", field="seq")
                    answers.append(WriteResult(job, (dup,), dumps(job.public(now)),
                                               duplicate=True))
                    continue
                new_job, drafts = w.apply(job, now)
            except ProgressError as exc:
                answers.append(exc)
                continue
            if new_job is job:  # nothing changed: nothing to store
                assert job is not None and not drafts
                answers.append(WriteResult(job, (), dumps(job.public(now))))
                continue
            new_job = b.place_in_queue(job, new_job)
            if new_job.status == "running":
                new_job = with_estimate(new_job, now, self.history.get(new_job.kind, []),
                                        self.estimate_every_s)
            events, job_json = b.emit(new_job, drafts)
            answers.append(WriteResult(b.working[new_job.id], events, job_json,
                                       created=job is None))
        b.move_queues_on()
        return b

    def adopt(self, b: Batch) -> None:
        """Take a batch's changes as committed, once its commit is sent (or it has none):
        the next batch is built on them. Finished jobs it touched are forgotten (read
        again from the store if touched again)."""
        if b.changed:
            self.next_id = b.next_id
            working = b.working
            runs = [(job.kind, run) for job in working.values()
                    if job.finished and (run := finished_run(job)) is not None]
            self.jobs.update(working)
            self.queues.update(b.queues)
            for kind, run in runs:
                history = self.history.setdefault(kind, [])
                history.append(run)
                del history[:-HISTORY]
        for job_id in b.touched:
            cached = self.jobs.get(job_id)
            if cached is not None and cached.finished:
                del self.jobs[job_id]


class Batch:
    """One batch being built: jobs as changed so far, and the events to store."""

    def __init__(self, ledger: Ledger, now: float, touched: set[str]) -> None:
        self.ledger = ledger
        self.now = now
        self.ts = iso(now)
        self.touched = touched  # the jobs its writes name
        self.next_id = ledger.next_id
        self.answers: list[WriteResult | ProgressError] = []  # one per write, in order
        self.working: dict[str, Job] = {}  # the jobs it changed, as changed
        self.changed: dict[str, str] = {}  # their public JSON, as stored with them
        self.events: list[Event] = []
        # what the log keeps of each event: (id, job_id, owner, kind, type, attempt, seq,
        # body), in id order
        self.event_rows: list[tuple[Any, ...]] = []
        self.seqs: dict[tuple[str, int, int], Event] = {}
        # the outbox rows its events ask for (notify/): (event id, job id, channel,
        # target, body, created at), written in the same transaction as the events
        self.notify_rows: list[tuple[Any, ...]] = []
        self.queues: dict[str, list[str]] = {}  # copies of the queues this batch changes
        self.moved: set[str] = set()  # queues where someone left: places behind change
        self.running: dict[str, int] = {}  # jobs running per queue, counted once a batch

    def emit(self, job: Job, drafts: list[Draft]) -> tuple[list[Event], str]:
        """Give the drafts ids, serialise them with the job after them, keep the rows."""
        heads = []
        for d in drafts:
            if d.type == "finished":
                job = job.evolve(final_event_id=self.next_id)
            heads.append((self.next_id, d))
            self.next_id += 1
        job_json = dumps(job.public(self.now))
        job_fragment = Fragment(job_json)
        events = []
        notify = self.ledger.notify
        for eid, d in heads:
            body = dumps({"id": eid, "job_id": job.id, "type": d.type, "ts": self.ts,
                          **d.fields, "job": job_fragment})
            ev = Event.build(eid, job.id, job.owner, job.kind, d.type, body)
            events.append(ev)
            self.event_rows.append((eid, job.id, job.owner, job.kind, d.type, job.attempt,
                                    d.seq, body))
            if d.seq is not None:
                self.seqs[(job.id, job.attempt, d.seq)] = ev
            if notify is not None and d.type != "progress":
                for channel, target in notify(job, d):
                    self.notify_rows.append((eid, job.id, channel, target, body, self.now))
        self.working[job.id] = job
        self.changed[job.id] = job_json
        self.events.extend(events)
        return events, job_json

    def _queue(self, name: str) -> list[str]:
        if name not in self.queues:
            self.queues[name] = list(self.ledger.queues.get(name, ()))
        return self.queues[name]

    def place_in_queue(self, old: Job | None, job: Job) -> Job:
        """Join the queue's end on entering `queued`; leave it on any other status."""
        was = old is not None and old.status == "queued"
        if job.status == "queued" and not was:
            q = self._queue(job.queue)
            q.append(job.id)
            job = job.evolve(announced_position=None)
            wait = self._wait(job, len(q))
            return with_queue_position(job, len(q), wait, self.now)[0]
        if was and job.status != "queued":
            self._queue(job.queue).remove(job.id)
            self.moved.add(job.queue)
            return job.evolve(queue_position=None, wait_s=None, announced_position=None)
        return job

    def move_queues_on(self) -> None:
        """Give the jobs behind a departure their new places (events only when worth it)."""
        jobs = self.ledger.jobs
        for name in self.moved:
            for i, job_id in enumerate(self.queues[name]):
                job = self.working.get(job_id) or jobs[job_id]
                if job.queue_position == i + 1:
                    continue
                moved, drafts = with_queue_position(job, i + 1, self._wait(job, i + 1),
                                                    self.now)
                self.emit(moved, drafts)

    def _wait(self, job: Job, position: int) -> float | None:
        """Expected wait from the kind's history and how many of the queue run at once."""
        history = self.ledger.history.get(job.kind, [])
        if not history:
            return None
        if job.queue not in self.running:
            self.running[job.queue] = sum(1 for j in self.ledger.jobs.values()
                                          if j.queue == job.queue and j.status == "running")
        wait = estimate_wait(position, history, max(1, self.running[job.queue]))
        return None if wait is None else round(wait, 1)

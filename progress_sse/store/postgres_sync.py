"""The ledger's state on PostgreSQL: loaded whole, and kept fresh under the head lock.

Several instances write the same jobs. Each keeps the ledger's memory of the active
jobs and queues, as the SQLite writer does, and at the start of every batch, once
it holds the head row's lock, takes in the job rows other instances wrote since its
last batch (`version > synced`): so the rules always run on the rows as committed,
and the idempotent seq, attempt fencing, queue places and pause/resume hold across
instances. A queue's order is `queue_seq`, given to each batch's joiners above every
earlier value (the batch's first event id, plus their place among its joiners).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from ..jobs import Job
from ..ledger import HISTORY, Batch, Ledger
from ..worker_rules import finished_run
from .rows import job_doc, job_from_doc

ACTIVE = ("queued", "running", "paused", "cancelling")


class LedgerSync:
    """The ledger, and the queue order (`queue_seq`) of its queued jobs."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.queue_seq: dict[str, int] = {}  # queued jobs' places, as stored
        self.synced = 0  # the newest batch version whose job rows the ledger holds

    def load(self, head: int, version: int, rows: Sequence[tuple[str, int | None]]) -> None:
        """Everything again from one read: the head, the batch version, the active jobs
        (doc, queue_seq) in queue order."""
        jobs = [job_from_doc(doc) for doc, _ in rows]
        self.ledger.reset(head, jobs)
        self.queue_seq = {job.id: seq or 0 for job, (_, seq) in zip(jobs, rows, strict=True)
                          if job.status == "queued"}
        self.synced = version

    def take_in(self, head: int, version: int, docs: Sequence[str] | None,
                seqs: Sequence[int | None] | None) -> None:
        """Under the lock: the jobs other instances wrote since `synced`, oldest first."""
        ledger = self.ledger
        for doc, seq in zip(docs or (), seqs or (), strict=True):
            job = job_from_doc(doc)
            old = ledger.jobs.get(job.id)
            if old is not None and old.status == "queued":
                self._leave(old)
            if job.finished:
                ledger.jobs.pop(job.id, None)
                self._learn_run(job)
                continue
            ledger.jobs[job.id] = job
            if job.status == "queued":
                self._join(job, seq or 0)
        ledger.next_id = head + 1
        self.synced = version

    def _leave(self, job: Job) -> None:
        queue = self.ledger.queues.get(job.queue)
        if queue is not None and job.id in queue:
            queue.remove(job.id)
        self.queue_seq.pop(job.id, None)

    def _join(self, job: Job, seq: int) -> None:
        queue = self.ledger.queues.setdefault(job.queue, [])
        places = [self.queue_seq.get(j, 0) for j in queue]
        queue.insert(bisect.bisect_right(places, seq), job.id)
        self.queue_seq[job.id] = seq

    def _learn_run(self, job: Job) -> None:
        """Another instance's succeeded run, for the estimates of a kind already learnt."""
        history = self.ledger.history.get(job.kind)
        if history is not None and job.status == "succeeded":
            run = finished_run(job)
            if run is not None:
                history.append(run)
                del history[:-HISTORY]

    def joiners(self, b: Batch) -> dict[str, int]:
        """The queue places of the jobs `b` adds to queues (before the ledger adopts it)."""
        seqs: dict[str, int] = {}
        if not b.events:
            return seqs
        base = b.events[0].id
        for name, queue in b.queues.items():
            before = set(self.ledger.queues.get(name, ()))
            for job_id in queue:
                if job_id not in before:
                    seqs[job_id] = base + len(seqs)
        return seqs

    def adopt(self, b: Batch, version: int, seqs: dict[str, int]) -> None:
        """The batch is committed: the ledger goes on from it."""
        self.ledger.adopt(b)
        self.queue_seq.update(seqs)
        for job_id, job in b.working.items():
            if job.status != "queued":
                self.queue_seq.pop(job_id, None)
        if b.changed:
            self.synced = version


def job_row(job: Job, job_json: str, version: int, queue_seq: int | None) -> tuple[Any, ...]:
    """A job as its row (the document as the SQLite store keeps it)."""
    doc = job_doc(job, job_json)
    return (job.id, job.owner, job.kind, job.queue, job.status, job.created_at,
            job.updated_at, job.finished_at, job.last_post_at, job.heartbeat_timeout_s,
            int(job.stalled), job.token_hash, doc, version, queue_seq)

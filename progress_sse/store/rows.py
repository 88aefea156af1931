"""How the store keeps jobs and events as rows: the statements a commit runs, the rows
a batch of the ledger is stored as, and the document a job is read back from.

A job row has the columns the reads filter and sort on, and the whole job as one JSON
document (its public JSON as streamed, and its private fields); an event row has its
body as streamed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from orjson import Fragment

from ..codec import dumps, loads
from ..jobs import Job
from ..ledger import Batch

Rows = Sequence[Sequence[Any]]

INSERT_EVENTS = ("INSERT INTO events (id, job_id, owner, kind, type, attempt, seq, body)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
# the outbox (notify/outbox.py): a batch's notifications, due at once
INSERT_NOTIFICATIONS = ("INSERT INTO notifications (event_id, job_id, channel, target, body,"
                        " created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
UPSERT_JOBS = (
    "INSERT INTO jobs (id, owner, kind, queue, status, created_at, updated_at,"
    " finished_at, last_post_at, heartbeat_timeout_s, stalled, token_hash, doc)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET status=excluded.status,"
    " updated_at=excluded.updated_at, finished_at=excluded.finished_at,"
    " last_post_at=excluded.last_post_at, stalled=excluded.stalled,"
    " token_hash=excluded.token_hash, doc=excluded.doc")
# a job whose status and finish time stay: no indexed column changes, so no index work
# (measured here: about a fifth of the database's time per progress post)
UPDATE_JOBS = ("UPDATE jobs SET updated_at=?, last_post_at=?, stalled=?, token_hash=?, doc=?"
               " WHERE id=?")


def job_rows(b: Batch, committed: Mapping[str, Job]
             ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The batch's changed jobs as rows for UPSERT_JOBS (whole) and UPDATE_JOBS (status
    and finish unchanged since `committed`: only the columns a post changes)."""
    upserts, updates = [], []
    working = b.working
    for job_id, job_json in b.changed.items():
        before = committed.get(job_id)
        job = working[job_id]
        row = job_row(job, job_json)
        if before is not None and before.status == job.status \
                and before.finished_at == job.finished_at:
            updates.append((job.updated_at, job.last_post_at, int(job.stalled),
                            job.token_hash, row[-1], job_id))
        else:
            upserts.append(row)
    return upserts, updates


def notification_rows(b: Batch) -> list[tuple[Any, ...]]:
    """The batch's outbox rows for INSERT_NOTIFICATIONS (first attempt: at once)."""
    return [(*row, row[-1]) for row in b.notify_rows]


def job_doc(job: Job, job_json: str) -> str:
    """A job as its stored document: its public JSON as answers carry it, and the
    fields only the service sees (both stores keep it so; see job_from_doc)."""
    return dumps({"job": Fragment(job_json), "private": job.private()})


def job_row(job: Job, job_json: str) -> tuple[Any, ...]:
    doc = job_doc(job, job_json)
    return (job.id, job.owner, job.kind, job.queue, job.status, job.created_at, job.updated_at,
            job.finished_at, job.last_post_at, job.heartbeat_timeout_s, int(job.stalled),
            job.token_hash, doc)


def job_from_doc(doc: str) -> Job:
    """A job from its stored document (see job_row)."""
    d = loads(doc)
    return Job.from_record(d["job"], d["private"])

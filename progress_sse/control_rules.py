"""What viewers' requests (cancel, pause, resume) and the service's clocks (stalled
workers, cancels nobody acknowledged, requeues) do to a job.

Pure, like `worker_rules`: the current job and the time in, the new job and its
event drafts out.
"""

from __future__ import annotations

from typing import Any

from .errors import Conflict, JobFinished
from .jobs import Draft, Job, Outcome

# ---------------------------------------------------------------- control


def request_cancel(job: Job, reason: str | None, now: float) -> Outcome:
    """Queued: cancelled at once. Running or paused: `cancelling` until the worker agrees."""
    if job.finished:
        raise JobFinished(f"job {job.id} is already {job.status}")
    if job.status == "cancelling":
        return job, []
    if job.status == "queued" or (job.status == "paused" and job.started_at is None):
        job = job.evolve(status="cancelled", finished_at=now, updated_at=now,
                                  cancel_requested=False, pause_requested=False,
                                  control_reason=reason, eta_s=0.0)
        fields: dict[str, Any] = {"status": "cancelled"}
        if reason:
            fields["reason"] = reason
        return job, [Draft("finished", fields)]
    previous = job.status
    job = job.evolve(status="cancelling", cancel_requested=True, cancel_requested_at=now,
                     control_reason=reason, updated_at=now)
    return job, [Draft("status", {"status": "cancelling", "previous": previous,
                                  "requested": "cancel", "reason": reason})]


FORCED_REASON = "closed by a viewer without the worker's acknowledgement"


def force_cancel(job: Job, reason: str | None, now: float) -> Outcome:
    """'Close anyway': cancelled at once, whatever the worker does or whether it lives.

    The only way out for a viewer when the worker is gone before the cancel times out,
    or will never answer. The worker's later posts are refused as for any finished job.
    """
    if job.finished:
        raise JobFinished(f"job {job.id} is already {job.status}")
    said = FORCED_REASON if not reason else f"{FORCED_REASON}: {reason}"
    return _close_cancelled(job, now, said, {"forced": True})


def cancel_timed_out(job: Job, now: float) -> bool:
    """A cancel nobody will acknowledge: asked longer than the heartbeat timeout ago,
    and the worker has been silent that long too (a worker still posting is alive and
    may be cleaning up; a viewer can still force it)."""
    if job.status != "cancelling":
        return False
    timeout = job.heartbeat_timeout_s
    # documents stored before cancel_requested_at existed: the last change is the cancel
    asked = job.cancel_requested_at if job.cancel_requested_at is not None else job.updated_at
    if now - asked <= timeout:
        return False
    return job.stalled or job.last_post_at is None or now - job.last_post_at > timeout


def expire_cancel(job: Job, now: float) -> Outcome:
    """End a cancel that timed out (see cancel_timed_out) as `cancelled`, saying why."""
    if not cancel_timed_out(job, now):
        return job, []
    said = f"the worker did not answer the cancel within {job.heartbeat_timeout_s:g} s"
    return _close_cancelled(job, now, said, {"timed_out": True})


def _close_cancelled(job: Job, now: float, reason: str, flags: dict[str, Any]) -> Outcome:
    """Cancelled by the service on the worker's behalf: no post of the worker's ends it."""
    previous = job.status
    changes: dict[str, Any] = {
        "status": "cancelled", "finished_at": now, "updated_at": now,
        "cancel_requested": False, "pause_requested": False, "control_reason": reason,
        "eta_s": 0.0, "stalled": False,
    }
    if job.stage is not None and job.stage_started_at is not None:
        times = dict(job.stage_times)
        times[job.stage] = times.get(job.stage, 0.0) + max(0.0, now - job.stage_started_at)
        changes["stage_times"] = times
    job = job.evolve(**changes)
    return job, [Draft("finished", {"status": "cancelled", "reason": reason,
                                    "previous": previous, **flags})]


def request_pause(job: Job, reason: str | None, now: float) -> Outcome:
    """Queued: paused at once. Running: asked; the worker's acknowledgement pauses it."""
    if job.finished:
        raise JobFinished(f"job {job.id} is already {job.status}")
    if job.status == "cancelling":
        raise Conflict(f"job {job.id} is being cancelled")
    if job.pause_requested:
        return job, []
    previous = job.status
    status = "paused" if job.status == "queued" else job.status
    job = job.evolve(status=status, pause_requested=True, control_reason=reason,
                              updated_at=now)
    return job, [Draft("status", {"status": status, "previous": previous,
                                  "requested": "pause", "reason": reason})]


def request_resume(job: Job, reason: str | None, now: float) -> Outcome:
    """Clear a pause; a worker that had paused resumes on its next post."""
    if job.finished:
        raise JobFinished(f"job {job.id} is already {job.status}")
    if not job.pause_requested:
        return job, []
    previous = job.status
    status = "queued" if job.status == "paused" and job.started_at is None else job.status
    job = job.evolve(status=status, pause_requested=False, control_reason=reason,
                              updated_at=now)
    return job, [Draft("status", {"status": status, "previous": previous,
                                  "requested": "resume", "reason": reason})]



def mark_stalled(job: Job, now: float) -> Outcome:
    """A running job whose worker has been silent for its heartbeat timeout."""
    if job.status != "running" or job.stalled or job.last_post_at is None \
            or now - job.last_post_at <= job.heartbeat_timeout_s:
        return job, []
    job = job.evolve(stalled=True, updated_at=now)
    return job, [Draft("status", {"status": job.status, "previous": job.status, "stalled": True,
                                  "silent_s": round(now - (job.last_post_at or now), 3)})]


def requeue(job: Job, reason: str | None, now: float) -> Outcome:
    """Start a new attempt: the old attempt's worker is fenced off from now on."""
    if job.status == "succeeded":
        raise Conflict(f"job {job.id} has succeeded; create a new job instead")
    previous = job.status
    job = job.evolve(
        status="queued", attempt=job.attempt + 1, last_seq=None, progress=0.0,
        current=None, stage=None, stage_progress=None, message=None, result=None, error=None,
        cancel_requested=False, cancel_requested_at=None, pause_requested=False,
        control_reason=reason, stalled=False, started_at=None, finished_at=None,
        final_event_id=None, last_post_at=None, stage_times={}, stage_started_at=None,
        eta_state=None, eta_doc=None, eta_s=None, eta_at=None, paused_s=0.0, paused_at=None,
        updated_at=now)
    return job, [Draft("status", {"status": "queued", "previous": previous,
                                  "attempt": job.attempt, "reason": reason})]

"""Job state machine and progress rules.

Pure: every function takes the current job and the time, and returns the new job
with the event drafts it produced; the store persists both in one transaction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import eta
from .errors import Conflict, InvalidInput, JobFinished, StaleAttempt

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset({"queued", "running", "paused", "cancelling"})


@dataclass(frozen=True)
class Stage:
    key: str
    label: str
    weight: float


# per-request values: slots, not frozen (a frozen dataclass's __init__ measured 10x slower)
@dataclass(slots=True)
class Draft:
    """An event not yet stored: its type and the fields it adds beside the job."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    seq: int | None = None


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    kind: str
    title: str
    queue: str
    status: str
    created_at: float
    updated_at: float
    token_hash: str
    heartbeat_timeout_s: float
    stages: tuple[Stage, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    progress: float = 0.0
    current: float | None = None
    total: float | None = None
    stage: str | None = None
    stage_progress: float | None = None
    message: str | None = None
    data: Any = None
    result: Any = None
    error: str | None = None
    attempt: int = 1
    last_seq: int | None = None
    cancel_requested: bool = False
    cancel_requested_at: float | None = None  # when the pending cancel was asked for
    pause_requested: bool = False
    control_reason: str | None = None
    stalled: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    last_post_at: float | None = None
    final_event_id: int | None = None
    # seconds spent per stage, kept for the estimator's history
    stage_times: dict[str, float] = field(default_factory=dict)
    stage_started_at: float | None = None
    eta_state: eta.EtaState | None = None
    eta_doc: dict[str, Any] | None = None  # eta_state as stored, serialised when it changes
    eta_s: float | None = None  # remaining seconds as estimated at `eta_at`
    eta_at: float | None = None
    queue_position: int | None = None
    wait_s: float | None = None  # queued: the expected wait before it starts
    announced_position: int | None = None  # the queue place viewers last heard of
    # time the worker spent paused, left out of the estimator's clock and of history
    paused_s: float = 0.0
    paused_at: float | None = None  # when the worker acknowledged the current pause

    def evolve(self, **changes: Any) -> Job:
        """A copy with `changes`: a dict copy, far cheaper than dataclasses.replace."""
        new = object.__new__(Job)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def public(self, now: float) -> dict[str, Any]:
        """The job as viewers see it (no token hash, no estimator internals)."""
        end = self.finished_at if self.finished_at is not None else now
        elapsed = round(max(0.0, end - self.started_at), 3) if self.started_at else None
        eta = None
        if self.status == "paused" and self.eta_s is not None:
            eta = round(max(0.0, self.eta_s), 1)  # frozen: no work is being done
        elif self.status == "running" and not self.stalled and self.eta_s is not None:
            eta = round(max(0.0, self.eta_s - (now - (self.eta_at or now))), 1)
        return {
            "id": self.id,
            "kind": self.kind,
            "title": self.title,
            "queue": self.queue,
            "status": self.status,
            "progress": self.progress,
            "current": self.current,
            "total": self.total,
            "stage": self.stage,
            "stage_progress": self.stage_progress,
            "stages": [
                {"key": s.key, "label": s.label, "weight": s.weight} for s in self.stages
            ] if self.stages else [],
            "message": self.message,
            "data": self.data,
            "meta": self.meta,
            "result": self.result,
            "error": self.error,
            "attempt": self.attempt,
            "cancel_requested": self.cancel_requested,
            "pause_requested": self.pause_requested,
            "control_reason": self.control_reason,
            "stalled": self.stalled,
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "queue_position": self.queue_position if self.status == "queued" else None,
            "wait_s": self.wait_s if self.status == "queued" else None,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "final_event_id": self.final_event_id,
            "elapsed_s": elapsed,
            "eta_s": eta,
            # a paused job's finish depends on when it resumes
            "finish_estimate": round(now + eta, 3)
            if eta is not None and self.status == "running" else None,
        }

    def active_s(self, now: float) -> float:
        """Seconds since the start that the worker was not paused: the estimator's clock."""
        if self.started_at is None:
            return 0.0
        paused = self.paused_s + (now - self.paused_at if self.paused_at is not None else 0.0)
        return max(0.0, now - self.started_at - paused)

    def private(self) -> dict[str, Any]:
        """The fields viewers never see; stored beside the public document."""
        d = self.__dict__
        return {name: d[name] for name in _PRIVATE}

    @classmethod
    def from_record(cls, public: dict[str, Any], private: dict[str, Any]) -> Job:
        """Rebuild a job from its stored public document and private fields.

        Private fields added later are missing from older documents: they take the
        dataclass defaults."""
        d = {k: v for k, v in public.items() if k in _FIELDS}
        d.update(private)
        d["stages"] = tuple(Stage(**s) for s in d.get("stages", ()))
        d["eta_state"] = eta.EtaState.from_dict(d["eta_doc"]) if d.get("eta_doc") else None
        return cls(**d)


_FIELDS = frozenset(f.name for f in dataclasses.fields(Job))
_PRIVATE = ("owner", "token_hash", "last_seq", "last_post_at", "stage_times",
            "stage_started_at", "eta_doc", "eta_s", "eta_at", "queue_position", "wait_s",
            "announced_position", "final_event_id", "cancel_requested_at", "paused_s",
            "paused_at")


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class NewJob:
    id: str
    owner: str
    kind: str
    title: str
    queue: str
    stages: tuple[Stage, ...]
    total: float | None
    meta: dict[str, Any]
    heartbeat_timeout_s: float
    token_hash: str


@dataclass(slots=True)
class ProgressUpdate:
    progress: float | None = None
    current: float | None = None
    total: float | None = None
    stage: str | None = None
    message: str | None = None
    data: Any = None
    paused: bool | None = None  # a worker acknowledging a pause (True) or a resume (False)
    seq: int | None = None
    attempt: int | None = None


@dataclass(slots=True)
class LogLine:
    level: str
    message: str
    seq: int | None = None
    attempt: int | None = None


@dataclass(slots=True)
class Finish:
    status: str
    result: Any = None
    error: str | None = None
    seq: int | None = None
    attempt: int | None = None


# ---------------------------------------------------------------- transitions

Outcome = tuple[Job, list[Draft]]


def create_job(spec: NewJob, now: float) -> Outcome:
    job = Job(
        id=spec.id,
        owner=spec.owner,
        kind=spec.kind,
        title=spec.title,
        queue=spec.queue,
        status="queued",
        created_at=now,
        updated_at=now,
        token_hash=spec.token_hash,
        heartbeat_timeout_s=spec.heartbeat_timeout_s,
        stages=spec.stages,
        meta=spec.meta,
        total=spec.total,
    )
    return job, [Draft("created")]


def check_worker(job: Job, attempt: int | None) -> None:
    """Refuse posts to finished jobs and from workers of another attempt."""
    if job.finished:
        raise JobFinished(f"job {job.id} is {job.status}; it takes no more posts")
    if attempt is not None and attempt != job.attempt:
        if attempt < job.attempt:
            raise StaleAttempt(
                f"attempt {attempt} was superseded by attempt {job.attempt}", field="attempt"
            )
        raise Conflict(f"attempt {attempt} has not been started", field="attempt")


def check_seq(job: Job, seq: int | None) -> bool:
    """True when `seq` repeats an earlier post (the caller answers with the stored event)."""
    return seq is not None and job.last_seq is not None and seq <= job.last_seq


def _touch(job: Job, now: float, seq: int | None) -> tuple[Job, list[Draft]]:
    """A worker spoke: start a queued job, clear a stall, note the time."""
    changes, drafts = _touch_changes(job, now, seq)
    return job.evolve(**changes), drafts


def _touch_changes(job: Job, now: float, seq: int | None) -> tuple[dict[str, Any], list[Draft]]:
    drafts: list[Draft] = []
    changes: dict[str, Any] = {"updated_at": now, "last_post_at": now}
    if seq is not None:
        changes["last_seq"] = seq
    if job.status == "queued":
        changes.update(status="running", started_at=now, stage_started_at=now)
    if job.stalled:
        changes["stalled"] = False
        drafts.append(Draft("status", {"status": job.status, "previous": job.status,
                                       "stalled": False}))
    return changes, drafts


def stage_fraction(job: Job) -> tuple[float, int] | None:
    """(weight done before the current stage, index of the current stage), or None."""
    if not job.stages or job.stage is None:
        return None
    done = 0.0
    for i, s in enumerate(job.stages):
        if s.key == job.stage:
            return done, i
        done += s.weight
    return None


def overall_progress(stages: tuple[Stage, ...], stage: str | None, fraction: float) -> float:
    """Finished stages' weight plus the current stage's fraction of its own, as 0-100."""
    total = sum(s.weight for s in stages)
    if not stages or stage is None or total <= 0:
        return max(0.0, min(100.0, fraction * 100.0))
    done = 0.0
    for s in stages:
        if s.key == stage:
            return round(min(100.0, (done + s.weight * fraction) * 100.0 / total), 6)
        done += s.weight
    raise InvalidInput(f"unknown stage {stage!r}", field="stage")


def record_progress(job: Job, upd: ProgressUpdate, now: float) -> Outcome:
    check_worker(job, upd.attempt)
    # one copy of the job for the whole post: what the touch changes (times, a start,
    # a stall cleared) is none of what the rules below read
    changes, drafts = _touch_changes(job, now, upd.seq)
    stage = job.stage
    stage_changed = upd.stage is not None and upd.stage != job.stage
    if upd.stage is not None:
        if job.stages and upd.stage not in {s.key for s in job.stages}:
            raise InvalidInput(f"unknown stage {upd.stage!r}; the job declared "
                               f"{[s.key for s in job.stages]}", field="stage")
        stage = upd.stage
    total = upd.total if upd.total is not None else job.total
    current = upd.current if upd.current is not None else (None if stage_changed else job.current)
    if current is not None and total is not None and current > total:
        raise InvalidInput(f"current ({current}) is greater than total ({total})", field="current")

    # the fraction this post reports: of the current stage for staged jobs, else of the job
    fraction: float | None = None
    if upd.progress is not None:
        fraction = upd.progress / 100.0
    elif upd.current is not None and total:
        fraction = upd.current / total
    elif stage_changed:
        fraction = 0.0

    changes["total"] = total
    changes["current"] = current
    held = False
    if fraction is not None:
        if job.stages:
            if stage is None:
                raise InvalidInput("this job has stages: name the stage the progress is for",
                                   field="stage")
            computed = overall_progress(job.stages, stage, fraction)
            changes["stage_progress"] = round(fraction * 100.0, 6)
        else:
            computed = round(fraction * 100.0, 6)
        if computed < job.progress:
            held = True
        else:
            changes["progress"] = computed
    if stage_changed:
        changes["stage"] = stage
        if job.stage is not None and job.stage_started_at is not None:
            times = dict(job.stage_times)
            times[job.stage] = times.get(job.stage, 0.0) + (now - job.stage_started_at)
            changes["stage_times"] = times
        changes["stage_started_at"] = now
        if fraction is None:
            changes["stage_progress"] = 0.0
    if upd.message is not None:
        changes["message"] = upd.message
    if upd.data is not None:
        changes["data"] = upd.data
    job = job.evolve(**changes)

    if upd.paused is True and job.pause_requested and job.status == "running":
        job = job.evolve(status="paused", **_pause_clock(job, now))
        drafts.append(Draft("status", {"status": "paused", "previous": "running"}))
    elif job.status == "paused" and not job.pause_requested:
        job = job.evolve(status="running", **_resume_clock(job, now))
        drafts.append(Draft("status", {"status": "running", "previous": "paused"}))

    fields: dict[str, Any] = {"held": held}
    if upd.message is not None:
        fields["message"] = upd.message
    if stage_changed:
        fields["stage"] = stage
    drafts.append(Draft("progress", fields, seq=upd.seq))
    return job, drafts


def _pause_clock(job: Job, now: float) -> dict[str, Any]:
    """The worker stopped: freeze the remaining time where it stands and start
    counting paused time, which the rate and the history must not see."""
    changes: dict[str, Any] = {"paused_at": now}
    if job.eta_s is not None:
        changes.update(eta_s=round(max(0.0, job.eta_s - (now - (job.eta_at or now))), 1),
                       eta_at=now)
    return changes


def _resume_clock(job: Job, now: float) -> dict[str, Any]:
    """The worker goes on: bank the pause, and refresh the estimate at once (eta_at
    None) from the frozen one rather than count the pause down from it."""
    if job.paused_at is None:  # paused before it started, or stored by an older version
        return {}
    pause = max(0.0, now - job.paused_at)
    changes: dict[str, Any] = {"paused_s": job.paused_s + pause, "paused_at": None,
                               "eta_at": None}
    if job.stage_started_at is not None:  # stage times are history: working time only
        changes["stage_started_at"] = job.stage_started_at + pause
    return changes


def record_log(job: Job, line: LogLine, now: float) -> Outcome:
    check_worker(job, line.attempt)
    job, drafts = _touch(job, now, line.seq)
    drafts.append(Draft("log", {"level": line.level, "message": line.message}, seq=line.seq))
    return job, drafts


def finish(job: Job, fin: Finish, now: float) -> Outcome:
    check_worker(job, fin.attempt)
    job, drafts = _touch(job, now, fin.seq)
    changes: dict[str, Any] = {
        "status": fin.status,
        "finished_at": now,
        "result": fin.result,
        "error": fin.error,
        "cancel_requested": False,
        "pause_requested": False,
        "eta_s": 0.0,
    }
    if fin.status == "succeeded":
        changes["progress"] = 100.0
        if job.stages:
            changes["stage_progress"] = 100.0
    if job.stage is not None and job.stage_started_at is not None:
        times = dict(job.stage_times)
        paused = now - job.paused_at if job.paused_at is not None else 0.0
        times[job.stage] = times.get(job.stage, 0.0) + max(0.0, now - job.stage_started_at
                                                            - paused)
        changes["stage_times"] = times
    job = job.evolve(**changes)
    fields: dict[str, Any] = {"status": fin.status}
    if fin.result is not None:
        fields["result"] = fin.result
    if fin.error is not None:
        fields["error"] = fin.error
    drafts.append(Draft("finished", fields, seq=fin.seq))
    return job, drafts


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


def heartbeat(job: Job, attempt: int | None, now: float) -> Outcome:
    """The worker is alive: note it; an event only when it clears a stall."""
    check_worker(job, attempt)
    if job.status == "queued":
        job, drafts = _touch(job, now, None)
        return job, [*drafts, Draft("status", {"status": "running", "previous": "queued"})]
    if job.stalled:
        return _touch(job, now, None)
    return job.evolve(last_post_at=now), []


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


# ---------------------------------------------------------------- estimates


def with_estimate(job: Job, now: float, history: list[eta.FinishedRun],
                  every_s: float = 1.0) -> Job:
    """Fold the job's latest state into its estimator and refresh the estimate.

    At most once every `every_s` per job: the estimate is a finish time, and between
    refreshes the remaining time shown simply counts down to it. Only a running
    job has one; a paused or cancelling job's clock would mislead. The clock is the
    worker's working time: a pause is no slowness, and counting it would overshoot.
    """
    if job.status == "paused":
        return job  # frozen where the pause found it (see _pause_clock)
    if job.status != "running" or job.started_at is None:
        return job if job.eta_s is None or job.finished else job.evolve(eta_s=None, eta_at=None)
    if job.eta_at is not None and now - job.eta_at < every_s:
        return job
    elapsed = job.active_s(now)
    fraction = job.progress / 100.0
    state = eta.observe(job.eta_state or eta.new_state(), elapsed_s=elapsed, fraction=fraction,
                        stage=job.stage)
    remaining = eta.estimate(
        state, elapsed_s=elapsed, fraction=fraction, stage=job.stage,
        stages=[eta.StageSpec(s.key, s.weight) for s in job.stages], total=job.total,
        history=history)
    return job.evolve(eta_state=state, eta_doc=state.to_dict(), eta_at=now,
                      eta_s=None if remaining is None else round(remaining, 1))


def finished_run(job: Job) -> eta.FinishedRun | None:
    """A succeeded job as history for the estimator."""
    if job.status != "succeeded" or job.started_at is None or job.finished_at is None:
        return None
    return eta.FinishedRun(duration_s=job.active_s(job.finished_at), total=job.total,
                           stage_durations=dict(job.stage_times))


def with_queue_position(job: Job, position: int, wait_s: float | None, now: float
                        ) -> tuple[Job, list[Draft]]:
    """Record a queued job's place; tell viewers only when it is worth an event.

    Announcing every move to every job behind would cost one event per queued job
    per start. Viewers hear of it at the front (the last five places), when it
    moves back, and further back each time the place has halved since they last
    heard. The job row always holds the true place, for snapshots and polling.
    """
    last = job.announced_position
    job = job.evolve(queue_position=position, wait_s=wait_s)
    if last is None:
        return job.evolve(announced_position=position), []
    if position != last and (position <= 5 or position <= last / 2 or position > last):
        job = job.evolve(announced_position=position, updated_at=now)
        return job, [Draft("status", {"status": "queued", "previous": "queued",
                                      "queue_position": position, "wait_s": wait_s})]
    return job, []

"""What a worker's posts do to a job: create, progress, log, finish, heartbeat, and
the estimates and queue places the ledger refreshes.

Pure: every function takes the current job and the time, and returns the new job
with the event drafts it produced (an `Outcome`); the store persists both in one
transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import eta
from .errors import Conflict, InvalidInput, JobFinished, StaleAttempt
from .jobs import Draft, Job, Outcome, Stage

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
    webhook: str | None = None
    webhook_events: tuple[str, ...] = ("finished",)
    notify_email: tuple[str, ...] = ()


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
        webhook=spec.webhook,
        webhook_events=spec.webhook_events,
        notify_email=spec.notify_email,
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


def touch(job: Job, now: float, seq: int | None) -> tuple[Job, list[Draft]]:
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
        job = job.evolve(status="paused", **pause_clock(job, now))
        drafts.append(Draft("status", {"status": "paused", "previous": "running"}))
    elif job.status == "paused" and not job.pause_requested:
        job = job.evolve(status="running", **resume_clock(job, now))
        drafts.append(Draft("status", {"status": "running", "previous": "paused"}))

    fields: dict[str, Any] = {"held": held}
    if upd.message is not None:
        fields["message"] = upd.message
    if stage_changed:
        fields["stage"] = stage
    drafts.append(Draft("progress", fields, seq=upd.seq))
    return job, drafts


def pause_clock(job: Job, now: float) -> dict[str, Any]:
    """The worker stopped: freeze the remaining time where it stands and start
    counting paused time, which the rate and the history must not see."""
    changes: dict[str, Any] = {"paused_at": now}
    if job.eta_s is not None:
        changes.update(eta_s=round(max(0.0, job.eta_s - (now - (job.eta_at or now))), 1),
                       eta_at=now)
    return changes


def resume_clock(job: Job, now: float) -> dict[str, Any]:
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
    job, drafts = touch(job, now, line.seq)
    drafts.append(Draft("log", {"level": line.level, "message": line.message}, seq=line.seq))
    return job, drafts


def finish(job: Job, fin: Finish, now: float) -> Outcome:
    check_worker(job, fin.attempt)
    job, drafts = touch(job, now, fin.seq)
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


def heartbeat(job: Job, attempt: int | None, now: float) -> Outcome:
    """The worker is alive: note it; an event only when it clears a stall."""
    check_worker(job, attempt)
    if job.status == "queued":
        job, drafts = touch(job, now, None)
        return job, [*drafts, Draft("status", {"status": "running", "previous": "queued"})]
    if job.stalled:
        return touch(job, now, None)
    return job.evolve(last_post_at=now), []



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
        return job  # frozen where the pause found it (see pause_clock)
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

"""A job as stored and shown: its fields, its stages, its public JSON, and the drafts
of events a rule produces. The rules themselves are in `worker_rules` (what workers'
posts do) and `control_rules` (what viewers' requests and the service's clocks do)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import eta

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
    # completion notifications asked for at create (notify/): private, as a URL or an
    # address is no viewer's business
    webhook: str | None = None
    webhook_events: tuple[str, ...] = ("finished",)
    notify_email: tuple[str, ...] = ()

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
        for name in ("webhook_events", "notify_email"):  # JSON lists
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)


_FIELDS = frozenset(f.name for f in dataclasses.fields(Job))
_PRIVATE = ("owner", "token_hash", "last_seq", "last_post_at", "stage_times",
            "stage_started_at", "eta_doc", "eta_s", "eta_at", "queue_position", "wait_s",
            "announced_position", "final_event_id", "cancel_requested_at", "paused_s",
            "paused_at", "webhook", "webhook_events", "notify_email")


# a rule's result: the job as changed, and the events it produced
Outcome = tuple[Job, list[Draft]]

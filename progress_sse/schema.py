"""The HTTP API's bodies, declared once: what the service reads and what it answers.

Request models validate every body the service reads (`inputs.parse` picks strict
for JSON, lax for form fields, where every value is text); `openapi` builds
/openapi.json from these models, so the description states exactly the bounds that
are enforced. The answer models describe what the service writes: it still builds
answers with orjson (they are on every post), and tests/test_schema_answers.py holds
real answers to these models so the two cannot drift.

The limits are named once here; the SDK imports the ones it must respect.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    field_validator,
)

from .codec import dumps
from .notify.origins import origin

MAX_NAME = 64  # ids, kinds, queues, stage keys
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
# text fields: no control characters but tab, newline and carriage return
TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f]*$"
MAX_NUMBER = 1e15  # counts and totals: exact in a float, and in JavaScript
MAX_SEQ = 10**15  # the SDK's clock-based seq stays under it until the year 2286
MAX_ATTEMPT = 2**31
MAX_STAGES = 64
MAX_WEIGHT = 1e6
MAX_MESSAGE = 2000  # a progress message
MAX_TEXT = 8000  # a log line, a finish's error
MAX_REASON = 500
MAX_DOC_BYTES = 16 * 1024  # `data`, `meta`, `result` each, as serialised JSON characters
MAX_DEPTH = 8
MAX_URL = 2000  # a job's webhook
MAX_ADDRESS = 254  # a mail address (RFC 5321's path limit)
MAX_EMAILS = 10  # addresses in a job's notify_email
# query strings
MAX_PAGE = 500  # jobs in a page
MAX_HISTORY = 1000  # events in a page of history
MAX_CURSOR = 2**62  # an event id or a page cursor
MAX_JOB_FILTERS = 100  # ?job= on the all-jobs stream
# the document bounds, stated in the description as extension keywords (no JSON Schema
# keyword says either), so tests/test_schema_bounds.py checks them with the others
DOC_BYTES_KEY = "x-maxJsonLength"
DOC_DEPTH_KEY = "x-maxDepth"

STATUSES = ("queued", "running", "paused", "cancelling", "succeeded", "failed", "cancelled")
LogLevel = Literal["debug", "info", "warning", "error"]
FinishStatus = Literal["succeeded", "failed", "cancelled"]
Status = Literal["queued", "running", "paused", "cancelling", "succeeded", "failed",
                 "cancelled"]


Name = Annotated[str, StringConstraints(max_length=MAX_NAME, pattern=NAME_PATTERN)]
Label = Annotated[str, StringConstraints(max_length=100, pattern=TEXT_PATTERN)]
Title = Annotated[str, StringConstraints(max_length=200, pattern=TEXT_PATTERN)]
Message = Annotated[str, StringConstraints(max_length=MAX_MESSAGE, pattern=TEXT_PATTERN)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT, pattern=TEXT_PATTERN)]
Reason = Annotated[str, StringConstraints(max_length=MAX_REASON, pattern=TEXT_PATTERN)]
_NAME_RE = re.compile(NAME_PATTERN)


def is_name(text: str) -> bool:
    """`text` is a valid Name (for names read outside a body: query filters)."""
    return len(text) <= MAX_NAME and _NAME_RE.fullmatch(text) is not None
Amount = Annotated[float, Field(ge=0, le=MAX_NUMBER)]
Seq = Annotated[int, Field(ge=0, le=MAX_SEQ,
                           description="Increasing per job; a repeat answers the stored event.")]
Attempt = Annotated[int, Field(ge=1, le=MAX_ATTEMPT,
                               description="The worker's attempt; an older one is refused "
                                           "(409).")]


def check_document(value: Any) -> Any:
    """A free JSON value: bounded in depth and size, and only numbers any peer reads back."""
    if _depth(value) > MAX_DEPTH:
        raise ValueError(f"is nested deeper than {MAX_DEPTH} levels")
    problem = _bad_number(value)
    if problem is not None:
        raise ValueError(f"holds {problem}")
    if len(dumps(value)) > MAX_DOC_BYTES:
        raise ValueError(f"is larger than {MAX_DOC_BYTES} bytes")
    return value


def _bad_number(value: Any) -> str | None:
    """A number no JSON peer can read back: NaN or an infinity (`1e999` parses as one),
    or an integer beyond 64 bits (JavaScript already rounds past 2**53; send such ids as
    text)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else "a number too large to represent"
    if isinstance(value, int) and not isinstance(value, bool):
        return None if -(2**63) <= value < 2**64 else "an integer beyond 64 bits"
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return None
    for item in value:
        problem = _bad_number(item)
        if problem is not None:
            return problem
    return None


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


_DOC_BOUNDS = {"description": f"Any JSON value: at most {MAX_DOC_BYTES} characters "
                              f"serialised, {MAX_DEPTH} levels deep.",
               DOC_BYTES_KEY: MAX_DOC_BYTES, DOC_DEPTH_KEY: MAX_DEPTH}
Document = Annotated[Any, AfterValidator(check_document), WithJsonSchema(_DOC_BOUNDS)]
Mapping = Annotated[dict[str, Any], AfterValidator(check_document),
                    Field(json_schema_extra=_DOC_BOUNDS)]


def _url(value: str) -> str:
    if origin(value) is None:
        raise ValueError("is not an http(s) URL such as https://hooks.example.com/progress")
    return value


def _address(value: str) -> str:
    from .notify.email import check_address  # not at import: the SDK reads this module

    return check_address(value)


# the URL's origin must also be in WEBHOOK_ORIGINS (api.create_job: the settings')
WebhookUrl = Annotated[str, StringConstraints(max_length=MAX_URL), AfterValidator(_url),
                       Field(json_schema_extra={"format": "uri"})]
Address = Annotated[str, StringConstraints(max_length=MAX_ADDRESS), AfterValidator(_address),
                    Field(json_schema_extra={"format": "email"})]
NotifyEvent = Literal["finished", "stalled"]


def _one_or_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Addresses = Annotated[list[Address], Field(max_length=MAX_EMAILS)]
# one address or a list of them; always a list once read
NotifyEmail = Annotated[Addresses, BeforeValidator(_one_or_list,
                                                   json_schema_input_type=Address | Addresses)]


class Body(BaseModel):
    """A request body: no unknown field, no NaN or infinity in a number field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------- requests


class StageSpec(Body):
    key: Name
    label: Label | None = None
    weight: Annotated[float, Field(gt=0, le=MAX_WEIGHT)] | None = None


def _stage_key(value: Any) -> Any:
    return {"key": value} if isinstance(value, str) else value


Stage = Annotated[StageSpec, BeforeValidator(_stage_key, json_schema_input_type=Name | StageSpec)]


class CreateJob(Body):
    id: Name | None = Field(None, description="Client id for an idempotent create.")
    kind: Name | None = None
    title: Title | None = None
    queue: Name | None = None
    stages: Annotated[list[Stage], Field(max_length=MAX_STAGES)] | None = None
    total: Amount | None = None
    meta: Mapping | None = None
    heartbeat_timeout_s: Annotated[float, Field(ge=1, le=86400)] | None = None
    webhook: WebhookUrl | None = Field(
        None, description="POST the job's finish here (Standard Webhooks); its origin must "
                          "be listed in WEBHOOK_ORIGINS.")
    webhook_events: Annotated[list[NotifyEvent], Field(max_length=2)] | None = Field(
        None, description="What `webhook` is told of: finished (the default), stalled.")
    notify_email: NotifyEmail | None = Field(
        None, description="Mail the finish to this address (or these); needs SMTP.")

    @field_validator("stages")
    @classmethod
    def _unique_keys(cls, stages: list[StageSpec] | None) -> list[StageSpec] | None:
        if stages is not None and len({s.key for s in stages}) != len(stages):
            raise ValueError("keys must be unique")
        return stages


class Progress(Body):
    progress: Annotated[float, Field(ge=0, le=100)] | None = None
    current: Amount | None = None
    total: Annotated[float, Field(gt=0, le=MAX_NUMBER)] | None = None
    stage: Name | None = None
    message: Message | None = None
    data: Document = None
    paused: bool | None = Field(None, description="A worker acknowledging a pause (true) "
                                                  "or a resume (false).")
    seq: Seq | None = None
    attempt: Attempt | None = None


class Log(Body):
    level: LogLevel | None = None
    message: Text
    seq: Seq | None = None
    attempt: Attempt | None = None


class Finish(Body):
    status: FinishStatus
    result: Document = None
    error: Text | None = None
    seq: Seq | None = None
    attempt: Attempt | None = None


class Heartbeat(Body):
    attempt: Attempt | None = None


class ControlRequest(Body):
    """A viewer's pause, resume or requeue."""

    reason: Reason | None = None


class CancelRequest(ControlRequest):
    force: bool | None = Field(None, description="Close the job as cancelled at once, "
                                                 "without its worker's acknowledgement (200).")


class TokenRotation(Body):
    """The worker-token rotation reads no field."""


# ---------------------------------------------------------------- answers


class Answer(BaseModel):
    """An answer's shape, for the description and the tests; the service writes it
    with orjson. Unknown keys are refused, so a key added to an answer fails the tests
    until it is declared here."""

    model_config = ConfigDict(extra="forbid")


class Notification(Answer):
    """A notification of the job (notify/outbox.py), as its outbox row stands."""

    channel: Literal["service_webhook", "webhook", "email"]
    event_id: int
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_error: str | None
    next_attempt_at: float | None = Field(description="When it is tried next (pending).")


class StageAnswer(Answer):
    key: str
    label: str
    weight: float


class Job(Answer):
    id: str
    kind: str
    title: str
    queue: str
    status: Status
    progress: Annotated[float, Field(ge=0, le=100)]
    current: float | None
    total: float | None
    stage: str | None
    stage_progress: float | None
    stages: list[StageAnswer]
    message: str | None
    data: Any
    meta: dict[str, Any]
    result: Any
    error: str | None
    attempt: int
    cancel_requested: bool
    pause_requested: bool
    control_reason: str | None
    stalled: bool
    heartbeat_timeout_s: float
    queue_position: int | None
    wait_s: float | None
    created_at: float
    started_at: float | None
    updated_at: float
    finished_at: float | None
    final_event_id: int | None
    elapsed_s: float | None
    eta_s: float | None
    finish_estimate: float | None


class Control(Answer):
    cancel_requested: bool
    pause_requested: bool
    reason: str | None
    status: Status
    attempt: int


class Event(Answer):
    """An event: these fields, the fields its type adds (`held`, `level`, `message`,
    `status`, `previous`, ...), and the whole job after it."""

    model_config = ConfigDict(extra="allow")
    id: int
    job_id: str
    type: Literal["created", "progress", "log", "status", "finished"]
    ts: str
    job: Job


class WorkerAnswer(Answer):
    """A worker post's (and a control request's) acknowledgement."""

    event_id: int | None
    duplicate: bool
    job: Job
    control: Control


class Created(Answer):
    job: Job
    event_id: int
    worker_token: str
    created: Literal[True]


class Existing(Answer):
    """A create of an id that already existed (idempotent create)."""

    job: Job
    created: Literal[False]


class JobPage(Answer):
    jobs: list[Job]
    head: int
    next: int | None = Field(description="The `before` of the next page, if any.")


class JobState(Answer):
    job: Job
    control: Control
    notifications: list[Notification]


class EventPage(Answer):
    events: list[Event]
    head: int
    # `after` was older than the horizon: the page starts after it, at what is kept
    horizon: int | None = None


class ControlState(Answer):
    control: Control


class TokenRotated(Answer):
    job_id: str
    worker_token: str


class RetentionState(Answer):
    """What the log keeps, as pruning last saw it (`/healthz?verbose`)."""

    horizon: int  # every event after it is kept; a resume from before it is reset
    oldest_event: int | None
    events_pruned: int  # by this instance, since it started
    events_compacted: int
    jobs_pruned: int


class Healthy(Answer):
    status: Literal["ok"]
    head: int
    streams: int
    retention: RetentionState | None = None  # with ?verbose


class Unhealthy(Answer):
    status: Literal["unavailable"]
    reason: str


class ErrorDetail(Answer):
    code: str
    message: str
    field: str | None = None


class Error(Answer):
    error: ErrorDetail


REQUESTS: tuple[type[Body], ...] = (CreateJob, Progress, Log, Finish, Heartbeat,
                                    ControlRequest, CancelRequest, TokenRotation)
ANSWERS: tuple[type[Answer], ...] = (Notification, Job, Control, Event, WorkerAnswer, Created,
                                     Existing,
                                     JobPage, JobState, EventPage, ControlState, TokenRotated,
                                     Healthy, Unhealthy, Error)

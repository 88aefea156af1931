"""Thin JSON endpoints: parse, apply the job rules through the store, answer."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import inputs, jobs, streams
from .auth import CREATE, READ, new_worker_token, require, worker_pass
from .codec import dumps
from .context import Context
from .errors import Conflict, InvalidInput, Unavailable
from .headers import header
from .jobs import Job, Outcome
from .metrics import CONTENT_TYPE
from .store import Filter, Write, WriteResult

NAME = inputs.ID_RE
CREATE_FIELDS = frozenset({"id", "kind", "title", "queue", "stages", "total", "meta",
                           "heartbeat_timeout_s"})
PROGRESS_FIELDS = frozenset({"progress", "current", "total", "stage", "message", "data",
                             "paused", "seq", "attempt"})
LOG_FIELDS = frozenset({"level", "message", "seq", "attempt"})
FINISH_FIELDS = frozenset({"status", "result", "error", "seq", "attempt"})


def json_response(body: str, status: int = 200) -> Response:
    """A JSON answer ending in a newline, so a shell prompt after `curl` starts on its own line."""
    return Response(body + "\n", status_code=status, media_type="application/json")


def ctx_of(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


# ---------------------------------------------------------------- producers


async def create_job(request: Request) -> Response:
    ctx = ctx_of(request)
    who = require(request, CREATE)
    body = await inputs.read_body(request, ctx.settings.max_body_bytes)
    inputs.unknown_fields(body, CREATE_FIELDS)
    job_id = inputs.text(body, "id", max_len=64, pattern=NAME) or f"j_{secrets.token_hex(8)}"
    token, token_hash = new_worker_token()
    spec = jobs.NewJob(
        id=job_id,
        owner=who.subject,
        kind=inputs.text(body, "kind", max_len=64, pattern=NAME, default="job") or "job",
        title=inputs.text(body, "title", max_len=200, default="") or "",
        queue=inputs.text(body, "queue", max_len=64, pattern=NAME, default="default")
        or "default",
        stages=_stages(body.get("stages")),
        total=inputs.number(body, "total", low=0),
        meta=inputs.document(body, "meta", mapping=True) or {},
        heartbeat_timeout_s=inputs.number(body, "heartbeat_timeout_s", low=1, high=86400)
        or ctx.settings.heartbeat_timeout_s,
        token_hash=token_hash,
    )

    def apply(job: Job | None, now: float) -> Outcome:
        return jobs.create_job(spec, now)

    result = await ctx.store.submit(Write(job_id, apply, create=True))
    if not result.created:
        if result.job.owner != who.subject:
            raise Conflict(f"id {job_id!r} is taken", field="id")
        return json_response(f'{{"job":{result.job_json},"created":false}}', 200)
    return json_response(
        f'{{"job":{result.job_json},"event_id":{result.events[0].id},'
        f'"worker_token":{dumps(token)},"created":true}}', 201)


def _stages(raw: Any) -> tuple[jobs.Stage, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidInput("stages must be a list of {key, label, weight}", field="stages")
    if len(raw) > inputs.MAX_STAGES:
        raise InvalidInput(f"at most {inputs.MAX_STAGES} stages", field="stages")
    out: list[jobs.Stage] = []
    for i, item in enumerate(raw):
        where = f"stages[{i}]"
        if isinstance(item, str):
            item = {"key": item}
        if not isinstance(item, dict):
            raise InvalidInput(f"{where} must be an object", field=where)
        extra = set(item) - {"key", "label", "weight"}
        if extra:
            raise InvalidInput(f"{where} has unknown field {sorted(extra)[0]!r}", field=where)
        key = inputs.text(item, "key", max_len=64, required=True, pattern=NAME)
        label = inputs.text(item, "label", max_len=100) or key
        weight = inputs.number(item, "weight", low=0, high=1e6)
        if weight is not None and weight <= 0:
            raise InvalidInput(f"{where}.weight must be greater than 0", field=f"{where}.weight")
        assert key is not None and label is not None
        out.append(jobs.Stage(key, label, weight if weight is not None else 1.0))
    if len({s.key for s in out}) != len(out):
        raise InvalidInput("stage keys must be unique", field="stages")
    return tuple(out)


# ---------------------------------------------------------------- viewers


async def list_jobs(request: Request) -> Response:
    ctx = ctx_of(request)
    who = require(request, READ)
    q = request.query_params
    statuses = frozenset(s for v in q.getlist("status") for s in v.split(",") if s)
    unknown = statuses - jobs.TERMINAL - jobs.ACTIVE
    if unknown:
        raise InvalidInput(f"unknown status {sorted(unknown)[0]!r}", field="status")
    kinds = frozenset(q.getlist("kind")) or None
    limit = inputs.query_int(request, "limit", default=100, low=1, high=500)
    before = inputs.query_int(request, "before", default=0, low=0, high=2**62) or None
    flt = Filter(owner=who.owner_filter, kinds=kinds, statuses=statuses)
    found, head, cursor = await ctx.store.list_jobs(flt, limit, before)
    now = time.time()
    items = ",".join(dumps(j.public(now)) for j in found)
    return json_response(f'{{"jobs":[{items}],"head":{head},"next":{dumps(cursor)}}}')


async def get_job(request: Request) -> Response:
    ctx = ctx_of(request)
    job = await streams.visible_job(ctx, request.path_params["job_id"],
                                    require(request, READ).owner_filter)
    return json_response(f'{{"job":{dumps(job.public(time.time()))},'
                         f'"control":{control_json(job)}}}')


async def job_events(request: Request) -> Response:
    """SSE for EventSource and curl; JSON history for anything else."""
    ctx = ctx_of(request)
    who = require(request, READ)
    job = await streams.visible_job(ctx, request.path_params["job_id"], who.owner_filter)
    flt = Filter(owner=who.owner_filter, job_ids=frozenset({job.id}))
    if "text/event-stream" in (header(request.scope, b"accept") or ""):
        return await streams.job_stream(request, ctx, job, flt)
    after = inputs.query_int(request, "after", default=0, low=0, high=2**62)
    limit = inputs.query_int(request, "limit", default=100, low=1, high=1000)
    head = ctx.hub.head
    events = (await ctx.store.events_after(after, head, flt, limit)).events
    return json_response(f'{{"events":[{",".join(e.body for e in events)}],"head":{head}}}')


async def all_events(request: Request) -> Response:
    ctx = ctx_of(request)
    who = require(request, READ)
    q = request.query_params
    job_ids = frozenset(q.getlist("job")) or None
    kinds = frozenset(q.getlist("kind")) or None
    for name, values in (("job", job_ids), ("kind", kinds)):
        for v in values or ():
            if not NAME.match(v):
                raise InvalidInput(f"{name} filter {v[:40]!r} is not a valid name", field=name)
    if job_ids is not None and len(job_ids) > 100:
        raise InvalidInput("at most 100 job filters", field="job")
    flt = Filter(owner=who.owner_filter, job_ids=job_ids, kinds=kinds)
    spec = streams.StreamSpec(flt=flt, cursor=streams.parse_last_event_id(request))
    return streams.open_stream(request, ctx, spec)


# ---------------------------------------------------------------- workers


async def worker_write(request: Request, allowed: frozenset[str],
                        rule: Callable[[dict[str, Any]], tuple[Callable[[Job, float], Outcome],
                                                               int | None, int | None]]
                        ) -> Response:
    ctx = ctx_of(request)
    job_id = request.path_params["job_id"]
    credential = worker_pass(request)
    body = await inputs.read_body(request, ctx.settings.max_body_bytes)
    inputs.unknown_fields(body, allowed)
    step, seq, attempt = rule(body)

    def check(job: Job | None) -> Job:
        return credential.check(job, job_id)

    def apply(job: Job | None, now: float) -> Outcome:
        return step(check(job), now)

    # `check` runs in the writer before anything else, a repeated seq's answer included
    write = Write(job_id, apply, seq=seq, attempt=attempt, check=check)
    return worker_answer(await ctx.store.submit(write))


def worker_answer(result: WriteResult) -> Response:
    """The stored event's id, the job, and the control state the worker must obey."""
    event_id = result.events[-1].id if result.events else None
    return json_response(
        f'{{"event_id":{dumps(event_id)},"duplicate":{_JSON_BOOL[result.duplicate]},'
        f'"job":{result.job_json},"control":{control_json(result.job)}}}')


_JSON_BOOL = {True: "true", False: "false"}


def control_json(job: Job) -> str:
    """The control state as JSON, built directly: it is on every worker response."""
    reason = "null" if job.control_reason is None else dumps(job.control_reason)
    return (f'{{"cancel_requested":{_JSON_BOOL[job.cancel_requested]},'
            f'"pause_requested":{_JSON_BOOL[job.pause_requested]},"reason":{reason},'
            f'"status":"{job.status}","attempt":{job.attempt}}}')


def _idempotency(body: dict[str, Any]) -> tuple[int | None, int | None]:
    seq = inputs.number(body, "seq", low=0, high=2**53, integer=True)
    attempt = inputs.number(body, "attempt", low=1, high=2**31, integer=True)
    return (None if seq is None else int(seq)), (None if attempt is None else int(attempt))


def _progress_rule(body: dict[str, Any]) -> tuple[Callable[[Job, float], Outcome],
                                                 int | None, int | None]:
    seq, attempt = _idempotency(body)
    upd = jobs.ProgressUpdate(
        progress=inputs.number(body, "progress", low=0, high=100),
        current=inputs.number(body, "current", low=0),
        total=inputs.number(body, "total", low=0),
        stage=inputs.text(body, "stage", max_len=64, pattern=NAME),
        message=inputs.text(body, "message", max_len=2000),
        data=inputs.document(body, "data"),
        paused=inputs.boolean(body, "paused"),
        seq=seq,
        attempt=attempt,
    )
    if upd.total is not None and upd.total <= 0:
        raise InvalidInput("total must be greater than 0", field="total")
    return (lambda job, now: jobs.record_progress(job, upd, now)), seq, attempt


def _log_rule(body: dict[str, Any]) -> tuple[Callable[[Job, float], Outcome],
                                            int | None, int | None]:
    seq, attempt = _idempotency(body)
    level = inputs.text(body, "level", max_len=16, default="info") or "info"
    if level not in jobs.LOG_LEVELS:
        raise InvalidInput(f"level must be one of {list(jobs.LOG_LEVELS)}", field="level")
    message = inputs.text(body, "message", max_len=8000, required=True)
    assert message is not None
    line = jobs.LogLine(level=level, message=message, seq=seq, attempt=attempt)
    return (lambda job, now: jobs.record_log(job, line, now)), seq, attempt


def _finish_rule(body: dict[str, Any]) -> tuple[Callable[[Job, float], Outcome],
                                               int | None, int | None]:
    seq, attempt = _idempotency(body)
    status = inputs.text(body, "status", max_len=16, required=True)
    if status not in jobs.FINISH_STATUSES:
        raise InvalidInput(f"status must be one of {sorted(jobs.FINISH_STATUSES)}",
                           field="status")
    fin = jobs.Finish(status=status, result=inputs.document(body, "result"),
                      error=inputs.text(body, "error", max_len=8000), seq=seq, attempt=attempt)
    return (lambda job, now: jobs.finish(job, fin, now)), seq, attempt


async def post_progress(request: Request) -> Response:
    return await worker_write(request, PROGRESS_FIELDS, _progress_rule)


async def post_log(request: Request) -> Response:
    return await worker_write(request, LOG_FIELDS, _log_rule)


async def post_finish(request: Request) -> Response:
    return await worker_write(request, FINISH_FIELDS, _finish_rule)


# ---------------------------------------------------------------- ops


async def healthz(request: Request) -> Response:
    """200 only while writes can succeed: a load balancer's question. Else 503 and why;
    it answers within the write deadline (store.health)."""
    ctx = ctx_of(request)
    try:
        reason = await ctx.store.health()
        if reason is None:
            await ctx.store.check()
    except Unavailable as exc:
        reason = exc.message
    if reason is not None:
        return json_response(dumps({"status": "unavailable", "reason": reason}), 503)
    return json_response(f'{{"status":"ok","head":{ctx.hub.head},"streams":{ctx.hub.streams}}}')


async def metrics(request: Request) -> Response:
    """Prometheus text, by prometheus_client from this app's registry (see metrics)."""
    return Response(ctx_of(request).metrics.render(), media_type=CONTENT_TYPE)


def routes() -> list[Route]:
    return [
        Route("/api/jobs", create_job, methods=["POST"]),
        Route("/api/jobs", list_jobs, methods=["GET"]),
        Route("/api/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/api/jobs/{job_id}/events", job_events, methods=["GET"]),
        Route("/api/jobs/{job_id}/progress", post_progress, methods=["POST"]),
        Route("/api/jobs/{job_id}/log", post_log, methods=["POST"]),
        Route("/api/jobs/{job_id}/finish", post_finish, methods=["POST"]),
        Route("/api/events", all_events, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]

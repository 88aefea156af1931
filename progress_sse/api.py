"""Thin JSON endpoints: parse, apply the job rules through the store, answer."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

from orjson import Fragment
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import inputs, jobs, schema, streams, worker_rules
from .app_context import context_of
from .auth import CREATE, READ, new_worker_token, require, worker_pass
from .codec import dumps
from .errors import Conflict, InvalidInput, Unavailable
from .jobs import Job, Outcome
from .metrics import CONTENT_TYPE
from .notify.origins import allowed
from .request_headers import header
from .settings import Settings
from .store import Filter, Write, WriteResult

B = TypeVar("B", bound=schema.Body)



def json_response(body: str, status: int = 200) -> Response:
    """A JSON answer ending in a newline, so a shell prompt after `curl` starts on its own line."""
    return Response(body + "\n", status_code=status, media_type="application/json")


# ---------------------------------------------------------------- producers


async def create_job(request: Request) -> Response:
    ctx = context_of(request)
    who = require(request, CREATE)
    body = await inputs.parse(request, schema.CreateJob, ctx.settings.max_body_bytes)
    job_id = body.id or f"j_{secrets.token_hex(8)}"
    webhook, events, emails = notify_fields(body, ctx.settings)
    token, token_hash = new_worker_token()
    spec = worker_rules.NewJob(
        id=job_id,
        owner=who.subject,
        kind=body.kind or "job",
        title=body.title or "",
        queue=body.queue or "default",
        stages=tuple(jobs.Stage(s.key, s.label or s.key, s.weight or 1.0)
                     for s in body.stages or ()),
        total=body.total,
        meta=body.meta or {},
        heartbeat_timeout_s=body.heartbeat_timeout_s or ctx.settings.heartbeat_timeout_s,
        token_hash=token_hash,
        webhook=webhook,
        webhook_events=events,
        notify_email=emails,
    )

    def apply(job: Job | None, now: float) -> Outcome:
        return worker_rules.create_job(spec, now)

    result = await ctx.store.submit(Write(job_id, apply, create=True))
    if not result.created:
        if result.job.owner != who.subject:
            raise Conflict(f"id {job_id!r} is taken", field="id")
        return json_response(dumps({"job": Fragment(result.job_json), "created": False}), 200)
    return json_response(dumps({"job": Fragment(result.job_json),
                                "event_id": result.events[0].id, "worker_token": token,
                                "created": True}), 201)


def notify_fields(body: schema.CreateJob, settings: Settings
                  ) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
    """A create's notification fields, checked against what the service allows: a
    webhook only to a listed origin (SSRF), mail only with SMTP configured."""
    if body.webhook is not None and not allowed(body.webhook, settings.webhook_origin_list):
        raise InvalidInput("the webhook's origin is not one the service allows "
                           "(WEBHOOK_ORIGINS)", field="webhook")
    emails = body.notify_email
    if emails and not settings.smtp_url:
        raise InvalidInput("this service sends no mail (SMTP_URL is not set)",
                           field="notify_email")
    events = ("finished",) if body.webhook_events is None else tuple(body.webhook_events)
    return body.webhook, events, tuple(emails or ())


# ---------------------------------------------------------------- viewers


async def list_jobs(request: Request) -> Response:
    ctx = context_of(request)
    who = require(request, READ)
    q = request.query_params
    statuses = frozenset(s for v in q.getlist("status") for s in v.split(",") if s)
    unknown = statuses - jobs.TERMINAL - jobs.ACTIVE
    if unknown:
        raise InvalidInput(f"unknown status {sorted(unknown)[0]!r}", field="status")
    kinds = frozenset(q.getlist("kind")) or None
    limit = inputs.query_int(request, "limit", default=100, low=1, high=schema.MAX_PAGE)
    before = inputs.query_int(request, "before", default=0, low=0,
                              high=schema.MAX_CURSOR) or None
    flt = Filter(owner=who.owner_filter, kinds=kinds, statuses=statuses)
    found, head, cursor = await ctx.store.list_jobs(flt, limit, before)
    now = time.time()
    return json_response(dumps({"jobs": [j.public(now) for j in found], "head": head,
                                "next": cursor}))


async def get_job(request: Request) -> Response:
    ctx = context_of(request)
    job = await streams.visible_job(ctx, request.path_params["job_id"],
                                    require(request, READ).owner_filter)
    notes = ctx.notifications
    sent = await notes.for_job(job.id) if notes is not None else []
    return json_response(dumps({"job": job.public(time.time()), "control": control(job),
                                "notifications": sent}))


async def job_events(request: Request) -> Response:
    """SSE for EventSource and curl; JSON history for anything else."""
    ctx = context_of(request)
    who = require(request, READ)
    job = await streams.visible_job(ctx, request.path_params["job_id"], who.owner_filter)
    flt = Filter(owner=who.owner_filter, job_ids=frozenset({job.id}))
    if "text/event-stream" in (header(request.scope, b"accept") or ""):
        return await streams.job_stream(request, ctx, job, flt)
    after = inputs.query_int(request, "after", default=0, low=0, high=schema.MAX_CURSOR)
    limit = inputs.query_int(request, "limit", default=100, low=1, high=schema.MAX_HISTORY)
    head = ctx.hub.head
    page = await ctx.store.events_after(after, head, flt, limit)
    answer: dict[str, object] = {}
    while page.reset:  # `after` is older than the horizon: say so, and go on from it
        first, _ = await ctx.store.bounds()
        after = answer["horizon"] = max(after, (first or 1) - 1)
        page = await ctx.store.events_after(after, head, flt, limit)
    answer = {"events": [Fragment(e.body) for e in page.events], "head": head, **answer}
    return json_response(dumps(answer))


async def all_events(request: Request) -> Response:
    ctx = context_of(request)
    who = require(request, READ)
    q = request.query_params
    job_ids = frozenset(q.getlist("job")) or None
    kinds = frozenset(q.getlist("kind")) or None
    for name, values in (("job", job_ids), ("kind", kinds)):
        for v in values or ():
            if not schema.is_name(v):
                raise InvalidInput(f"{name} filter {v[:40]!r} is not a valid name", field=name)
    if job_ids is not None and len(job_ids) > schema.MAX_JOB_FILTERS:
        raise InvalidInput(f"at most {schema.MAX_JOB_FILTERS} job filters", field="job")
    flt = Filter(owner=who.owner_filter, job_ids=job_ids, kinds=kinds)
    spec = streams.StreamSpec(flt=flt, cursor=streams.parse_last_event_id(request))
    return streams.open_stream(request, ctx, spec)


# ---------------------------------------------------------------- workers


async def worker_write(request: Request, model: type[B],
                       rule: Callable[[B], Callable[[Job, float], Outcome]]) -> Response:
    """A worker's post: its credential checked in the writer, the body's `rule` applied."""
    ctx = context_of(request)
    job_id = request.path_params["job_id"]
    credential = worker_pass(request)
    body = await inputs.parse(request, model, ctx.settings.max_body_bytes)
    step = rule(body)

    def check(job: Job | None) -> Job:
        return credential.check(job, job_id)

    def apply(job: Job | None, now: float) -> Outcome:
        return step(check(job), now)

    # `check` runs in the writer before anything else, a repeated seq's answer included
    write = Write(job_id, apply, seq=getattr(body, "seq", None),
                  attempt=getattr(body, "attempt", None), check=check)
    return worker_answer(await ctx.store.submit(write))


def worker_answer(result: WriteResult) -> Response:
    """The stored event's id, the job, and the control state the worker must obey."""
    return json_response(dumps({
        "event_id": result.events[-1].id if result.events else None,
        "duplicate": result.duplicate, "job": Fragment(result.job_json),
        "control": control(result.job)}))


def control(job: Job) -> dict[str, Any]:
    """The control state: on every worker answer."""
    return {"cancel_requested": job.cancel_requested, "pause_requested": job.pause_requested,
            "reason": job.control_reason, "status": job.status, "attempt": job.attempt}


def _progress_rule(body: schema.Progress) -> Callable[[Job, float], Outcome]:
    upd = worker_rules.ProgressUpdate(
        progress=body.progress, current=body.current, total=body.total, stage=body.stage,
        message=body.message, data=body.data, paused=body.paused, seq=body.seq,
        attempt=body.attempt)
    return lambda job, now: worker_rules.record_progress(job, upd, now)


def _log_rule(body: schema.Log) -> Callable[[Job, float], Outcome]:
    line = worker_rules.LogLine(level=body.level or "info", message=body.message, seq=body.seq,
                        attempt=body.attempt)
    return lambda job, now: worker_rules.record_log(job, line, now)


def _finish_rule(body: schema.Finish) -> Callable[[Job, float], Outcome]:
    fin = worker_rules.Finish(status=body.status, result=body.result, error=body.error,
                              seq=body.seq, attempt=body.attempt)
    return lambda job, now: worker_rules.finish(job, fin, now)


async def post_progress(request: Request) -> Response:
    return await worker_write(request, schema.Progress, _progress_rule)


async def post_log(request: Request) -> Response:
    return await worker_write(request, schema.Log, _log_rule)


async def post_finish(request: Request) -> Response:
    return await worker_write(request, schema.Finish, _finish_rule)


# ---------------------------------------------------------------- ops


async def healthz(request: Request) -> Response:
    """200 only while writes can succeed: a load balancer's question. Else 503 and why;
    it answers within the write deadline (store.health). `?verbose` adds what the log
    keeps (the horizon, as pruning last saw it)."""
    ctx = context_of(request)
    try:
        reason = await ctx.store.health()
        if reason is None:
            await ctx.store.check()
    except Unavailable as exc:
        reason = exc.message
    if reason is not None:
        return json_response(dumps({"status": "unavailable", "reason": reason}), 503)
    body: dict[str, object] = {"status": "ok", "head": ctx.hub.head,
                               "streams": ctx.hub.streams}
    if "verbose" in request.query_params:
        pruner = ctx.store.retention
        body["retention"] = {"horizon": pruner.retained.horizon,
                             "oldest_event": pruner.retained.oldest,
                             "events_pruned": pruner.expired,
                             "events_compacted": pruner.compacted, "jobs_pruned": pruner.dropped}
    return json_response(dumps(body))


async def metrics(request: Request) -> Response:
    """Prometheus text, by prometheus_client from this app's registry (see metrics)."""
    return Response(context_of(request).metrics.render(), media_type=CONTENT_TYPE)


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

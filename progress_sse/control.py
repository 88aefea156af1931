"""Control path: cancel, pause, resume, requeue; the workers' long-poll; stalled workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import control_rules, inputs, schema, worker_rules
from .api import control, json_response, worker_answer, worker_write
from .app_context import Context, context_of
from .auth import CREATE, require, worker_pass
from .codec import dumps
from .errors import JobNotFound
from .jobs import Job, Outcome
from .store import Filter, Write

log = structlog.get_logger("progress_sse.control")

# how many cancelling jobs the stall watcher reads at a time
_CANCELLING_PAGE = 500

Rule = Callable[[Job, str | None, float], Outcome]


def _viewer_request(rule: Rule, forced: Rule | None = None) -> Callable[[Request], Any]:
    """A viewer's control request; with `forced`, `{"force": true}` applies that instead
    (cancel only: it closes the job at once, without the worker, "Close anyway")."""
    model = schema.CancelRequest if forced is not None else schema.ControlRequest

    async def endpoint(request: Request) -> Response:
        ctx = context_of(request)
        job_id = request.path_params["job_id"]
        owner = require(request, CREATE).owner_filter
        body = await inputs.parse(request, model, ctx.settings.max_body_bytes)
        reason = body.reason
        chosen = forced if forced is not None and getattr(body, "force", None) else rule

        def apply(job: Job | None, now: float) -> Outcome:
            if job is None or (owner is not None and job.owner != owner):
                raise JobNotFound(f"no job {job_id!r}")
            return chosen(job, reason, now)

        result = await ctx.store.submit(Write(job_id, apply))
        answer = worker_answer(result)
        # accepted, not done, while the worker has yet to acknowledge
        if result.job.cancel_requested or (result.job.pause_requested
                                           and result.job.status == "running"):
            answer.status_code = 202
        return answer

    return endpoint


async def heartbeat(request: Request) -> Response:
    def rule(body: schema.Heartbeat) -> Callable[[Job, float], Outcome]:
        return lambda job, now: worker_rules.heartbeat(job, body.attempt, now)

    return await worker_write(request, schema.Heartbeat, rule)


async def control_state(request: Request) -> Response:
    """Long-poll: answer when the control state differs from what the worker knows.

    The worker says what it knows (`cancel_requested`, `pause_requested`, default
    false), so a change that happened just before the poll is not missed.
    """
    ctx = context_of(request)
    job_id = request.path_params["job_id"]
    credential = worker_pass(request)
    wait = inputs.query_number(request, "wait", low=0, high=ctx.settings.max_wait_s)
    known = (_flag(request, "cancel_requested"), _flag(request, "pause_requested"))
    deadline = time.monotonic() + (wait or 0.0)
    # the caller may see the job before any wake-up is held for it (an unknown id or a
    # junk credential costs one read, nothing kept); they are freed when the poll ends
    credential.check(await ctx.store.get_job(job_id), job_id)
    with ctx.hub.watching(job_id):
        while True:
            waiter = ctx.hub.waiter(job_id)
            job = credential.check(await ctx.store.get_job(job_id), job_id)
            left = deadline - time.monotonic()
            if (job.cancel_requested, job.pause_requested) != known or job.finished \
                    or left <= 0 or ctx.hub.closed:
                return json_response(dumps({"control": control(job)}))
            try:
                await asyncio.wait_for(waiter.wait(), left)
            except TimeoutError:
                pass


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "false").lower() in ("1", "true", "yes")


async def watch_stalls(ctx: Context) -> None:
    """One task for all jobs: mark running jobs whose worker went silent, and end
    cancels that a silent worker will never acknowledge."""
    while not ctx.hub.closed:
        await asyncio.sleep(ctx.settings.stall_check_s)
        try:
            for job_id in await ctx.store.stale_jobs(time.time()):
                result = await ctx.store.submit(Write(job_id, _stall))
                if result.events:
                    log.info("job.stalled", job_id=job_id)
            for job_id in await _unanswered_cancels(ctx, time.time()):
                result = await ctx.store.submit(Write(job_id, _expire_cancel))
                if result.events:
                    log.info("job.cancel_timed_out", job_id=job_id)
        except Exception as exc:  # keep watching; the next round retries
            if ctx.hub.closed:
                return
            log.warning("stall_check.failed", error=str(exc))


def _stall(job: Job | None, now: float) -> Outcome:
    if job is None:
        raise JobNotFound("gone")
    return control_rules.mark_stalled(job, now)


async def _unanswered_cancels(ctx: Context, now: float) -> list[str]:
    """Cancelling jobs whose cancel timed out. Few jobs are ever cancelling (and the
    status is indexed), so the existing list read serves; the writer checks again."""
    due: list[str] = []
    flt = Filter(statuses=frozenset({"cancelling"}))
    before: int | None = None
    while True:
        page, _, before = await ctx.store.list_jobs(flt, _CANCELLING_PAGE, before)
        due += [job.id for job in page if control_rules.cancel_timed_out(job, now)]
        if before is None:
            return due


def _expire_cancel(job: Job | None, now: float) -> Outcome:
    if job is None:
        raise JobNotFound("gone")
    return control_rules.expire_cancel(job, now)


def routes() -> list[Route]:
    return [
        Route("/api/jobs/{job_id}/cancel",
              _viewer_request(control_rules.request_cancel, forced=control_rules.force_cancel),
              methods=["POST"]),
        Route("/api/jobs/{job_id}/pause", _viewer_request(control_rules.request_pause),
              methods=["POST"]),
        Route("/api/jobs/{job_id}/resume", _viewer_request(control_rules.request_resume),
              methods=["POST"]),
        Route("/api/jobs/{job_id}/requeue", _viewer_request(control_rules.requeue),
              methods=["POST"]),
        Route("/api/jobs/{job_id}/heartbeat", heartbeat, methods=["POST"]),
        Route("/api/jobs/{job_id}/control", control_state, methods=["GET"]),
    ]

"""Worker-token rotation: an admin replaces a job's worker token, and the old one stops
working with the write that stores the new hash."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import inputs, schema
from .api import json_response
from .app_context import context_of
from .auth import ADMIN, new_worker_token, require
from .codec import dumps
from .errors import JobNotFound
from .jobs import Job, Outcome
from .store import Write


async def rotate_worker_token(request: Request) -> Response:
    """Give the job a new worker token; the body answers it, once (only its hash is kept)."""
    ctx = context_of(request)
    require(request, ADMIN)
    job_id = request.path_params["job_id"]
    await inputs.parse(request, schema.TokenRotation, ctx.settings.max_body_bytes)
    token, token_hash = new_worker_token()

    def apply(job: Job | None, now: float) -> Outcome:
        if job is None:
            raise JobNotFound(f"no job {job_id!r}")
        return job.evolve(token_hash=token_hash, updated_at=now), []

    await ctx.store.submit(Write(job_id, apply))
    return json_response(dumps({"job_id": job_id, "worker_token": token}))


def routes() -> list[Route]:
    return [Route("/api/jobs/{job_id}/worker-token", rotate_worker_token, methods=["POST"])]

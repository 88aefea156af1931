"""Worker posts go straight to their endpoint, past Starlette's router.

Worker posts are most of a busy service's requests, and each one used to pass
through Starlette's exception middleware, the router (a regex per route until one
matches), the route's request/response wrapper and a second exception wrapper
before reaching its endpoint. This middleware sits inside ours (request log,
security) and picks out `POST /api/jobs/{id}/{progress|log|finish}` by string
operations, calls the same endpoint functions, and renders the same error answers;
everything else goes down the usual stack. Exceptions other than our own still
reach Starlette's server-error middleware, as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ProgressError

Endpoint = Callable[[Request], Awaitable[Response]]
PREFIX = "/api/jobs/"


class WorkerPosts:
    def __init__(self, app: ASGIApp, endpoints: Mapping[str, Endpoint],
                 on_error: Callable[[ProgressError], Response]) -> None:
        self.app = app
        self.endpoints = dict(endpoints)  # last path segment -> endpoint
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._match(scope)
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await endpoint(Request(scope, receive))
        except ProgressError as exc:
            response = self.on_error(exc)
        await response(scope, receive, send)

    def _match(self, scope: Scope) -> Endpoint | None:
        """The endpoint for a worker post, with `job_id` set in the path params; else None."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path: str = scope["path"]
        if not path.startswith(PREFIX):
            return None
        job_id, slash, action = path[len(PREFIX):].partition("/")
        endpoint = self.endpoints.get(action) if slash and job_id else None
        if endpoint is not None:
            scope["path_params"] = {"job_id": job_id}
        return endpoint

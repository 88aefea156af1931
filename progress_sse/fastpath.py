"""The busiest routes go straight to their endpoints, past Starlette's router.

Worker posts are most of a busy service's requests, and open streams most of its
connections. Through Starlette each passes its exception middleware, the router (a
regex per route until one matches), the route's request/response wrapper and a
second exception wrapper before reaching the endpoint: CPU on every post and on
every stream's start (a stream then runs past all of them, see streams). This
middleware sits inside ours (request log, security), picks these routes out with
string operations, calls the same endpoint functions and renders the same error
answers; every other request goes down the usual stack. Exceptions other than our
own still reach Starlette's server-error middleware, as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ProgressError

Endpoint = Callable[[Request], Awaitable[Response]]
JOBS = "/api/jobs/"


class HotRoutes:
    def __init__(self, app: ASGIApp, routes: Mapping[tuple[str, str], Endpoint],
                 on_error: Callable[[ProgressError], Response]) -> None:
        self.app = app
        self.routes = dict(routes)  # (method, path with "{job_id}") -> endpoint
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
        """The endpoint for a hot route, with `job_id` set in the path params; else None."""
        if scope["type"] != "http":
            return None
        path: str = scope["path"]
        job_id = None
        if path.startswith(JOBS):  # "/api/jobs/{job_id}/action", as Starlette's [^/]+ reads it
            job_id, slash, action = path[len(JOBS):].partition("/")
            if not (job_id and slash):
                return None
            path = f"{JOBS}{{job_id}}/{action}"
        endpoint = self.routes.get((scope["method"], path))
        if endpoint is not None and job_id is not None:
            scope["path_params"] = {"job_id": job_id}
        return endpoint

"""The busiest routes are served before the middleware stack, in one layer.

Worker posts are most of a busy service's requests, and open streams most of its
connections. Through Starlette each passed its exception middleware, our request
log and security layers (each wrapping `send`), the router (a regex per route until
one matches), the route's request/response wrapper and a second exception wrapper
before reaching the endpoint: measured here, 7-13% of a worker post's CPU in the
app. The app's outermost layer (`app.Service`) picks these routes out with string
operations and hands them to `HotRoutes.serve`, which does what those layers do for
them, with the same parts (`logs.RequestLog`, `security.Policy`, the same error
answers): one request id and log line, the same refusals, every header of the answer
added to its start at once, and a plain answer written to the connection in one
piece (`write_whole`). Every other request goes down the usual stack.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from .errors import ProgressError
from .logs import RequestLog
from .metrics import HOT_ROUTE
from .security import Policy, origin_of, refuse, with_headers
from .streams import httptools_cycle

Endpoint = Callable[[Request], Awaitable[Response]]
JOBS = "/api/jobs/"
CLIENT_CLOSED = 499  # the log's status for a request whose client left before its answer

log = structlog.get_logger("progress_sse.http")


class HotRoutes:
    def __init__(self, routes: Mapping[tuple[str, str], Endpoint], requests: RequestLog,
                 policy: Policy, on_error: Callable[[Exception], Response]) -> None:
        self.routes = dict(routes)  # (method, path with "{job_id}") -> endpoint
        self.requests = requests
        self.policy = policy
        self.on_error = on_error  # the JSON error answer for any exception

    def match(self, scope: Scope) -> Endpoint | None:
        """The endpoint for a hot route, with `job_id` set in the path params; else None."""
        path: str = scope["path"]
        job_id = None
        if path.startswith(JOBS):  # "/api/jobs/{job_id}/action", as Starlette's [^/]+ reads it
            job_id, slash, action = path[len(JOBS):].partition("/")
            if not (job_id and slash):
                return None
            path = f"{JOBS}{{job_id}}/{action}"
        endpoint = self.routes.get((scope["method"], path))
        if endpoint is not None:
            scope[HOT_ROUTE] = path  # the template, for the request duration's label
            if job_id is not None:
                scope["path_params"] = {"job_id": job_id}
        return endpoint

    async def serve(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send
                    ) -> None:
        start = time.perf_counter()
        request_id = self.requests.begin(scope)
        status = CLIENT_CLOSED
        try:
            origin = origin_of(scope)
            refusal = self.policy.screen(scope, origin)
            extra = [*self.policy.answer_headers(origin), (b"x-request-id", request_id)]
            if refusal is not None:
                status = refusal.status
                await refuse(send, refusal.status, refusal.code, refusal.message,
                             [(b"x-request-id", request_id)])
                return
            try:
                response = await endpoint(Request(scope, receive))
            except ClientDisconnect:
                return
            except Exception as exc:  # ours rendered as they are, any other as a 500
                if not isinstance(exc, ProgressError):
                    log.exception("request.failed", path=scope["path"])
                response = self.on_error(exc)
            status = response.status_code
            if type(response) is Response and response.background is None:
                # a plain answer: every header added at once, in one write if it can be
                headers = with_headers(response.raw_headers, extra)
                if not write_whole(send, status, headers, response.body):
                    await send({"type": "http.response.start", "status": status,
                                "headers": headers})
                    await send({"type": "http.response.body", "body": response.body})
                return

            async def send_with_headers(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": with_headers(message.get("headers", []),
                                                                  extra)}
                await send(message)

            await response(scope, receive, send_with_headers)  # a stream: it starts here
        finally:
            self.requests.end(scope, status, start)


def write_whole(send: Send, status: int, headers: list[tuple[bytes, bytes]],
                body: bytes | memoryview) -> bool:
    """Write a plain answer to the connection at once, as uvicorn's httptools `send`
    would in two writes (status line and headers, then the body); False, having written
    nothing, wherever it might not be the same: another server, a connection to close
    after it, a HEAD, a paused or lost connection, uvicorn's access log.

    Measured here, 64 workers posting, alternated in one run: 165 against 180 us of
    server CPU per post (0.53 against 0.48 of the bare endpoint's rate), most of it the
    second system call, the rest the checks uvicorn's send makes of every header (ours
    are built here, lowercase, with no line breaks: a client's request id is refused
    unless printable). Tests run with pytest's log capture off, so that uvicorn's
    access log is off there as in the service and this path is the one tested."""
    cycle = httptools_cycle(send)
    if cycle is None:
        return False
    try:
        if (cycle.response_started is not False or cycle.disconnected is not False
                or cycle.keep_alive is not True or cycle.access_log is not False
                or cycle.flow.write_paused is not False or cycle.scope["method"] == "HEAD"):
            return False
        parts: list[bytes | memoryview] = [_STATUS_LINES[status]]
        for name, value in (*cycle.default_headers, *headers):
            if name in _FRAMING:
                return False
            parts += (name, b": ", value, b"\r\n")
        parts += (b"\r\n", body)
        write, done, answered = cycle.transport.write, cycle.on_response, cycle.message_event
    except (AttributeError, KeyError, TypeError):
        return False
    cycle.response_started = cycle.response_complete = True
    cycle.waiting_for_100_continue = False
    write(b"".join(parts))
    answered.set()  # what uvicorn's send does once a response is complete
    done()
    return True


_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode())
                 for s in HTTPStatus}
# headers that change how uvicorn frames an answer or ends the connection (Starlette's
# content-length, right for the body, is the one framing header a plain answer has)
_FRAMING = frozenset({b"transfer-encoding", b"connection"})

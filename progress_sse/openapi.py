"""The OpenAPI 3 description of the HTTP API, written by hand and served at /openapi.json.

tests/test_openapi.py keeps it in step with the routes, and tests/test_fuzz.py runs
schemathesis against a live server from it, so a route, a parameter or an answer
that changes without this file changing fails the tests.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .auth import COOKIE, QUERY_PARAM
from .codec import dumps
from .inputs import MAX_STAGES
from .settings import Settings

Schema = dict[str, Any]

NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
STATUSES = ["queued", "running", "paused", "cancelling", "succeeded", "failed", "cancelled"]
FINISH_STATUSES = ["succeeded", "failed", "cancelled"]
LOG_LEVELS = ["debug", "info", "warning", "error"]

ERROR_TEXT = {
    400: "Bad input: the error names the field and why.",
    401: "No valid credential (`WWW-Authenticate: Bearer`).",
    403: "The token lacks the scope, or a cross-origin write was refused.",
    404: "No such job, or one the caller may not see.",
    409: "The job is finished, the attempt is stale, or the id is taken.",
    413: "The body is larger than the limit.",
    415: "The body is neither JSON nor form-encoded.",
    429: "Too many open streams for this user (`Retry-After`).",
    503: "The service is shutting down.",
}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def errors(*codes: int) -> dict[str, Schema]:
    return {str(c): {"description": ERROR_TEXT[c],
                     "content": {"application/json": {"schema": ref("Error")}}}
            for c in codes}


def ok(schema: Schema, description: str = "OK", status: int = 200) -> dict[str, Schema]:
    return {str(status): {"description": description,
                          "content": {"application/json": {"schema": schema}}}}


def body(properties: dict[str, Schema], required: tuple[str, ...] = (),
         form: bool = True) -> Schema:
    """A JSON object body (also accepted form-encoded, where every value is text)."""
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    content: Schema = {"application/json": {"schema": schema}}
    if form:
        flat = {k: {"type": "string", "maxLength": 8000} for k in properties}
        form_schema: Schema = {"type": "object", "properties": flat,
                               "additionalProperties": False}
        if required:
            form_schema["required"] = list(required)
        content["application/x-www-form-urlencoded"] = {"schema": form_schema}
    return {"required": False, "content": content}


def query(name: str, schema: Schema, description: str = "") -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


JOB_ID: Schema = {"name": "job_id", "in": "path", "required": True,
                  "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                  "description": f"A job id ({NAME_PATTERN})."}
LAST_EVENT_ID = [
    {"name": "Last-Event-ID", "in": "header", "required": False,
     "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
     "description": "Resume after this event id (what EventSource sends)."},
    query("last_event_id", {"type": "string", "pattern": "^[0-9]{1,18}$"},
          "Resume after this event id, for clients that cannot set headers."),
]
IDEMPOTENCY: dict[str, Schema] = {
    "seq": {"type": "integer", "minimum": 0, "maximum": 10**15,
            "description": "Increasing per job; a repeat answers the stored event."},
    "attempt": {"type": "integer", "minimum": 1, "maximum": 2**31,
                "description": "The worker's attempt; an older one is refused (409)."},
}
DOCUMENT: Schema = {"description": "Any JSON value: at most 16 KiB serialised, 8 levels deep."}
SSE: Schema = {"text/event-stream": {"schema": {"type": "string"}}}

VIEWER: list[Schema] = [{"bearer": []}, {"cookie": []}, {"query": []}]
WORKER: list[Schema] = [{"worker": []}, {"bearer": []}, {"query": []}]
ANYONE: list[Schema] = [{}]  # no credential needed


def _components() -> Schema:
    job: Schema = {
        "type": "object",
        "required": ["id", "kind", "title", "queue", "status", "progress"],
        "properties": {
            "id": {"type": "string"}, "kind": {"type": "string"},
            "title": {"type": "string"}, "queue": {"type": "string"},
            "status": {"type": "string", "enum": STATUSES},
            "progress": {"type": "number", "minimum": 0, "maximum": 100},
            "current": {"type": ["number", "null"]}, "total": {"type": ["number", "null"]},
            "stage": {"type": ["string", "null"]},
            "stages": {"type": "array", "items": {
                "type": "object", "required": ["key", "label", "weight"],
                "properties": {"key": {"type": "string"}, "label": {"type": "string"},
                               "weight": {"type": "number"}}}},
            "message": {"type": ["string", "null"]},
            "error": {"type": ["string", "null"]},
            "attempt": {"type": "integer"},
            "stalled": {"type": "boolean"},
            "final_event_id": {"type": ["integer", "null"]},
            "eta_s": {"type": ["number", "null"]},
        },
    }
    control: Schema = {
        "type": "object",
        "required": ["cancel_requested", "pause_requested", "status", "attempt"],
        "properties": {"cancel_requested": {"type": "boolean"},
                       "pause_requested": {"type": "boolean"},
                       "reason": {"type": ["string", "null"]},
                       "status": {"type": "string", "enum": STATUSES},
                       "attempt": {"type": "integer"}},
    }
    return {
        "schemas": {
            "Error": {
                "type": "object", "required": ["error"],
                "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                   "field": {"type": "string"}}}},
            },
            "Job": job,
            "Control": control,
            "Event": {"type": "object", "required": ["id", "job_id", "type", "ts", "job"],
                      "properties": {"id": {"type": "integer"}, "job_id": {"type": "string"},
                                     "type": {"type": "string"}, "ts": {"type": "string"},
                                     "job": ref("Job")}},
            "WorkerAnswer": {
                "type": "object", "required": ["event_id", "duplicate", "job", "control"],
                "properties": {"event_id": {"type": ["integer", "null"]},
                               "duplicate": {"type": "boolean"},
                               "job": ref("Job"), "control": ref("Control")}},
        },
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                       "description": "A signed token (HS256): `sub` owns jobs, `scope` "
                                      "grants read, create or admin. Or, on worker "
                                      "endpoints, the job's worker token."},
            "cookie": {"type": "apiKey", "in": "cookie", "name": COOKIE,
                       "description": "The same JWT, for the dashboard."},
            "query": {"type": "apiKey", "in": "query", "name": QUERY_PARAM,
                      "description": "The same JWT, for EventSource and curl."},
            "worker": {"type": "apiKey", "in": "header", "name": "X-Worker-Token",
                       "description": "The job's worker token (returned once on create)."},
        },
    }


def spec(settings: Settings) -> Schema:
    """The description of this service's API, with this configuration's limits."""
    jwt = settings.auth == "jwt"
    viewer = VIEWER if jwt else ANYONE
    worker = WORKER if jwt else [*ANYONE, *WORKER]  # the worker token is optional
    worker_errors = errors(400, 401, 403, 404, 409, 413, 415, 503)
    viewer_write_errors = errors(400, 401, 403, 404, 409, 413, 415, 503)
    stage: Schema = {"oneOf": [
        {"type": "string", "pattern": NAME_PATTERN},
        {"type": "object", "required": ["key"], "additionalProperties": False,
         "properties": {"key": {"type": "string", "pattern": NAME_PATTERN},
                        "label": {"type": "string", "maxLength": 100},
                        "weight": {"type": "number", "exclusiveMinimum": 0,
                                   "maximum": 1e6}}}]}
    create = body({
        "id": {"type": "string", "pattern": NAME_PATTERN,
               "description": "Client id for an idempotent create."},
        "kind": {"type": "string", "pattern": NAME_PATTERN},
        "title": {"type": "string", "maxLength": 200},
        "queue": {"type": "string", "pattern": NAME_PATTERN},
        "stages": {"type": "array", "maxItems": MAX_STAGES, "items": stage},
        "total": {"type": "number", "minimum": 0, "maximum": 1e15},
        "meta": {"type": "object", **DOCUMENT},
        "heartbeat_timeout_s": {"type": "number", "minimum": 1, "maximum": 86400},
    })
    progress = body({
        "progress": {"type": "number", "minimum": 0, "maximum": 100},
        "current": {"type": "number", "minimum": 0, "maximum": 1e15},
        "total": {"type": "number", "exclusiveMinimum": 0, "maximum": 1e15},
        "stage": {"type": "string", "pattern": NAME_PATTERN},
        "message": {"type": "string", "maxLength": 2000},
        "data": DOCUMENT,
        "paused": {"type": "boolean",
                   "description": "A worker acknowledging a pause (true) or resume (false)."},
        **IDEMPOTENCY,
    })
    log = body({"level": {"type": "string", "enum": LOG_LEVELS},
                "message": {"type": "string", "maxLength": 8000}, **IDEMPOTENCY},
               required=("message",))
    finish = body({"status": {"type": "string", "enum": FINISH_STATUSES},
                   "result": DOCUMENT, "error": {"type": "string", "maxLength": 8000},
                   **IDEMPOTENCY}, required=("status",))
    reason = body({"reason": {"type": "string", "maxLength": 500}})
    cancel = body({"reason": {"type": "string", "maxLength": 500},
                   "force": {"type": "boolean",
                             "description": "Close the job as cancelled at once, without "
                                            "its worker's acknowledgement (200)."}})
    heartbeat = body({"attempt": IDEMPOTENCY["attempt"]})

    def viewer_request(what: str, request_body: Schema = reason) -> Schema:
        return {"post": {
            "operationId": f"{what}Job", "summary": f"Request a {what} of the job.",
            "tags": ["control"], "security": viewer, "parameters": [JOB_ID],
            "requestBody": request_body,
            "responses": {**ok(ref("WorkerAnswer"), "Done."),
                          **ok(ref("WorkerAnswer"), "Accepted; the worker has yet to act.",
                               202),
                          **viewer_write_errors}}}

    def worker_post(name: str, summary: str, request_body: Schema) -> Schema:
        return {"post": {"operationId": name, "summary": summary, "tags": ["workers"],
                         "security": worker, "parameters": [JOB_ID],
                         "requestBody": request_body,
                         "responses": {**ok(ref("WorkerAnswer")), **worker_errors}}}

    paths: Schema = {
        "/api/jobs": {
            "post": {
                "operationId": "createJob", "tags": ["producers"], "security": viewer,
                "summary": "Create a job (scope create). The worker token is in the answer "
                           "once.",
                "requestBody": create,
                "responses": {
                    **ok({"type": "object", "required": ["job", "created", "worker_token"],
                          "properties": {"job": ref("Job"), "event_id": {"type": "integer"},
                                         "worker_token": {"type": "string"},
                                         "created": {"const": True}}}, "Created.", 201),
                    **ok({"type": "object", "required": ["job", "created"],
                          "properties": {"job": ref("Job"), "created": {"const": False}}},
                         "The job with this id already existed (idempotent create)."),
                    **errors(400, 401, 403, 409, 413, 415, 503)},
            },
            "get": {
                "operationId": "listJobs", "tags": ["viewers"], "security": viewer,
                "summary": "The caller's jobs, newest first (scope read).",
                "parameters": [
                    {**query("status", {"type": "array",
                                        "items": {"type": "string", "enum": STATUSES}}),
                     "style": "form", "explode": True},
                    {**query("kind", {"type": "array", "items": {"type": "string"}}),
                     "style": "form", "explode": True},
                    query("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                    query("before", {"type": "integer", "minimum": 0, "maximum": 2**62},
                          "The `next` cursor of the previous page."),
                ],
                "responses": {
                    **ok({"type": "object", "required": ["jobs", "head", "next"],
                          "properties": {"jobs": {"type": "array", "items": ref("Job")},
                                         "head": {"type": "integer"},
                                         "next": {"type": ["integer", "null"]}}}),
                    **errors(400, 401, 403)},
            },
        },
        "/api/jobs/{job_id}": {"get": {
            "operationId": "getJob", "tags": ["viewers"], "security": viewer,
            "summary": "One job's current state (scope read).", "parameters": [JOB_ID],
            "responses": {**ok({"type": "object", "required": ["job", "control"],
                                "properties": {"job": ref("Job"),
                                               "control": ref("Control")}}),
                          **errors(401, 403, 404)}}},
        "/api/jobs/{job_id}/events": {"get": {
            "operationId": "jobEvents", "tags": ["viewers"], "security": viewer,
            "summary": "The job's events: SSE with `Accept: text/event-stream`, else JSON "
                       "history.",
            "parameters": [
                JOB_ID,
                query("after", {"type": "integer", "minimum": 0, "maximum": 2**62}),
                query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                *LAST_EVENT_ID,
            ],
            "responses": {
                "200": {"description": "JSON history, or the stream.", "content": {
                    "application/json": {"schema": {
                        "type": "object", "required": ["events", "head"],
                        "properties": {"events": {"type": "array", "items": ref("Event")},
                                       "head": {"type": "integer"}}}},
                    **SSE}},
                "204": {"description": "The caller has seen the job's end: stop reconnecting."},
                **errors(400, 401, 403, 404, 429)}}},
        "/api/jobs/{job_id}/progress": worker_post(
            "postProgress", "Report progress; the answer carries the control state.",
            progress),
        "/api/jobs/{job_id}/log": worker_post("postLog", "Add a log line.", log),
        "/api/jobs/{job_id}/finish": worker_post("finishJob", "Finish the job.", finish),
        "/api/jobs/{job_id}/heartbeat": worker_post(
            "heartbeat", "Say the worker is alive without reporting progress.", heartbeat),
        "/api/jobs/{job_id}/cancel": viewer_request("cancel", cancel),
        "/api/jobs/{job_id}/pause": viewer_request("pause"),
        "/api/jobs/{job_id}/resume": viewer_request("resume"),
        "/api/jobs/{job_id}/requeue": viewer_request("requeue"),
        "/api/jobs/{job_id}/control": {"get": {
            "operationId": "controlState", "tags": ["workers"], "security": worker,
            "summary": "Long-poll until the control state differs from what the worker "
                       "knows.",
            "parameters": [
                JOB_ID,
                query("wait", {"type": "number", "minimum": 0,
                               "maximum": settings.max_wait_s}, "Seconds to wait at most."),
                query("cancel_requested", {"type": "boolean"}),
                query("pause_requested", {"type": "boolean"}),
            ],
            "responses": {**ok({"type": "object", "required": ["control"],
                                "properties": {"control": ref("Control")}}),
                          **errors(400, 401, 403, 404)}}},
        "/api/jobs/{job_id}/worker-token": {"post": {
            "operationId": "rotateWorkerToken", "tags": ["admin"], "security": viewer,
            "summary": "Replace the job's worker token (scope admin); the old one stops "
                       "working.",
            "parameters": [JOB_ID],
            "requestBody": body({}),
            "responses": {**ok({"type": "object", "required": ["job_id", "worker_token"],
                                "properties": {"job_id": {"type": "string"},
                                               "worker_token": {"type": "string"}}}),
                          **errors(400, 401, 403, 404, 413, 415, 503)}}},
        "/api/events": {"get": {
            "operationId": "allEvents", "tags": ["viewers"], "security": viewer,
            "summary": "One SSE stream of all the caller's jobs, always a stream.",
            "parameters": [
                {**query("job", {"type": "array", "maxItems": 100,
                                 "items": {"type": "string", "pattern": NAME_PATTERN}}),
                 "style": "form", "explode": True},
                {**query("kind", {"type": "array",
                                  "items": {"type": "string", "pattern": NAME_PATTERN}}),
                 "style": "form", "explode": True},
                *LAST_EVENT_ID,
            ],
            "responses": {"200": {"description": "The stream.", "content": SSE},
                          **errors(400, 401, 403, 429)}}},
        "/healthz": {"get": {
            "operationId": "healthz", "tags": ["ops"], "security": [],
            "summary": "200 while writes can succeed; 503 and the reason when they cannot.",
            "responses": {**ok({"type": "object", "required": ["status", "head", "streams"],
                                "properties": {"status": {"const": "ok"},
                                               "head": {"type": "integer"},
                                               "streams": {"type": "integer"}}}),
                          **ok({"type": "object", "required": ["status", "reason"],
                                "properties": {"status": {"const": "unavailable"},
                                               "reason": {"type": "string"}}},
                               "Writes cannot succeed now.", 503)}}},
        "/metrics": {"get": {
            "operationId": "metrics", "tags": ["ops"], "security": [],
            "summary": "Prometheus text.",
            "responses": {"200": {"description": "Metrics.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {
            "operationId": "openapi", "tags": ["ops"], "security": [],
            "summary": "This description.",
            "responses": ok({"type": "object"})}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "progress-sse", "version": "0.1.0",
                 "description": "Live progress of long-running jobs over Server-Sent Events. "
                                f"Request bodies: at most {settings.max_body_bytes} bytes. "
                                f"Authentication: {settings.auth}."},
        "servers": [{"url": "/"}],
        "security": viewer,
        "paths": paths,
        "components": _components(),
    }


async def openapi_json(request: Request) -> Response:
    settings: Settings = request.app.state.ctx.settings
    return Response(dumps(spec(settings)) + "\n", media_type="application/json")


def routes() -> list[Route]:
    return [Route("/openapi.json", openapi_json, methods=["GET"])]

"""The OpenAPI 3 description of the HTTP API, served at /openapi.json.

Bodies and answers are the models of `schema` (their JSON Schemas, shared under
components); the paths, parameters and answers are assembled around them here.
tests/test_openapi.py keeps it in step with the routes, tests/test_schema_bounds.py
sends values just inside and just outside every bound it states, and
tests/test_fuzz.py runs schemathesis against a live server from it.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import schema
from .app_context import context_of
from .auth import COOKIE, QUERY_PARAM
from .codec import dumps
from .schema import MAX_CURSOR, MAX_NAME, NAME_PATTERN, STATUSES
from .settings import Settings

Schema = dict[str, Any]
COMPONENTS = "#/components/schemas/"

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


def ref(model: type[Any] | str) -> Schema:
    return {"$ref": COMPONENTS + (model if isinstance(model, str) else model.__name__)}


def errors(*codes: int) -> dict[str, Schema]:
    return {str(c): {"description": ERROR_TEXT[c],
                     "content": {"application/json": {"schema": ref(schema.Error)}}}
            for c in codes}


def ok(model: type[Any] | Schema, description: str = "OK", status: int = 200
       ) -> dict[str, Schema]:
    body = model if isinstance(model, dict) else ref(model)
    return {str(status): {"description": description,
                          "content": {"application/json": {"schema": body}}}}


def body(model: type[schema.Body]) -> Schema:
    """A request body: JSON, or form-encoded (see form_schema)."""
    return {"required": False, "content": {
        "application/json": {"schema": ref(model)},
        "application/x-www-form-urlencoded": {"schema": ref(model.__name__ + "Form")}}}


def form_schema(json_schema: Schema) -> Schema:
    """The form version of a body: its scalar fields, each sent as text. Text keeps its
    bounds (they apply alike); numbers and flags are read from the text and checked as
    in JSON; lists and objects cannot be sent as a form."""
    properties: Schema = {}
    for name, prop in json_schema["properties"].items():
        branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
        if len(branches) != 1:
            continue
        kind = branches[0].get("type")
        if kind in ("array", "object"):
            continue
        if kind == "string" or "enum" in branches[0] or "const" in branches[0]:
            properties[name] = {k: v for k, v in branches[0].items() if k != "title"}
        else:
            properties[name] = {"type": "string", "description": _AS_TEXT.get(
                kind, "Any text: a form sends a document as a string.")}
    out: Schema = {"type": "object", "properties": properties,
                   "additionalProperties": False}
    if json_schema.get("required"):
        out["required"] = json_schema["required"]
    return out


_AS_TEXT = {"number": "A number, as text.", "integer": "An integer, as text.",
            "boolean": "true, 1, yes, on, t or y; false, 0, no, off, f or n (any case)."}


def components() -> Schema:
    """Every body and answer model's JSON Schema, plus each body's form version."""
    _, defs = models_json_schema([(m, "validation") for m in (*schema.REQUESTS,
                                                              *schema.ANSWERS)],
                                 ref_template=COMPONENTS + "{model}")
    schemas: Schema = defs["$defs"]
    for model in schema.REQUESTS:
        schemas[model.__name__ + "Form"] = form_schema(schemas[model.__name__])
    return schemas


def query(name: str, kind: Schema, description: str = "") -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": kind,
            "description": description}


NAME: Schema = {"type": "string", "maxLength": MAX_NAME, "pattern": NAME_PATTERN}
JOB_ID: Schema = {"name": "job_id", "in": "path", "required": True,
                  "schema": {**NAME, "minLength": 1},
                  "description": "A job id; no job has another, so any other answers 404."}
LAST_EVENT_ID = [
    {"name": "Last-Event-ID", "in": "header", "required": False,
     "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
     "description": "Resume after this event id (what EventSource sends)."},
    query("last_event_id", {"type": "string", "pattern": "^[0-9]{1,18}$"},
          "Resume after this event id, for clients that cannot set headers."),
]
SSE: Schema = {"text/event-stream": {"schema": {"type": "string"}}}

VIEWER: list[Schema] = [{"bearer": []}, {"cookie": []}, {"query": []}]
WORKER: list[Schema] = [{"worker": []}, {"bearer": []}, {"query": []}]
ANYONE: list[Schema] = [{}]  # no credential needed

SECURITY_SCHEMES: Schema = {
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
}


def spec(settings: Settings) -> Schema:
    """The description of this service's API, with this configuration's limits."""
    jwt = settings.auth == "jwt"
    viewer = VIEWER if jwt else ANYONE
    worker = WORKER if jwt else [*ANYONE, *WORKER]  # the worker token is optional
    worker_errors = errors(400, 401, 403, 404, 409, 413, 415, 503)
    viewer_write_errors = errors(400, 401, 403, 404, 409, 413, 415, 503)
    def viewer_request(what: str, model: type[schema.Body] = schema.ControlRequest
                       ) -> Schema:
        return {"post": {
            "operationId": f"{what}Job", "summary": f"Request a {what} of the job.",
            "tags": ["control"], "security": viewer, "parameters": [JOB_ID],
            "requestBody": body(model),
            "responses": {**ok(schema.WorkerAnswer, "Done."),
                          **ok(schema.WorkerAnswer, "Accepted; the worker has yet to act.",
                               202),
                          **viewer_write_errors}}}

    def worker_post(name: str, summary: str, model: type[schema.Body]) -> Schema:
        return {"post": {"operationId": name, "summary": summary, "tags": ["workers"],
                         "security": worker, "parameters": [JOB_ID],
                         "requestBody": body(model),
                         "responses": {**ok(schema.WorkerAnswer), **worker_errors}}}

    paths: Schema = {
        "/api/jobs": {
            "post": {
                "operationId": "createJob", "tags": ["producers"], "security": viewer,
                "summary": "Create a job (scope create). The worker token is in the answer "
                           "once.",
                "requestBody": body(schema.CreateJob),
                "responses": {
                    **ok(schema.Created, "Created.", 201),
                    **ok(schema.Existing,
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
                    query("limit", {"type": "integer", "minimum": 1,
                                    "maximum": schema.MAX_PAGE}),
                    query("before", {"type": "integer", "minimum": 0, "maximum": MAX_CURSOR},
                          "The `next` cursor of the previous page."),
                ],
                "responses": {
                    **ok(schema.JobPage),
                    **errors(400, 401, 403)},
            },
        },
        "/api/jobs/{job_id}": {"get": {
            "operationId": "getJob", "tags": ["viewers"], "security": viewer,
            "summary": "One job's current state (scope read).", "parameters": [JOB_ID],
            "responses": {**ok(schema.JobState),
                          **errors(401, 403, 404)}}},
        "/api/jobs/{job_id}/events": {"get": {
            "operationId": "jobEvents", "tags": ["viewers"], "security": viewer,
            "summary": "The job's events: SSE with `Accept: text/event-stream`, else JSON "
                       "history.",
            "parameters": [
                JOB_ID,
                query("after", {"type": "integer", "minimum": 0, "maximum": MAX_CURSOR}),
                query("limit", {"type": "integer", "minimum": 1,
                                "maximum": schema.MAX_HISTORY}),
                *LAST_EVENT_ID,
            ],
            "responses": {
                "200": {"description": "JSON history, or the stream.", "content": {
                    "application/json": {"schema": ref(schema.EventPage)},
                    **SSE}},
                "204": {"description": "The caller has seen the job's end: stop reconnecting."},
                **errors(400, 401, 403, 404, 429)}}},
        "/api/jobs/{job_id}/progress": worker_post(
            "postProgress", "Report progress; the answer carries the control state.",
            schema.Progress),
        "/api/jobs/{job_id}/log": worker_post("postLog", "Add a log line.", schema.Log),
        "/api/jobs/{job_id}/finish": worker_post("finishJob", "Finish the job.",
                                                 schema.Finish),
        "/api/jobs/{job_id}/heartbeat": worker_post(
            "heartbeat", "Say the worker is alive without reporting progress.",
            schema.Heartbeat),
        "/api/jobs/{job_id}/cancel": viewer_request("cancel", schema.CancelRequest),
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
            "responses": {**ok(schema.ControlState),
                          **errors(400, 401, 403, 404)}}},
        "/api/jobs/{job_id}/worker-token": {"post": {
            "operationId": "rotateWorkerToken", "tags": ["admin"], "security": viewer,
            "summary": "Replace the job's worker token (scope admin); the old one stops "
                       "working.",
            "parameters": [JOB_ID],
            "requestBody": body(schema.TokenRotation),
            "responses": {**ok(schema.TokenRotated),
                          **errors(400, 401, 403, 404, 413, 415, 503)}}},
        "/api/events": {"get": {
            "operationId": "allEvents", "tags": ["viewers"], "security": viewer,
            "summary": "One SSE stream of all the caller's jobs, always a stream.",
            "parameters": [
                {**query("job", {"type": "array", "maxItems": schema.MAX_JOB_FILTERS,
                                 "items": NAME}),
                 "style": "form", "explode": True},
                {**query("kind", {"type": "array", "items": NAME}),
                 "style": "form", "explode": True},
                *LAST_EVENT_ID,
            ],
            "responses": {"200": {"description": "The stream.", "content": SSE},
                          **errors(400, 401, 403, 429)}}},
        "/healthz": {"get": {
            "operationId": "healthz", "tags": ["ops"], "security": [],
            "summary": "200 while writes can succeed; 503 and the reason when they cannot.",
            "parameters": [query("verbose", {"type": "string"},
                                 "present: add what the log keeps (`retention`)")],
            "responses": {**ok(schema.Healthy),
                          **ok(schema.Unhealthy, "Writes cannot succeed now.", 503)}}},
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
        "components": {"schemas": components(), "securitySchemes": SECURITY_SCHEMES},
    }


async def openapi_json(request: Request) -> Response:
    settings = context_of(request).settings
    return Response(dumps(spec(settings)) + "\n", media_type="application/json")


def routes() -> list[Route]:
    return [Route("/openapi.json", openapi_json, methods=["GET"])]

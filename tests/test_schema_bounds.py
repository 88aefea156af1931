"""Every bound /openapi.json states for a request body, a query parameter or a header is
the bound the service enforces.

The cases come from the served description itself: for each body (JSON and form) the
walker finds every constraint (maxLength, pattern, minimum, maximum, maxItems, enum,
required, ...), and a real service gets a value just inside it (accepted) and just
outside it (400, naming the field with its path). A bound added to a model is covered
without a line here; a kind of constraint the walker does not know fails the test.
"""

from __future__ import annotations

import copy
import math
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from progress_sse.auth import mint_token
from progress_sse.schema import DOC_BYTES_KEY, DOC_DEPTH_KEY, NAME_PATTERN, TEXT_PATTERN
from progress_sse.settings import Settings

from .helpers import Service

STORES = ("sqlite", "postgres")  # every test asking for `db` runs on both (conftest.py)
SECRET = "a-test-secret-that-is-long-enough-0123456789"
JSON, FORM = "application/json", "application/x-www-form-urlencoded"
# keywords that state no bound of their own (a union's branches are walked one by one)
NOT_BOUNDS = {"title", "description", "default", "anyOf", "properties", "items", "$ref"}
BOUNDS = {"type", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
          "exclusiveMaximum", "maxItems", "enum", "const", "required",
          "additionalProperties", DOC_BYTES_KEY, DOC_DEPTH_KEY}
# for each pattern: values that match it and values that do not
PATTERNS = {
    NAME_PATTERN: (["a", "Z9", "a-1.b:c_d"], ["-a", ".a", "a b", "a/b", "é"]),
    TEXT_PATTERN: (["tab\there\nnew\r line é \x7f"], ["bell\x07", "nul\x00", "esc\x1b"]),
}
# for each format: values that have it (as the service's settings below allow: a
# webhook's origin must be listed) and values that do not; a maxLength beside a format
# is tried with the first good value padded to the length
HOOKS = "http://hooks.example"
FORMATS = {
    "uri": ([f"{HOOKS}/x", f"{HOOKS}:80/x?y=1"],
            ["ftp://hooks.example/x", "hooks.example/x", "https://hooks.example/x",
             "http://other.example/x", "http://u@hooks.example/x"]),
    "email": (["a@example.com", "Name <b@example.com>"],
              ["no-at", "a@b", "x\n@example.com", "a@@example.com"]),
}
UNKNOWN = "zz_unknown"

Build = Callable[[Any], Any]  # a value for the field -> the whole body


@dataclass(frozen=True)
class Case:
    operation: str
    ctype: str
    field: str  # the field's path, as an error names it
    bound: str
    value: Any
    inside: bool
    body: Any


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def sample(doc: dict[str, Any], schema: dict[str, Any], salt: int = 0) -> Any:
    """A valid value of `schema` (`salt` makes list items differ)."""
    schema = resolve(doc, schema)
    if "anyOf" in schema:
        return sample(doc, schema["anyOf"][0], salt)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if schema.get("format") == "email":
        return f"s{salt}@example.com"
    if schema.get("format") == "uri":
        return f"{HOOKS}/s{salt}"
    if kind == "object" and "properties" in schema:
        return {k: sample(doc, schema["properties"][k], salt) for k in schema.get("required", ())}
    return {"string": f"s{salt}", "number": 1, "integer": 1, "boolean": True, "array": [],
            "object": {}, None: {"k": salt}}[kind]


def padded(schema: dict[str, Any], n: int) -> str:
    """A string of length `n` that meets the schema's format, if it has one."""
    if schema.get("format") == "email":
        return "a" * (n - len("@example.com")) + "@example.com"
    if schema.get("format") == "uri":
        return f"{HOOKS}/" + "a" * (n - len(HOOKS) - 1)
    return "a" * n


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def just_beyond(value: float, integer: bool, up: bool) -> float:
    if integer:
        return value + (1 if up else -1)
    return math.nextafter(value, math.inf if up else -math.inf)


def bounds(doc: dict[str, Any], schema: dict[str, Any], field: str, build: Build,
           form: bool, branch: bool = False) -> Iterator[tuple[str, str, Any, bool, Any]]:
    """(field, bound, value, inside, body) for every constraint of `schema` and below."""
    schema = resolve(doc, schema)
    unknown = set(schema) - BOUNDS - NOT_BOUNDS
    assert not unknown, f"{field}: constraint kinds the walker does not know: {unknown}"
    if "anyOf" in schema:
        branches = [b for b in schema["anyOf"] if b.get("type") != "null"]
        for b in branches:
            yield from bounds(doc, b, field, build, form, branch=len(branches) > 1)
        if len(branches) < len(schema["anyOf"]):
            yield field, "null", None, True, build(None)
        return
    kind = schema.get("type")
    integer = kind == "integer"

    def case(bound: str, value: Any, inside: bool) -> tuple[str, str, Any, bool, Any]:
        return field, bound, value, inside, build(value)

    if "type" in schema and not form and not branch:  # JSON is strict: no "1" for 1
        wrong = {"string": [1, True], "number": ["1", True], "integer": ["1", 1.5, True],
                 "boolean": ["true", 1], "object": [[], "x"], "array": ["x", {}]}[kind]
        for value in wrong:
            yield case("type", value, False)
    if "maxLength" in schema:
        n = schema["maxLength"]
        yield case("maxLength", padded(schema, n), True)
        yield case("maxLength", padded(schema, n + 1), False)
    if "format" in schema:
        assert schema["format"] in FORMATS, f"{field}: unknown format {schema['format']!r}"
        good, bad = FORMATS[schema["format"]]
        yield from (case("format", v, True) for v in good)
        yield from (case("format", v, False) for v in bad)
    if "pattern" in schema:
        assert schema["pattern"] in PATTERNS, f"{field}: unknown pattern {schema['pattern']!r}"
        good, bad = PATTERNS[schema["pattern"]]
        yield from (case("pattern", v, True) for v in good)
        yield from (case("pattern", v, False) for v in bad)
    for bound, up, inside_at_bound in (("minimum", False, True), ("maximum", True, True),
                                       ("exclusiveMinimum", False, False),
                                       ("exclusiveMaximum", True, False)):
        if bound in schema:
            at, beyond = schema[bound], just_beyond(schema[bound], integer, up)
            inner = at if inside_at_bound else just_beyond(at, integer, not up)
            outer = beyond if inside_at_bound else at
            yield case(bound, inner, True)
            yield case(bound, outer, False)
    if "enum" in schema or "const" in schema:
        allowed = schema.get("enum", [schema.get("const")])
        yield from (case("enum", v, True) for v in allowed)
        yield case("enum", f"not-{allowed[0]}", False)
    if kind == "array":
        items = schema["items"]
        if "maxItems" in schema:
            n = schema["maxItems"]
            yield case("maxItems", [sample(doc, items, i) for i in range(n)], True)
            yield case("maxItems", [sample(doc, items, i) for i in range(n + 1)], False)
        yield from bounds(doc, items, f"{field}[0]", lambda v: build([v]), form)
    if DOC_BYTES_KEY in schema:  # {"k":"xx..."} is 8 characters and the x's
        n = schema[DOC_BYTES_KEY]
        yield case(DOC_BYTES_KEY, {"k": "x" * (n - 8)}, True)
        yield case(DOC_BYTES_KEY, {"k": "x" * (n - 7)}, False)
    if DOC_DEPTH_KEY in schema:
        yield case(DOC_DEPTH_KEY, nested(schema[DOC_DEPTH_KEY]), True)
        yield case(DOC_DEPTH_KEY, nested(schema[DOC_DEPTH_KEY] + 1), False)
    if "properties" in schema:
        yield from object_bounds(doc, schema, field, build, form)


def object_bounds(doc: dict[str, Any], schema: dict[str, Any], field: str, build: Build,
                  form: bool) -> Iterator[tuple[str, str, Any, bool, Any]]:
    base = sample(doc, schema)
    prefix = f"{field}." if field else ""
    for name in schema.get("required", ()):
        without = {k: v for k, v in base.items() if k != name}
        yield f"{prefix}{name}", "required", None, False, build(without)
    if schema.get("additionalProperties") is False:
        yield field, "additionalProperties", None, True, build(base)
        yield f"{prefix}{UNKNOWN}", "additionalProperties", None, False, \
            build({**base, UNKNOWN: "x"})
    for name, prop in schema["properties"].items():
        yield from bounds(doc, prop, f"{prefix}{name}",
                          lambda v, name=name: build({**base, name: v}), form)


def cases(doc: dict[str, Any]) -> Iterator[Case]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for ctype, content in op.get("requestBody", {}).get("content", {}).items():
                assert ctype in (JSON, FORM), ctype
                for field, bound, value, inside, body in bounds(
                        doc, content["schema"], "", lambda v: v, ctype == FORM):
                    yield Case(f"{method.upper()} {path}", ctype, field, bound, value, inside,
                               body)


async def send(c: httpx.AsyncClient, case: Case) -> httpx.Response:
    """The case against a fresh job, so no case sees another's state."""
    method, path = case.operation.split(" ")
    if "{job_id}" in path:
        created = await c.post("/api/jobs", json={})
        assert created.status_code == 201, created.text
        path = path.replace("{job_id}", created.json()["job"]["id"])
    if case.ctype == JSON:
        return await c.request(method, path, json=case.body)
    return await c.request(method, path, data=case.body)


def judge(case: Case, r: httpx.Response) -> str | None:
    """Why the answer is wrong for the case, or None."""
    where = f"{case.operation} {case.ctype} {case.field} {case.bound} {case.value!r:.60}"
    if case.inside:
        # an attempt beyond the job's (1) passes validation and is then refused as one
        # not yet started: the bound itself held
        fenced = case.field.endswith("attempt") and r.status_code == 409
        if r.status_code >= 300 and not fenced:
            return f"{where}: inside the bound, answered {r.status_code} {r.text[:200]}"
        return None
    if r.status_code not in (400, 422):
        return f"{where}: outside the bound, answered {r.status_code} {r.text[:200]}"
    named = r.json()["error"].get("field") or ""
    field = case.field or "body"  # the body itself, not one of its fields
    # an item of the field names it too (one address read as a list of one: [0])
    if named != field and not named.startswith((f"{field}.", f"{field}[")):
        return f"{where}: the error names {named!r}, not {field!r}"
    return None


async def check(c: httpx.AsyncClient, doc: dict[str, Any]) -> tuple[list[Case], list[str]]:
    found = list(cases(doc))
    problems = [p for case in found if (p := judge(case, await send(c, case))) is not None]
    return found, problems


@pytest.fixture
def settings(db: str) -> Settings:
    # webhooks to one origin and mail allowed, so every notification field is read
    return Settings(db=db, jwt_secret=SECRET, stall_check_s=3600, webhook_origins=HOOKS,
                    webhook_secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                    smtp_url="smtp://127.0.0.1:1", smtp_from="progress@example.com")


@pytest.fixture
async def admin(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    """An admin (who may also create, read and post for any job), so that every body,
    the worker-token rotation's included, is read."""
    token = mint_token(SECRET, "root", "read create admin", 600)
    async with httpx.AsyncClient(base_url=service.url, timeout=10,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


async def test_every_body_bound_is_enforced_inside_and_outside(
        admin: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]) -> None:
    """Each stated bound: a value just inside it is taken, one just outside it is a 400
    naming the field."""
    doc = (await admin.get("/openapi.json")).json()
    found, problems = await check(admin, doc)
    assert problems == [], "\n".join(problems[:20])
    kinds = {case.bound for case in found}
    assert {"maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "maxItems",
            "enum", "required", "additionalProperties", DOC_BYTES_KEY, DOC_DEPTH_KEY,
            "type"} <= kinds
    assert {"stages[0].weight", "stages[0].key", "seq", "attempt", "data", "meta"} <= \
        {case.field for case in found}
    with capsys.disabled():
        print(f"\nschema bounds: {len(found)} cases, {len(kinds)} kinds of bound")


async def test_a_bound_the_service_does_not_enforce_is_caught(
        admin: httpx.AsyncClient) -> None:
    """A description that states a bound the service does not hold fails the check (so
    the test above can fail), and so does a constraint kind the walker does not know."""
    doc = copy.deepcopy((await admin.get("/openapi.json")).json())
    progress = doc["components"]["schemas"]["Progress"]["properties"]["progress"]["anyOf"][0]
    progress["maximum"] = 99  # the service takes up to 100
    doc["paths"] = {"/api/jobs/{job_id}/progress": doc["paths"]["/api/jobs/{job_id}/progress"]}
    _, problems = await check(admin, doc)
    assert any("progress maximum" in p and "outside the bound" in p for p in problems)
    progress["multipleOf"] = 5
    with pytest.raises(AssertionError, match="multipleOf"):
        list(cases(doc))


# ---------------------------------------------------------------- query and header bounds

PARAM_BOUNDS = {"minimum", "maximum", "pattern", "maxItems"}
PARAM_NOT_BOUNDS = {"type", "title", "description", "default", "items", "format"}
# values that match the one pattern parameters state (an event id) and values that do not
ID_PATTERN = "^[0-9]{1,18}$"
ID_VALUES = (["0", "7", "9" * 18], ["-1", "1.5", "x", "9" * 19, "²"])


def param_cases(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], Any, bool]]:
    """(operation, parameter, value, inside) for each bound a query or header parameter
    states; path ids are covered by the body bounds (a bad id is a 404)."""
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for param in op.get("parameters", []):
                if "$ref" in param:
                    param = resolve(doc, param)
                if param["in"] == "path":
                    continue
                schema = resolve(doc, param.get("schema", {}))
                unknown = set(schema) - PARAM_BOUNDS - PARAM_NOT_BOUNDS
                assert not unknown, f"{method} {path} {param['name']}: {sorted(unknown)}"
                operation = f"{method.upper()} {path}"
                integer = schema.get("type") == "integer"
                for bound, up in (("minimum", False), ("maximum", True)):
                    if bound in schema:
                        limit = schema[bound]
                        yield operation, param, limit, True
                        yield operation, param, just_beyond(limit, integer, up), False
                if "pattern" in schema:
                    assert schema["pattern"] == ID_PATTERN, schema["pattern"]
                    for inside, values in ((True, ID_VALUES[0]), (False, ID_VALUES[1])):
                        for value in values:
                            yield operation, param, value, inside
                if "maxItems" in schema:
                    most = schema["maxItems"]
                    yield operation, param, [f"j{i}" for i in range(most)], True
                    yield operation, param, [f"j{i}" for i in range(most + 1)], False


async def send_param(c: httpx.AsyncClient, operation: str, param: dict[str, Any],
                     value: Any) -> httpx.Response:
    """The request with the one parameter, on a finished job (a long poll answers at
    once); a stream is closed as soon as its status is known. A resume point is a
    stream's parameter: it is sent to the stream (a job's events as JSON ignore it)."""
    method, path = operation.split(" ")
    created = await c.post("/api/jobs", json={})
    job_id = created.json()["job"]["id"]
    await c.post(f"/api/jobs/{job_id}/finish", json={"status": "succeeded"})
    path = path.replace("{job_id}", job_id)
    text = value if isinstance(value, list) else \
        (repr(value) if isinstance(value, float) else str(value))
    params = {param["name"]: text} if param["in"] == "query" else {}
    headers = {param["name"]: text.encode()} if param["in"] == "header" else {}
    if param["name"].lower() == "last-event-id" or param["name"] == "last_event_id":
        headers["Accept"] = b"text/event-stream"
    async with c.stream(method, path, params=params, headers=headers) as r:
        if r.status_code < 300:
            return r
        await r.aread()
        return r


async def test_every_query_and_header_bound_is_enforced_inside_and_outside(
        admin: httpx.AsyncClient) -> None:
    """Each bound a query or header parameter states: just inside is answered, just
    outside is a 400 naming the parameter."""
    doc = (await admin.get("/openapi.json")).json()
    found = list(param_cases(doc))
    problems = []
    for operation, param, value, inside in found:
        r = await send_param(admin, operation, param, value)
        where = f"{operation} {param['name']}={value!r:.40}"
        if inside and r.status_code >= 300:
            problems.append(f"{where}: inside, answered {r.status_code} {r.text[:200]}")
        elif not inside:
            if r.status_code != 400:
                problems.append(f"{where}: outside, answered {r.status_code}")
            elif r.json()["error"].get("field") != param["name"]:
                problems.append(f"{where}: the error names {r.json()['error'].get('field')}")
    assert problems == [], "\n".join(problems[:20])
    names = {param["name"] for _, param, _, _ in found}
    assert {"limit", "before", "after", "wait", "job", "Last-Event-ID",
            "last_event_id"} <= names

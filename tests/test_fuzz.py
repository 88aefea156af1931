"""Hostile input against a real server and SQLite file: schemathesis from /openapi.json, then
a hand-written list. Every refusal is a 4xx with the JSON error shape, never a 5xx; a
refused request stores nothing; the service is healthy afterwards."""

from __future__ import annotations

import asyncio
import copy
import json
import sqlite3
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from progress_sse.auth import mint_token
from progress_sse.settings import Settings

from .helpers import Service, start_service

EXAMPLES = 30  # per operation and generation mode
SKIPPED = {"GET /api/events"}  # always an endless stream; its bad inputs are in HOSTILE
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
SECRET = "a-test-secret-that-is-long-enough-0123456789"


@pytest.fixture
def settings(db_path: str) -> Settings:
    # short long-polls keep generated waits quick; no stall watcher adding events meanwhile
    return Settings(db=db_path, max_wait_s=0.2, stall_check_s=3600)


def event_count(db: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])


def error_shape_problem(r: httpx.Response) -> str | None:
    """Why `r` is not the JSON error shape, or None."""
    return shape_problem(r.headers.get("content-type", ""), r.content)


def shape_problem(content_type: str, body: bytes) -> str | None:
    if not content_type.startswith("application/json"):
        return f"content type {content_type!r}"
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"body {body[:200]!r}"
    if not (isinstance(err.get("code"), str) and isinstance(err.get("message"), str)):
        return f"error {err!r}"
    return None


async def known_jobs(client: httpx.AsyncClient) -> list[str]:
    """A queued staged job, a running one and a finished one, for generated cases to hit."""
    await client.post("/api/jobs", json={"id": "fuzz-staged", "stages": ["a", "b"]})
    await client.post("/api/jobs", json={"id": "fuzz-running", "total": 10})
    await client.post("/api/jobs/fuzz-running/progress", json={"progress": 5})
    await client.post("/api/jobs", json={"id": "fuzz-done"})
    await client.post("/api/jobs/fuzz-done/finish", json={"status": "succeeded"})
    return ["fuzz-staged", "fuzz-running", "fuzz-done"]


# ---------------------------------------------------------------- schemathesis


@dataclass
class Outcome:
    cases: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def fuzz(spec: dict[str, Any], url: str, db: str, job_ids: list[str],
         examples: int = EXAMPLES, only: str | None = None) -> Outcome:
    """Run generated cases, positive and negative, for every operation (in a thread: the
    server runs on the test's event loop, and schemathesis calls with blocking requests)."""
    schema = schemathesis.openapi.from_dict(spec)
    out = Outcome()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        op = result.ok()
        if op.label in SKIPPED or (only is not None and op.label != only):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(op, mode, url, db, job_ids, examples, out)
    return out


def fuzz_operation(op: Any, mode: GenerationMode, url: str, db: str, job_ids: list[str],
                   examples: int, out: Outcome) -> None:
    """Up to `examples` cases of one operation; a generated job id is sometimes a real one."""

    @hsettings(max_examples=examples, deadline=None, database=None, derandomize=True,
               suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=op.as_strategy(generation_mode=mode), job=st.sampled_from([None, *job_ids]))
    def run(case: Any, job: str | None) -> None:
        if job is not None and "job_id" in (case.path_parameters or {}):
            case.path_parameters["job_id"] = job
        before = event_count(db)
        response = case.call(base_url=url, headers={"Accept": "application/json"}, timeout=10)
        out.cases += 1
        out.statuses[response.status_code] = out.statuses.get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=CHECKS)
        except (Exception, FailureGroup) as exc:  # collected, and reported by the test
            out.failures.append(f"{op.label}: {str(exc).split('Reproduce with')[0]}")
            return
        if response.status_code >= 400:
            ctype = response.headers.get("content-type") or [""]
            problem = shape_problem(ctype[0], response.content)
            if problem:
                out.failures.append(f"{op.label} {response.status_code}: {problem}")
            elif event_count(db) != before:
                out.failures.append(f"{op.label} {response.status_code} stored events")

    try:
        run()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE  # nothing to negate: no parameters, no body


async def test_schemathesis_finds_no_server_error_and_no_drift(
        service: Service, client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]) -> None:
    """Generated cases for every operation get answers the description allows, 4xx in the
    JSON error shape that store nothing, and no 5xx."""
    spec = (await client.get("/openapi.json")).json()
    job_ids = await known_jobs(client)
    out = await asyncio.to_thread(fuzz, spec, service.url, service.settings.db, job_ids)
    assert out.failures == [], "\n\n".join(out.failures[:5])
    operations = sum(1 for p in spec["paths"].values() for _ in p) - len(SKIPPED)
    assert out.cases >= (operations - 3) * EXAMPLES  # ops without parameters repeat little
    assert any(s >= 400 for s in out.statuses) and any(s < 300 for s in out.statuses)
    assert (await client.get("/healthz")).json()["status"] == "ok"
    with capsys.disabled():
        print(f"\nschemathesis: {out.cases} cases, statuses {dict(sorted(out.statuses.items()))}")


async def test_fuzzing_catches_a_description_that_drifted(service: Service,
                                                          client: httpx.AsyncClient) -> None:
    """The same run against a description that misstates one answer reports it (so the
    test above can fail)."""
    spec = copy.deepcopy((await client.get("/openapi.json")).json())
    job = spec["components"]["schemas"]["Job"]
    job["properties"]["progress"] = {"type": "string"}  # the service answers a number
    out = await asyncio.to_thread(fuzz, spec, service.url, service.settings.db,
                                  await known_jobs(client), 10, "GET /api/jobs/{job_id}")
    assert out.failures, "a wrong response schema went unnoticed"


# ---------------------------------------------------------------- hand-written


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded"}


def hostile() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(method, path, httpx request arguments) that must all be refused."""
    for raw in (b'{"kind":', b"[1, 2]", b'"text"', b"null", b"{'kind': 'x'}", b'{"total": NaN}',
                b'{"total": Infinity}', b'{"total": -Infinity}', b'{"total": 1e400}',
                b'{"total": 123456789012345678901234567890}', b'{"total": 1' + b"0" * 5000 + b"}",
                b'{"kind": 5}', b'{"id": "a\\u0000b"}', b'{"id": "../etc"}', b'{"id": "a b"}',
                b'{"title": "bell\\u0007"}', b'{"title": "' + b"x" * 201 + b'"}',
                b'{"kind": "x\\ud800"}', b'{"meta": {"k": "\\udfff"}}', b'{"title": "\xff"}',
                '{"title": "utf-16"}'.encode("utf-16"), b"[" * 50000,
                b'{"meta": [1]}', b'{"meta": ' + json.dumps(deep(20)).encode() + b"}",
                b'{"meta": {"blob": "' + b"x" * 17000 + b'"}}', b'{"unknown": 1}',
                b'{"stages": "a,b"}', b'{"stages": [{"key": "a"}, {"key": "a"}]}',
                b'{"stages": [{"key": "a", "weight": 0}]}', b'{"stages": [{"key": "a", "w": 1}]}',
                b'{"stages": [' + b",".join(b'"s%d"' % i for i in range(65)) + b"]}",
                b'{"heartbeat_timeout_s": 0}', b'{"total": true}'):
        yield "POST", "/api/jobs", {"content": raw, "headers": JSON}
    for ctype in ("text/plain", "multipart/form-data; boundary=x", "application/xml"):
        yield "POST", "/api/jobs", {"content": b"kind=x", "headers": {"content-type": ctype}}
    yield "POST", "/api/jobs", {"content": b"{}" + b" " * 70000, "headers": JSON}

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(80):
            yield b" " * 1024

    yield "POST", "/api/jobs", {"content": chunked(), "headers": JSON}
    for form in (b"progress=abc", b"progress=nan", b"progress=inf", b"progress=1e999",
                 b"paused=maybe", b"progress=1&progress=2", b"%%%", b"seq=1.5", b"seq=%C2%B2",
                 b"progress=101", b"message=%00"):
        yield "POST", "/api/jobs/fuzz-running/progress", {"content": form, "headers": FORM}
    for body in ({"progress": 101}, {"progress": -1}, {"progress": True}, {"progress": "50"},
                 {"current": 5, "total": 0}, {"current": 11},
                 {"data": deep(9)}, {"seq": -1}, {"seq": 1.5}, {"attempt": 0},
                 {"attempt": 2}, {"message": "x" * 2001}, {"extra": 1}):
        yield "POST", "/api/jobs/fuzz-running/progress", {"json": body}
    # numbers no JSON peer reads back: 1e999 parses as infinity, integers past 64 bits
    for raw in (b'{"data": {"x": 1e999}}', b'{"data": [1, -1e999]}',
                b'{"data": 123456789012345678901234567890}',
                b'{"data": {"id": -18446744073709551617}}'):
        yield "POST", "/api/jobs/fuzz-running/progress", {"content": raw, "headers": JSON}
    yield "POST", "/api/jobs", {"content": b'{"meta": {"big": 1e999}}', "headers": JSON}
    yield "POST", "/api/jobs/fuzz-running/finish", {
        "content": b'{"status": "succeeded", "result": {"n": 1e400}}', "headers": JSON}
    yield "POST", "/api/jobs/fuzz-staged/progress", {"json": {"progress": 5}}  # no stage named
    yield "POST", "/api/jobs/fuzz-staged/progress", {"json": {"stage": "nope", "progress": 5}}
    for body in ({}, {"message": 5}, {"message": "x", "level": "fatal"},
                 {"message": "x" * 8001}):
        yield "POST", "/api/jobs/fuzz-running/log", {"json": body}
    for body in ({}, {"status": "done"}, {"status": "failed", "result": deep(10)}):
        yield "POST", "/api/jobs/fuzz-running/finish", {"json": body}
    yield "POST", "/api/jobs/fuzz-done/progress", {"json": {"progress": 50}}
    yield "POST", "/api/jobs/fuzz-done/finish", {"json": {"status": "succeeded"}}
    yield "POST", "/api/jobs/fuzz-running/cancel", {"json": {"reason": "x" * 501}}
    yield "POST", "/api/jobs/fuzz-running/heartbeat", {"json": {"attempt": "one"}}
    yield "POST", "/api/jobs/fuzz-running/worker-token", {"json": {}}  # nobody is admin
    for job in ("a%00b", "%0a", "..%2f..%2fetc%2fpasswd", "x" * 5000, "%ff%fe", "%C2%B2"):
        yield "GET", f"/api/jobs/{job}", {}
        yield "POST", f"/api/jobs/{job}/progress", {"json": {"progress": 1}}
    for query in ("limit=0", "limit=-1", "limit=abc", "limit=%C2%B2", "limit=" + "9" * 30,
                  "status=bogus", "before=1e3"):
        yield "GET", f"/api/jobs?{query}", {}
    for query in ("after=-1", "after=%D9%A3", "limit=1001"):
        yield "GET", f"/api/jobs/fuzz-running/events?{query}", {}
    for query in ("wait=nan", "wait=inf", "wait=1e309", "wait=-1", "wait=100000", "wait=x"):
        yield "GET", f"/api/jobs/fuzz-running/control?{query}", {}
    sse = {"accept": "text/event-stream"}
    for bad in ("abc", "-1", "1e3", "9" * 20, "12 x", "\xb2", "\xd9"):
        yield "GET", "/api/events", {"headers": {"last-event-id": bad.encode("latin-1")}}
        yield "GET", "/api/jobs/fuzz-running/events", {
            "headers": {**sse, "last-event-id": bad.encode("latin-1")}}
    for query in ("last_event_id=abc", "job=..%2fx", "job=a%00", "kind=%0a",
                  "&".join(f"job=j{i}" for i in range(101))):
        yield "GET", f"/api/events?{query}", {}
    yield "GET", "/api/jobs/nope/events", {"headers": sse}
    for path in ("/..%2f..%2fetc/passwd", "/%2e%2e/setup.cfg", "/%2e%2e/%2e%2e/etc/passwd",
                 "/web/../setup.cfg", "/.git/config", "/index.html%00.js", "/%c0%ae%c0%ae/x",
                 "/..%5c..%5csetup.cfg", "/app.js/..%2f..%2fsetup.cfg", "/nothing"):
        yield "GET", path, {}
    yield "POST", "/index.html", {"json": {}}
    yield "DELETE", "/api/jobs", {}
    yield "PUT", "/api/jobs/fuzz-running", {"json": {}}


async def test_hostile_inputs_are_refused_as_json_4xx_storing_nothing(
        service: Service, client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]) -> None:
    """Broken JSON, wrong types, NaN, huge numbers, control characters, unknown fields,
    wrong content types, oversized bodies, bad Last-Event-IDs and path traversal: each a
    4xx with the JSON error shape, nothing stored, the service healthy."""
    await known_jobs(client)
    before = event_count(service.settings.db)
    problems = []
    cases = list(hostile())
    for method, path, kwargs in cases:
        r = await client.request(method, path, **kwargs)
        shape = error_shape_problem(r)
        if not 400 <= r.status_code < 500 or shape:
            problems.append(f"{method} {path[:80]} -> {r.status_code} {shape or r.text[:120]}")
        assert "setup.cfg" not in r.text or r.status_code == 404
        assert "root:" not in r.text
    assert problems == []
    assert event_count(service.settings.db) == before
    assert (await client.get("/healthz")).json()["status"] == "ok"
    r = await client.post("/api/jobs/fuzz-running/progress", json={"progress": 50})
    assert r.status_code == 200  # the jobs hostile posts aimed at still work
    with capsys.disabled():
        print(f"\nhand-written hostile requests: {len(cases)}")


async def test_hostile_credentials_are_401(db_path: str) -> None:
    """Forged, unsigned, oversized, non-ASCII and malformed credentials: JSON 401 or 403,
    never a 5xx, with authentication on."""
    svc = await start_service(Settings(db=db_path, jwt_secret=SECRET))
    good = mint_token(SECRET, "alice", "read create", 600)
    header, payload, _ = good.split(".")
    tampered = f"{header}.{payload[:-2]}xx.{good.split('.')[2]}"
    unsigned = jwt.encode({"sub": "root", "scope": "admin", "exp": 2**31}, None,
                          algorithm="none")
    with warnings.catch_warnings():  # PyJWT finds the key short for HS512: that is the point
        warnings.simplefilter("ignore")
        hs512 = jwt.encode({"sub": "root", "scope": "admin", "exp": 2**31}, SECRET,
                           algorithm="HS512")
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c:
            await c.post("/api/jobs", json={"id": "mine"}, headers={
                "Authorization": f"Bearer {good}"})
            before = event_count(db_path)
            creds: list[dict[str, Any]] = [
                {"Authorization": f"Bearer {tampered}"}, {"Authorization": f"Bearer {unsigned}"},
                {"Authorization": f"Bearer {hs512}"}, {"Authorization": "Bearer " + "a." * 4000},
                {"Authorization": "Bearer \xe9\xe9.\xe9.\xe9".encode("latin-1")},
                {"Authorization": "bearer"}, {"Authorization": "Bearer a.b"},
                {"Authorization": f"Bearer {good[:-1]}"}, {"X-Worker-Token": "x" * 5000},
                {"X-Worker-Token": "\xff\x00".encode("latin-1")},
                {"Cookie": "progress_sse_token=" + "%" * 100},
                {"Cookie": "progress_sse_token=a.b.c; progress_sse_token=d.e.f"},
            ]
            for headers in creds:
                for method, path in (("GET", "/api/jobs"), ("POST", "/api/jobs"),
                                     ("POST", "/api/jobs/mine/progress"),
                                     ("GET", "/api/jobs/mine/control"),
                                     ("GET", "/api/events")):
                    try:
                        r = await c.request(method, path, headers=headers,
                                            json={} if method == "POST" else None)
                    except httpx.LocalProtocolError:
                        continue  # a header httpx itself refuses to send
                    assert r.status_code in (401, 403), (headers, path, r.status_code, r.text)
                    assert error_shape_problem(r) is None
            for q in ("access_token=", "access_token=%00", "access_token=" + "x" * 3000):
                r = await c.get(f"/api/jobs?{q}")
                assert r.status_code == 401 and error_shape_problem(r) is None
            assert event_count(db_path) == before
            assert (await c.get("/healthz")).json()["status"] == "ok"
    finally:
        await svc.stop()

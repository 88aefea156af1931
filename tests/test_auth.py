"""Authentication and isolation over a real server and a real SQLite file.

Users: alice, bob and carol hold `read create`, rita only `read`, root `admin`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse
from structlog.testing import capture_logs

from progress_sse.app import create_app
from progress_sse.auth import COOKIE, mint_token
from progress_sse.errors import ConfigError
from progress_sse.security import CSP
from progress_sse.settings import Settings, parse_duration
from progress_sse.stream_quota import StreamQuota

from .helpers import (
    ProcessService,
    Service,
    free_port,
    settings_from_env,
    start_service,
    wait_for,
)
from .stored import dump, event_count, fetch, stored_job

STORES = ("sqlite", "postgres")  # every test asking for `db` runs on both (conftest.py)
SECRET = "a-test-secret-that-is-long-enough-0123456789"
SSE = {"Accept": "text/event-stream"}


def token(sub: str, scope: str = "read create", ttl: float = 600, **settings: Any) -> str:
    return mint_token(SECRET, sub, scope, ttl, **settings)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def signed(payload: str) -> str:
    """A token signed with SECRET over this exact payload text: duplicate keys, NaN and the
    like, which no JWT library writes."""
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(payload.encode())
    return head + "." + b64(hmac.new(SECRET.encode(), head.encode(), hashlib.sha256).digest())


ALICE, BOB, CAROL = token("alice"), token("bob"), token("carol")
RITA, ROOT = token("rita", "read"), token("root", "admin")


@pytest.fixture
def settings(db: str) -> Settings:
    return Settings(db=db, keepalive_s=15.0, jwt_secret=SECRET)


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, (r.request.method, r.request.url.path, r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err


async def new_job(client: httpx.AsyncClient, who: str, **fields: Any) -> tuple[str, str]:
    """Create a job as `who`; its id and worker token."""
    r = await client.post("/api/jobs", json=fields, headers=bearer(who))
    assert r.status_code == 201, r.text
    return r.json()["job"]["id"], r.json()["worker_token"]


async def until_progress(events: AsyncIterator[ServerSentEvent],
                         timeout: float = 5.0) -> list[dict[str, Any]]:
    """Events up to and including the first `progress` one."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        async for ev in events:
            if ev.data:
                out.append(json.loads(ev.data))
                if ev.event == "progress":
                    return out
    raise AssertionError("the stream ended")


async def take(events: AsyncIterator[ServerSentEvent], n: int,
               timeout: float = 5.0) -> list[ServerSentEvent]:
    out: list[ServerSentEvent] = []
    async with asyncio.timeout(timeout):
        async for ev in events:
            if ev.data:
                out.append(ev)
            if len(out) == n:
                break
    return out


# every endpoint that names a job: (method, path suffix, JSON body or None, extra headers)
VIEWER_CALLS: list[tuple[str, str, Any, dict[str, str]]] = [
    ("GET", "", None, {}),
    ("GET", "/events", None, {}),
    ("GET", "/events", None, SSE),
    ("POST", "/cancel", {}, {}),
    ("POST", "/pause", {}, {}),
    ("POST", "/resume", {}, {}),
    ("POST", "/requeue", {}, {}),
]
WORKER_CALLS: list[tuple[str, str, Any, dict[str, str]]] = [
    ("POST", "/progress", {"progress": 10, "seq": 6}, {}),
    ("POST", "/log", {"message": "hello"}, {}),
    ("POST", "/heartbeat", {}, {}),
    ("POST", "/finish", {"status": "failed", "error": "x"}, {}),
    ("GET", "/control?wait=0", None, {}),
]


async def call(client: httpx.AsyncClient, job_id: str, method: str, suffix: str, body: Any,
               headers: dict[str, str]) -> httpx.Response:
    return await client.request(method, f"/api/jobs/{job_id}{suffix}", headers=headers,
                                json=body)


# ---------------------------------------------------------------- settings


def test_mode_follows_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a secret the mode is none, with one it is jwt, and an empty secret is none."""
    assert Settings().auth == "none"
    assert Settings(jwt_secret=SECRET).auth == "jwt"
    env = {"PROGRESS_SSE_JWT_SECRET": SECRET, "PROGRESS_SSE_JWT_ISSUER": "me",
           "PROGRESS_SSE_JWT_LEEWAY_S": "5", "PROGRESS_SSE_MAX_STREAMS_PER_USER": "7",
           "PROGRESS_SSE_CORS_ORIGINS": "https://a.example, http://b.example:8080/"}
    s = settings_from_env(monkeypatch, env)
    assert (s.auth, s.jwt_issuer, s.jwt_leeway_s, s.max_streams_per_user) == ("jwt", "me", 5.0, 7)
    assert s.cors_origin_list == ("https://a.example", "http://b.example:8080")
    assert settings_from_env(monkeypatch, {"PROGRESS_SSE_JWT_SECRET": ""}).auth == "none"
    assert SECRET not in repr(s)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_public_address_without_secret_refuses_to_start(
        host: str, db_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listening beyond loopback without a signing secret is a ConfigError, in Settings and
    in create_app."""
    with pytest.raises(ConfigError, match="without authentication"):
        settings_from_env(monkeypatch, {"PROGRESS_SSE_HOST": host})
    with pytest.raises(ConfigError, match="without authentication"):
        create_app(Settings(host=host, db=db_path))
    assert create_app(Settings(host=host, db=db_path, jwt_secret=SECRET)) is not None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_without_secret_is_allowed(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """auth=none is fine on every loopback address."""
    assert settings_from_env(monkeypatch, {"PROGRESS_SSE_HOST": host}).auth == "none"


def test_insecure_flag_allows_public_address_with_a_warning(
        db_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PROGRESS_SSE_INSECURE lets auth=none listen publicly, and create_app warns about it."""
    s = settings_from_env(monkeypatch, {"PROGRESS_SSE_HOST": "0.0.0.0",
                                        "PROGRESS_SSE_INSECURE": "1", "PROGRESS_SSE_DB": db_path})
    monkeypatch.delenv("PROGRESS_SSE_HOST")  # the Settings(db=...) below: loopback again
    assert (s.insecure, s.auth) == (True, "none")
    with capture_logs() as logs:
        create_app(s)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == \
        ["auth.disabled_on_public_address"]
    with capture_logs() as logs:
        create_app(Settings(db=db_path))
    assert not [e for e in logs if e["log_level"] == "warning"]


@pytest.mark.parametrize("env, message", [
    ({"PROGRESS_SSE_JWT_SECRET": "short"}, "at least 32 bytes"),
    ({"PROGRESS_SSE_AUTH": "jwt"}, "needs a signing secret"),
    ({"PROGRESS_SSE_AUTH": "basic"}, "auth must be"),
    ({"PROGRESS_SSE_CORS_ORIGINS": "*"}, "not an origin"),
    ({"PROGRESS_SSE_CORS_ORIGINS": "https://a.example/path"}, "not an origin"),
    ({"PROGRESS_SSE_MAX_STREAMS_PER_USER": "-1"}, "max_streams_per_user"),
])
def test_unsafe_settings_are_refused(env: dict[str, str], message: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Short secrets, jwt without a secret, wildcard or path origins are configuration errors."""
    with pytest.raises(ConfigError, match=message):
        settings_from_env(monkeypatch, env)


# ---------------------------------------------------------------- tokens


def test_mint_token_carries_subject_scopes_and_expiry() -> None:
    """A minted token decodes to its subject, sorted scopes, issuer, audience and lifetime."""
    tok = mint_token(SECRET, "alice", "read,create", 3600, issuer="iss", audience="aud")
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"], issuer="iss", audience="aud")
    assert (claims["sub"], claims["scope"]) == ("alice", "create read")
    assert 3599 <= claims["exp"] - time.time() <= 3601
    for bad in ({"secret": "short"}, {"sub": ""}, {"sub": "a\nb"}, {"scopes": "read,root"},
                {"scopes": ""}, {"ttl_s": 0}, {"ttl_s": float("nan")}):
        args: dict[str, Any] = {"secret": SECRET, "sub": "a", "scopes": "read", "ttl_s": 60}
        with pytest.raises(ValueError):
            mint_token(**{**args, **bad})


def test_parse_duration_reads_units() -> None:
    """Durations for --ttl: plain seconds or s, m, h, d."""
    assert [parse_duration(t) for t in ("90", "90s", "15m", "1h", "7d", "1.5h")] == \
        [90, 90, 900, 3600, 604800, 5400]
    for bad in ("", "h", "1w", "-5m", "1h30m"):
        with pytest.raises(ValueError):
            parse_duration(bad)


async def test_missing_or_bad_credentials_are_401(client: httpx.AsyncClient,
                                                  service: Service) -> None:
    """No token, a malformed one, a forged one, `alg: none`, an expired one or a worker token
    on a viewer endpoint: 401 with the JSON error and a Bearer challenge."""
    _, worker_token = await new_job(client, ALICE)
    now = int(time.time())
    forged = jwt.encode({"sub": "alice", "scope": "admin", "exp": now + 60},
                        "another-secret-that-is-also-long-enough!!", algorithm="HS256")
    unsigned = jwt.encode({"sub": "alice", "scope": "admin", "exp": now + 60}, None,
                          algorithm="none")
    expired = jwt.encode({"sub": "alice", "scope": "read", "exp": now - 120}, SECRET,
                         algorithm="HS256")
    no_exp = jwt.encode({"sub": "alice", "scope": "read"}, SECRET, algorithm="HS256")
    no_sub = jwt.encode({"scope": "read", "exp": now + 60}, SECRET, algorithm="HS256")
    bad_scope = jwt.encode({"sub": "a", "scope": 5, "exp": now + 60}, SECRET, algorithm="HS256")
    before = await event_count(service.settings.db)
    cases: list[dict[str, str]] = [
        {}, {"Authorization": "Basic YTpi"}, {"Authorization": "Bearer"},
        bearer("not-a-jwt"), bearer("a.b.c"), bearer(forged), bearer(unsigned), bearer(expired),
        bearer(no_exp), bearer(no_sub), bearer(bad_scope), bearer(worker_token),
        {"Cookie": f"{COOKIE}={forged}"},
    ]
    for headers in cases:
        for method, path in (("GET", "/api/jobs"), ("POST", "/api/jobs"),
                             ("GET", "/api/events")):
            r = await client.request(method, path, headers=headers, json={} if method ==
                                     "POST" else None)
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer"), headers
    r = await client.get("/api/jobs", params={"access_token": forged})
    assert_error(r, 401)
    assert await event_count(service.settings.db) == before


async def test_expiry_is_honoured_with_the_leeway(client: httpx.AsyncClient) -> None:
    """A token expired 10 s ago passes with the default 30 s leeway; one expired 60 s ago
    does not."""
    now = int(time.time())
    recent = jwt.encode({"sub": "alice", "scope": "read", "exp": now - 10}, SECRET, "HS256")
    old = jwt.encode({"sub": "alice", "scope": "read", "exp": now - 60}, SECRET, "HS256")
    assert (await client.get("/api/jobs", headers=bearer(recent))).status_code == 200
    r = await client.get("/api/jobs", headers=bearer(old))
    assert_error(r, 401)
    assert "expired" in r.json()["error"]["message"]
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


async def test_issuer_and_audience_are_checked(db: str) -> None:
    """With jwt_issuer and jwt_audience set, tokens must carry both, matching."""
    svc = await start_service(Settings(db=db, jwt_secret=SECRET, jwt_issuer="corp",
                                       jwt_audience="progress"))
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c:
            good = token("alice", issuer="corp", audience="progress")
            assert (await c.get("/api/jobs", headers=bearer(good))).status_code == 200
            for tok in (token("alice"), token("alice", issuer="corp"),
                        token("alice", issuer="other", audience="progress"),
                        token("alice", issuer="corp", audience="other")):
                assert_error(await c.get("/api/jobs", headers=bearer(tok)), 401)
    finally:
        await svc.stop()


async def test_token_is_accepted_from_header_query_and_cookie(
        client: httpx.AsyncClient) -> None:
    """The same token works as Bearer, as ?access_token= and as the dashboard cookie."""
    job_id, _ = await new_job(client, ALICE)
    for kwargs in ({"headers": bearer(ALICE)}, {"params": {"access_token": ALICE}},
                   {"headers": {"Cookie": f"{COOKIE}={ALICE}"}}):
        r = await client.get("/api/jobs", **kwargs)  # type: ignore[arg-type]
        assert r.status_code == 200, r.text
        assert [j["id"] for j in r.json()["jobs"]] == [job_id]


async def test_only_the_literal_access_token_key_counts(client: httpx.AsyncClient) -> None:
    """`?access%5Ftoken=` is refused: the log redacts the literal key only, so a token under
    any other spelling would be logged."""
    r = await client.get(f"/api/jobs?access%5Ftoken={ALICE}")
    assert_error(r, 401)
    assert (await client.get(f"/api/jobs?kind=x&access_token={ALICE}")).status_code == 200


async def test_token_without_the_scope_is_403(client: httpx.AsyncClient,
                                              service: Service) -> None:
    """A read-only token cannot create, control or post as a worker; only admin rotates."""
    job_id, _ = await new_job(client, ALICE)
    before = await event_count(service.settings.db)
    assert_error(await client.post("/api/jobs", json={}, headers=bearer(RITA)), 403, "forbidden")
    odd = jwt.encode({"sub": "x", "scope": "admin2 root", "exp": int(time.time()) + 60},
                     SECRET, algorithm="HS256")
    assert_error(await client.post("/api/jobs", json={}, headers=bearer(odd)), 403)
    r = await client.post(f"/api/jobs/{job_id}/progress", json={"progress": 1},
                          headers=bearer(RITA))
    assert_error(r, 403)
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    assert_error(await client.post(f"/api/jobs/{job_id}/worker-token", headers=bearer(ALICE)),
                 403)
    only_create = token("alice", "create")
    assert_error(await client.get("/api/jobs", headers=bearer(only_create)), 403)
    assert_error(await client.post(f"/api/jobs/{job_id}/cancel", json={},
                                   headers=bearer(RITA)), 403)
    assert await event_count(service.settings.db) == before


async def test_scopes_split_on_ascii_spaces_and_commas_only(client: httpx.AsyncClient) -> None:
    """RFC 6749 separates scopes with spaces: `read\u00a0admin` is one unknown scope, so
    the token grants nothing (it used to grant read and admin); spaces and commas split."""
    b_id, _ = await new_job(client, BOB)
    now = int(time.time())
    for sep in ("\u00a0", "\t", "\n", "\x1f", "\u2003", "\u3000", "\u2028"):
        tok = jwt.encode({"sub": "x", "scope": f"read{sep}admin", "exp": now + 60}, SECRET,
                         algorithm="HS256")
        assert_error(await client.get("/api/jobs", headers=bearer(tok)), 403, "forbidden")
        assert_error(await client.get(f"/api/jobs/{b_id}", headers=bearer(tok)), 403)
    for scope in ("read admin", "read,admin", "read, admin", " admin ,, read ", ["admin"]):
        tok = jwt.encode({"sub": "x", "scope": scope, "exp": now + 60}, SECRET, "HS256")
        r = await client.get(f"/api/jobs/{b_id}", headers=bearer(tok))
        assert r.status_code == 200, (scope, r.text)


async def test_duplicate_claims_are_refused(client: httpx.AsyncClient) -> None:
    """A claim named twice is refused (401), not read as the last one: a gateway that reads
    the first `scope` and this service would disagree about what the token grants."""
    exp = int(time.time()) + 60
    for payload in (f'{{"sub":"x","scope":"read","scope":"admin","exp":{exp}}}',
                    f'{{"sub":"x","scope":"admin","scope":"read","exp":{exp}}}',
                    f'{{"sub":"alice","sub":"bob","scope":"read","exp":{exp}}}',
                    f'{{"sub":"x","scope":"read","exp":{exp},"exp":{exp + 60}}}',
                    f'{{"sub":"x","scope":"read","exp":{exp},"ctx":{{"a":1,"a":2}}}}'):
        r = await client.get("/api/jobs", headers=bearer(signed(payload)))
        assert_error(r, 401, "unauthorized")
        assert "twice" in r.json()["error"]["message"], payload
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
    good = signed(f'{{"sub":"x","scope":"read","exp":{exp},"ctx":{{"a":1,"b":2}}}}')
    assert (await client.get("/api/jobs", headers=bearer(good))).status_code == 200


async def test_time_claims_must_be_numbers_in_range(client: httpx.AsyncClient) -> None:
    """`exp`, `nbf` and `iat` must be JSON numbers from 0 to the end of year 9999: not
    strings ("99999999999" used to pass int()), booleans, NaN, 1e300 or 2**64, which made
    tokens that never expire."""
    now = int(time.time())
    claims = '"sub":"x","scope":"read"'
    bad_exp = ['"99999999999"', f'"{now + 60}"', "1e300", "1e400", str(2**64), "253402300800",
               "NaN", "Infinity", "-Infinity", "true", "null", "[1]", '{"t":1}']
    cases = [f'{{{claims},"exp":{value}}}' for value in bad_exp]
    cases += [f'{{{claims},"exp":{now + 60},"{name}":{value}}}'
              for name in ("nbf", "iat") for value in ('"0"', "false", "NaN", "1e300", "-1")]
    for payload in cases:
        r = await client.get("/api/jobs", headers=bearer(signed(payload)))
        assert_error(r, 401, "unauthorized")
        assert 'error="invalid_token"' in r.headers["www-authenticate"], payload
    for payload in (f'{{{claims},"exp":{now + 60}}}', f'{{{claims},"exp":{now + 60}.5}}',
                    f'{{{claims},"exp":{now + 60},"nbf":{now - 1},"iat":{now}.25}}',
                    f'{{{claims},"exp":{now + 60},"nbf":0,"iat":0}}'):
        r = await client.get("/api/jobs", headers=bearer(signed(payload)))
        assert r.status_code == 200, (payload, r.text)
    r = await client.get("/api/jobs", headers=bearer(signed(f'{{{claims},"exp":"{now}"}}')))
    assert "the exp claim must be a number" in r.json()["error"]["message"]


# ---------------------------------------------------------------- isolation


async def test_other_users_jobs_are_404_on_every_endpoint(client: httpx.AsyncClient,
                                                          service: Service) -> None:
    """Bob's token and a worker token of carol's job touch nothing of alice's job: 404 for a
    user, 401 for the foreign worker token, and nothing is stored or changed."""
    a_id, a_token = await new_job(client, ALICE, title="alice's")
    r = await client.post(f"/api/jobs/{a_id}/progress", json={"progress": 5, "seq": 5},
                          headers={"X-Worker-Token": a_token})
    assert r.status_code == 200
    _, c_token = await new_job(client, CAROL)
    before = await event_count(service.settings.db)
    state = await stored_job(service.settings.db, a_id)

    for method, suffix, body, extra in VIEWER_CALLS + WORKER_CALLS:
        r = await call(client, a_id, method, suffix, body, {**extra, **bearer(BOB)})
        assert_error(r, 404, "not_found")
        assert "alice" not in r.text
    for method, suffix, body, extra in WORKER_CALLS:
        for cred in ({"X-Worker-Token": c_token}, bearer(c_token)):
            r = await call(client, a_id, method, suffix, body, {**extra, **cred})
            assert_error(r, 401, "unauthorized")
            assert "progress" not in r.json()["error"]  # no job in the answer
    for method, suffix, body, extra in VIEWER_CALLS:
        r = await call(client, a_id, method, suffix, body, {**extra, **bearer(c_token)})
        assert_error(r, 401)
    # a missing job answers the same as another's, so existence does not leak
    for method, suffix, body, extra in WORKER_CALLS:
        r = await call(client, "no-such-job", method, suffix, body,
                       {**extra, "X-Worker-Token": c_token})
        assert_error(r, 401)
        r = await call(client, "no-such-job", method, suffix, body, {**extra, **bearer(BOB)})
        assert_error(r, 404)

    assert await event_count(service.settings.db) == before
    assert await stored_job(service.settings.db, a_id) == state
    bobs = (await client.get("/api/jobs", headers=bearer(BOB))).json()["jobs"]
    assert bobs == []
    everyone = (await client.get("/api/jobs", headers=bearer(ROOT))).json()["jobs"]
    assert len(everyone) == 2
    # and the owner can do all of it (so the 404s above are about ownership)
    for method, suffix, body, extra in VIEWER_CALLS[:2] + WORKER_CALLS[:2]:
        r = await call(client, a_id, method, suffix, body, {**extra, **bearer(ALICE)})
        assert r.status_code == 200, (suffix, r.text)


async def test_admin_sees_and_controls_every_job(client: httpx.AsyncClient) -> None:
    """An admin token reads, controls and posts to any user's job."""
    a_id, _ = await new_job(client, ALICE)
    for method, suffix, body, extra in VIEWER_CALLS[:2] + WORKER_CALLS[:3]:
        r = await call(client, a_id, method, suffix, body, {**extra, **bearer(ROOT)})
        assert r.status_code == 200, (suffix, r.text)
    r = await client.post(f"/api/jobs/{a_id}/cancel", json={}, headers=bearer(ROOT))
    assert r.status_code in (200, 202)
    assert r.json()["job"]["cancel_requested"] is True


async def test_repeated_seq_for_another_users_job_is_404(client: httpx.AsyncClient) -> None:
    """A replayed seq, answered by the store without the job rules, is still checked."""
    a_id, a_token = await new_job(client, ALICE)
    r = await client.post(f"/api/jobs/{a_id}/progress", json={"progress": 7, "seq": 3},
                          headers={"X-Worker-Token": a_token})
    assert r.status_code == 200
    for seq in (3, 1):
        r = await client.post(f"/api/jobs/{a_id}/progress", json={"progress": 7, "seq": seq},
                              headers=bearer(BOB))
        assert_error(r, 404)


async def test_events_stream_filters_match_nothing_of_other_users(
        client: httpx.AsyncClient) -> None:
    """Bob's /api/events?job=A&job=B, A being alice's, shows only B, in the snapshot and live."""
    a_id, a_token = await new_job(client, ALICE)
    b_id, b_token = await new_job(client, BOB)
    async with aconnect_sse(client, "GET", "/api/events",
                            params={"job": [a_id, b_id]}, headers=bearer(BOB)) as src:
        assert src.response.status_code == 200
        events = src.aiter_sse()
        [snap] = await take(events, 1)
        assert [j["id"] for j in json.loads(snap.data)["jobs"]] == [b_id]
        r = await client.post(f"/api/jobs/{a_id}/progress", json={"progress": 50},
                              headers={"X-Worker-Token": a_token})
        assert r.status_code == 200
        r = await client.post(f"/api/jobs/{b_id}/progress", json={"progress": 20},
                              headers={"X-Worker-Token": b_token})
        live = await until_progress(events)
        assert {e["job_id"] for e in live} == {b_id}
    # resuming from before alice's event replays from the store: still nothing of hers
    async with aconnect_sse(client, "GET", "/api/events", params={"job": [a_id, b_id]},
                            headers={**bearer(BOB), "Last-Event-ID": "0"}) as src:
        replayed = await until_progress(src.aiter_sse())
        assert replayed[0]["type"] == "created"
        assert {e["job_id"] for e in replayed} == {b_id}
    history = await client.get(f"/api/jobs/{b_id}/events", headers=bearer(BOB))
    assert {e["job_id"] for e in history.json()["events"]} == {b_id}


async def test_taken_id_answers_409_without_the_job(client: httpx.AsyncClient,
                                                    service: Service) -> None:
    """Creating an id another user owns is a 409 that names no owner and carries no job;
    the same create by the owner is the idempotent 200."""
    await new_job(client, ALICE, id="shared-1", title="secret title")
    before = await event_count(service.settings.db)
    r = await client.post("/api/jobs", json={"id": "shared-1"}, headers=bearer(BOB))
    assert_error(r, 409, "conflict")
    assert "job" not in r.json() and "secret" not in r.text and "alice" not in r.text
    assert_error(await client.get("/api/jobs/shared-1", headers=bearer(BOB)), 404)
    again = await client.post("/api/jobs", json={"id": "shared-1"}, headers=bearer(ALICE))
    assert (again.status_code, again.json()["created"]) == (200, False)
    assert await event_count(service.settings.db) == before


async def test_queue_position_counts_other_owners_jobs_in_the_same_queue(
        client: httpx.AsyncClient) -> None:
    """Pins a documented disclosure (README, Security): queues are shared by name, so bob's
    `queue_position` counts alice's queued jobs. Per-tenant queue names avoid it. A change
    here must be deliberate, and the README changed with it."""
    await new_job(client, ALICE, queue="exports")
    await new_job(client, ALICE, queue="exports")
    await new_job(client, ALICE)  # the "default" queue, shared by everyone too
    r = await client.post("/api/jobs", json={"queue": "exports"}, headers=bearer(BOB))
    assert r.json()["job"]["queue_position"] == 3
    r = await client.post("/api/jobs", json={}, headers=bearer(BOB))
    assert r.json()["job"]["queue_position"] == 2
    r = await client.post("/api/jobs", json={"queue": "bob:exports"}, headers=bearer(BOB))
    assert r.json()["job"]["queue_position"] == 1


# ---------------------------------------------------------------- workers


async def test_worker_token_opens_its_job_only(client: httpx.AsyncClient) -> None:
    """The worker token works as X-Worker-Token and as Bearer on every worker endpoint."""
    a_id, a_token = await new_job(client, ALICE)
    b_id, _ = await new_job(client, ALICE)
    for cred in ({"X-Worker-Token": a_token}, bearer(a_token)):
        for method, suffix, body, extra in WORKER_CALLS[1:3] + WORKER_CALLS[4:]:
            r = await call(client, a_id, method, suffix, body, {**extra, **cred})
            assert r.status_code == 200, (suffix, r.text)
            r = await call(client, b_id, method, suffix, body, {**extra, **cred})
            assert_error(r, 401)
    r = await call(client, a_id, *WORKER_CALLS[3][:3], {"X-Worker-Token": a_token})
    assert r.json()["job"]["status"] == "failed"


async def test_producer_token_acts_as_worker_for_own_jobs(client: httpx.AsyncClient) -> None:
    """A create-scope JWT may post to its own jobs as their worker, not to others'."""
    a_id, _ = await new_job(client, ALICE)
    r = await client.post(f"/api/jobs/{a_id}/progress", json={"progress": 30},
                          headers=bearer(ALICE))
    assert r.status_code == 200
    r = await client.get(f"/api/jobs/{a_id}/control", params={"access_token": ALICE})
    assert r.status_code == 200
    assert_error(await client.post(f"/api/jobs/{a_id}/progress", json={"progress": 40},
                                   headers=bearer(BOB)), 404)


async def test_only_the_hash_of_a_worker_token_is_stored(client: httpx.AsyncClient,
                                                         service: Service) -> None:
    """The database holds the sha256 of the worker token, never the token."""
    a_id, a_token = await new_job(client, ALICE)
    [(stored,)] = await fetch(service.settings.db, "SELECT token_hash FROM jobs WHERE id = ?",
                              a_id)
    everything = await dump(service.settings.db)
    assert stored == hashlib.sha256(a_token.encode()).hexdigest()
    assert a_token not in everything
    r = await client.get(f"/api/jobs/{a_id}", headers=bearer(ALICE))
    assert "token" not in r.text


async def test_admin_rotates_a_worker_token(client: httpx.AsyncClient,
                                            service: Service) -> None:
    """After rotation the new token works and the old one is a 401; no event is stored."""
    a_id, old = await new_job(client, ALICE)
    before = await event_count(service.settings.db)
    r = await client.post(f"/api/jobs/{a_id}/worker-token", headers=bearer(ROOT))
    assert r.status_code == 200, r.text
    new = r.json()["worker_token"]
    assert r.json()["job_id"] == a_id and new != old
    assert await event_count(service.settings.db) == before
    assert_error(await client.post(f"/api/jobs/{a_id}/log", json={"message": "x"},
                                   headers={"X-Worker-Token": old}), 401)
    r = await client.post(f"/api/jobs/{a_id}/log", json={"message": "x"},
                          headers={"X-Worker-Token": new})
    assert r.status_code == 200
    assert_error(await client.post("/api/jobs/nope/worker-token", headers=bearer(ROOT)), 404)
    assert_error(await client.post(f"/api/jobs/{a_id}/worker-token", json={"x": 1},
                                   headers=bearer(ROOT)), 400)


async def test_worker_token_is_optional_without_auth_but_checked(db: str) -> None:
    """With auth=none anyone on loopback may post, but a wrong worker token is a 401."""
    svc = await start_service(Settings(db=db))
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c:
            r = await c.post("/api/jobs", json={})
            job_id, good = r.json()["job"]["id"], r.json()["worker_token"]
            assert (await c.post(f"/api/jobs/{job_id}/log", json={"message": "a"})).status_code \
                == 200
            for cred in ({"X-Worker-Token": good}, bearer(good)):
                r = await c.post(f"/api/jobs/{job_id}/log", json={"message": "b"}, headers=cred)
                assert r.status_code == 200
            before = await event_count(db)
            for cred in ({"X-Worker-Token": "wrong"}, bearer("wrong"),
                         {"X-Worker-Token": ""}):
                r = await c.post(f"/api/jobs/{job_id}/log", json={"message": "c"}, headers=cred)
                if cred.get("X-Worker-Token") == "":
                    assert r.status_code == 200  # an empty header is no token
                    before += 1
                    continue
                assert_error(r, 401)
                r = await c.get(f"/api/jobs/{job_id}/control", headers=cred)
                assert_error(r, 401)
            assert await event_count(db) == before
            assert_error(await c.post("/api/jobs/nope/log", json={"message": "c"},
                                      headers={"X-Worker-Token": "wrong"}), 404)
    finally:
        await svc.stop()


# ---------------------------------------------------------------- limits and headers


@pytest.fixture
def quota_settings(db: str) -> Settings:
    return Settings(db=db, jwt_secret=SECRET, max_streams_per_user=2)


async def test_streams_per_user_are_limited_with_retry_after(quota_settings: Settings) -> None:
    """A user's third stream is a 429 with Retry-After; other users are not affected, and
    a closed stream frees its slot."""
    svc = await start_service(quota_settings)
    quota: StreamQuota = svc.ctx.stream_quota
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c, AsyncExitStack() as st:
            job_id, _ = await new_job(c, ALICE)
            first = await st.enter_async_context(
                aconnect_sse(c, "GET", "/api/events", headers=bearer(ALICE)))
            first_events = first.aiter_sse()  # kept: a collected iterator closes the stream
            await take(first_events, 1)
            async with aconnect_sse(c, "GET", f"/api/jobs/{job_id}/events",
                                    headers={**SSE, **bearer(ALICE)}) as second:
                second_events = second.aiter_sse()
                await take(second_events, 1)
                assert quota.open["alice"] == 2
                r = await c.get("/api/events", headers=bearer(ALICE))
                assert_error(r, 429, "too_many_streams")
                assert int(r.headers["retry-after"]) > 0
                r = await c.get(f"/api/jobs/{job_id}/events",
                                headers={**SSE, **bearer(ALICE)})
                assert_error(r, 429)
                async with aconnect_sse(c, "GET", "/api/events", headers=bearer(BOB)) as other:
                    await take(other.aiter_sse(), 1)
            await wait_for(lambda: quota.open["alice"] == 1, what="a slot freed")
            async with aconnect_sse(c, "GET", "/api/events", headers=bearer(ALICE)) as again:
                await take(again.aiter_sse(), 1)
            for _ in range(3):  # HEAD requests end at once and give their slot back
                assert (await c.head("/api/events", headers=bearer(ALICE))).status_code == 200
        await wait_for(lambda: not quota.open, what="every slot freed")
    finally:
        await svc.stop()


async def test_security_headers_on_every_response(client: httpx.AsyncClient) -> None:
    """JSON, errors, the dashboard, static 404s and streams carry CSP, nosniff and no-referrer."""
    responses = [await client.get("/healthz"), await client.get("/api/jobs"),
                 await client.get("/"), await client.get("/app.js"),
                 await client.get("/nothing-here.js"), await client.get("/openapi.json")]
    async with client.stream("GET", "/api/events", headers=bearer(ALICE)) as stream:
        responses.append(stream)
    for r in responses:
        assert r.headers["content-security-policy"] == CSP, r.url
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    assert responses[4].status_code == 404
    assert responses[4].json()["error"]["code"] == "not_found"


async def test_cors_allows_listed_origins_with_credentials(db: str) -> None:
    """Listed origins get a credentialed CORS answer naming them (never *); others nothing,
    and their preflights a JSON 403. (Starlette's CORSMiddleware answers an allowed
    preflight 200, where our own answered 204: both are what browsers take.)"""
    svc = await start_service(Settings(db=db, jwt_secret=SECRET,
                                       cors_origins="https://dash.example"))
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c:
            pre = {"Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "authorization, content-type"}
            r = await c.options("/api/jobs", headers={"Origin": "https://dash.example", **pre})
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == "https://dash.example"
            assert r.headers["access-control-allow-credentials"] == "true"
            assert "authorization" in r.headers["access-control-allow-headers"].lower()
            r = await c.options("/api/jobs", headers={"Origin": "https://evil.example", **pre})
            assert_error(r, 403, "cross_origin")
            assert "access-control-allow-origin" not in r.headers
            r = await c.get("/api/jobs", headers={"Origin": "https://dash.example",
                                                  **bearer(ALICE)})
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == "https://dash.example"
            assert "Origin" in r.headers["vary"]
            r = await c.post("/api/jobs", json={}, headers={"Origin": "https://dash.example",
                                                            **bearer(ALICE)})
            assert r.status_code == 201
            r = await c.post(f"/api/jobs/{r.json()['job']['id']}/progress", json={"progress": 3},
                             headers={"Origin": "https://dash.example", **bearer(ALICE)})
            assert r.status_code == 200  # a worker post: the same CORS answer
            assert r.headers["access-control-allow-origin"] == "https://dash.example"
            assert "Origin" in r.headers["vary"]
            r = await c.get("/api/jobs", headers={"Origin": "https://evil.example",
                                                  **bearer(ALICE)})
            assert "access-control-allow-origin" not in r.headers
    finally:
        await svc.stop()


async def test_cross_origin_writes_are_refused(client: httpx.AsyncClient,
                                               service: Service) -> None:
    """A POST from another site's page is a 403 and stores nothing; from the service's own
    page, or with no Origin (curl, workers), it goes through."""
    job_id, _ = await new_job(client, ALICE)
    before = await event_count(service.settings.db)
    for origin in ("https://evil.example", "null", service.url.replace("127.0.0.1", "localhost")):
        for path in ("/api/jobs", f"/api/jobs/{job_id}/cancel",
                     f"/api/jobs/{job_id}/progress"):
            r = await client.post(path, json={}, headers={"Origin": origin,
                                                          "Cookie": f"{COOKIE}={ALICE}"})
            assert_error(r, 403, "cross_origin")
            assert r.headers["x-request-id"] and r.headers["x-content-type-options"]
    assert await event_count(service.settings.db) == before
    r = await client.post("/api/jobs", json={}, headers={"Origin": service.url,
                                                         "Cookie": f"{COOKIE}={ALICE}"})
    assert r.status_code == 201
    r = await client.post("/api/jobs", json={}, headers={"Origin": "https://x.example",
                                                         "Sec-Fetch-Site": "same-origin",
                                                         **bearer(ALICE)})
    assert r.status_code == 201


async def test_foreign_host_names_are_refused_without_auth(db: str) -> None:
    """Without authentication a Host that is a foreign DNS name (DNS rebinding) is refused;
    localhost, IP addresses and single labels are served."""
    svc = await start_service(Settings(db=db))
    port = svc.settings.port
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c:
            job = (await c.post("/api/jobs", json={})).json()["job"]["id"]
            before = await event_count(db)
            for host in (f"attacker.example:{port}", "rebind.attacker.example"):
                r = await c.get("/api/jobs", headers={"Host": host})
                assert_error(r, 400, "host_not_allowed")
                r = await c.post("/api/jobs", json={}, headers={"Host": host})
                assert_error(r, 400)
                for hot in ("progress", "log", "events"):  # served past the stack
                    r = await c.request("GET" if hot == "events" else "POST",
                                        f"/api/jobs/{job}/{hot}",
                                        json={"progress": 1, "message": "m"},
                                        headers={"Host": host})
                    assert_error(r, 400, "host_not_allowed")
            assert await event_count(db) == before
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}",
                         "app.localhost", "b"):
                assert (await c.get("/api/jobs", headers={"Host": host})).status_code == 200
    finally:
        await svc.stop()


async def test_dashboard_sign_in_sets_the_cookie_and_drops_the_token(
        client: httpx.AsyncClient) -> None:
    """GET /?access_token= answers 303 to the same page without the token, with an HttpOnly
    SameSite=Strict cookie that then authenticates the API."""
    job_id, _ = await new_job(client, ALICE)
    r = await client.get("/", params={"job": job_id, "access_token": ALICE})
    assert r.status_code == 303
    assert r.headers["location"] == f"/?job={job_id}"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={ALICE};")
    for attr in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert attr in cookie
    jar = httpx.Cookies({COOKIE: ALICE})
    async with httpx.AsyncClient(base_url=str(client.base_url), cookies=jar) as browser:
        assert [j["id"] for j in (await browser.get("/api/jobs")).json()["jobs"]] == [job_id]
    r = await client.get(f"{client.base_url}//evil.example/", params={"access_token": ALICE})
    assert r.headers["location"] == "/evil.example/"  # never //evil.example: another site
    assert_error(await client.get("/", params={"access_token": "forged.to.ken"}), 401)
    assert_error(await client.get("/", params={"access_token": token("x", "create")}), 403)
    assert (await client.get("/")).status_code == 200  # the page itself is public


async def raw_get(port: int, target: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """GET with this exact request target (httpx would normalise it): the status, headers
    and body; status 0 when the server closes the connection without an answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Connection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    if not answer:
        return 0, {}, b""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in lines)
    return int(status.split()[1]), {k.lower(): v for k, v in fields.items()}, body


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_dashboard_sign_in_refuses_control_characters_in_the_path(
        db: str, http: str) -> None:
    """A control character in the path cannot go into the redirect's Location (the server
    refuses the header and drops the connection; urlsplit drops TAB, CR and LF silently):
    400 with the JSON error. Spaces and non-ASCII letters are percent-encoded."""
    svc = await start_service(Settings(db=db, jwt_secret=SECRET), http=http)
    query = b"?access_token=" + ALICE.encode()
    try:
        for char in (b"%00", b"%01", b"%09", b"%0B", b"%0C", b"%0D", b"%1F", b"%7F"):
            status, fields, body = await raw_get(svc.settings.port, b"/a" + char + b"b" + query)
            assert status == 400, (char, status)
            assert fields[b"content-type"] == b"application/json"
            assert json.loads(body)["error"]["code"] == "invalid_input"
            assert b"location" not in fields and b"set-cookie" not in fields
        # raw bytes never reach the app: the server answers 400 itself, without a drop
        for target in (b"/a\x00b", b"/a\x7fb"):
            assert (await raw_get(svc.settings.port, target + query))[0] == 400
        for path, location in ((b"/a%20", b"/a%20"), (b"/a%20b/", b"/a%20b/"),
                               (b"/%E2%82%AC", b"/%E2%82%AC"), (b"/%C3%A9", b"/%C3%A9"),
                               (b"//evil.example/", b"/evil.example/")):
            status, fields, _ = await raw_get(svc.settings.port, path + query + b"&job=j%001")
            assert (status, fields.get(b"location")) == (303, location + b"?job=j%001"), path
    finally:
        await svc.stop()


@pytest.mark.sqlite_only("the log of a separate process; redaction is not the store's")
async def test_access_token_is_redacted_in_every_log_line(tmp_path: Path) -> None:
    """Tokens sent as ?access_token= never reach the service's log, whatever the answer."""
    proc = ProcessService(db=str(tmp_path / "p.db"), port=free_port(),
                          env={"PROGRESS_SSE_JWT_SECRET": SECRET,
                               "PROGRESS_SSE_LOG_LEVEL": "debug"})
    proc.start()
    forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.forgedforgedforged"
    try:
        async with httpx.AsyncClient(base_url=proc.url, timeout=10) as c:
            q = {"access_token": ALICE}
            r = await c.post("/api/jobs", params=q, json={"title": "t"})
            job_id = r.json()["job"]["id"]
            answers = [r.status_code]
            for method, path, params, body in (
                    ("GET", "/api/jobs", q, None),
                    ("GET", f"/api/jobs/{job_id}/events", {**q, "after": "x"}, None),
                    ("POST", "/api/jobs", q, {"bad": 1}),
                    ("GET", "/api/jobs", {"access_token": forged}, None),
                    ("GET", "/", q, None),
                    ("GET", "/api/nothing", q, None),
                    ("GET", f"/api/jobs/{job_id}/control", {**q, "wait": "0"}, None)):
                r = await c.request(method, path, params=params, json=body)
                answers.append(r.status_code)
            async with aconnect_sse(c, "GET", "/api/events", params=q) as src:
                await take(src.aiter_sse(), 1)
        assert answers == [201, 200, 400, 400, 401, 303, 404, 200]
    finally:
        proc.stop()
    text = proc.log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    requests = [e for e in lines if e.get("event") == "request"]
    assert len(requests) >= 9
    assert ALICE not in text and forged not in text
    assert ALICE.split(".")[2] not in text  # not even the signature
    assert all("REDACTED" in e["query"] for e in requests if e.get("query")
               and e["path"] != "/healthz")


# ---------------------------------------------------------------- the dashboard, signed in


@pytest.mark.browser
@pytest.mark.sqlite_only("Chromium's view of the API, whose isolation runs on both stores above")
async def test_dashboard_signs_in_and_shows_own_jobs_under_the_real_csp(
        client: httpx.AsyncClient, service: Service) -> None:
    """In Chromium, /?access_token= signs in; the page shows alice's jobs only, live, under
    the service's own Content-Security-Policy, with no violations or script errors."""
    pytest.importorskip("playwright.async_api")
    from .browser import CHROMIUM, WATCH_SCRIPT, chromium, problems

    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.async_api import expect

    a_id, a_token = await new_job(client, ALICE, title="alice's export")
    b_id, _ = await new_job(client, BOB, title="bob's export")
    async with chromium() as browser:
        page = await (await browser.new_context()).new_page()
        await page.add_init_script(WATCH_SCRIPT)
        response = await page.goto(f"{service.url}/?access_token={ALICE}")
        assert response.headers["content-security-policy"] == CSP
        assert "access_token" not in page.url
        await expect(page.locator(f'article.job[data-job-id="{a_id}"]')).to_be_visible(
            timeout=8000)
        r = await client.post(f"/api/jobs/{a_id}/progress", json={"progress": 40},
                              headers={"X-Worker-Token": a_token})
        assert r.status_code == 200
        bar = page.locator(f'article.job[data-job-id="{a_id}"]').get_by_role("progressbar")
        await expect(bar).to_have_attribute("aria-valuenow", "40", timeout=8000)
        assert await page.locator(f'article.job[data-job-id="{b_id}"]').count() == 0
        await page.locator(f'article.job[data-job-id="{a_id}"] .act-cancel').click()
        await page.get_by_role("dialog").get_by_role("button", name="Cancel job").click()
        await expect(page.locator(f'article.job[data-job-id="{a_id}"] .status-badge')
                     ).to_have_text(re.compile("^Cancelling"), timeout=8000)
        assert await problems(page) == []

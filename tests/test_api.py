"""The JSON API over a real server, on each store."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from progress_sse.app import Service as App
from progress_sse.settings import Settings

from .helpers import Service, create_job, metric, start_service
from .stored import db_events

STORES = ("sqlite", "postgres")  # every test asking for `db` runs on both (conftest.py)
STAGES = [{"key": "fetch", "label": "Fetch", "weight": 1},
          {"key": "encode", "label": "Encode", "weight": 3}]


async def test_create_job_returns_job_and_worker_token(client: httpx.AsyncClient) -> None:
    """A created job starts queued, and its worker token is returned once."""
    r = await client.post("/api/jobs", json={"kind": "video", "title": "intro.mp4",
                                             "stages": STAGES, "total": 12,
                                             "meta": {"user": 7}})
    assert r.status_code == 201
    body = r.json()
    assert body["job"]["status"] == "queued"
    assert body["job"]["id"].startswith("j_")
    assert body["job"]["stages"][1] == {"key": "encode", "label": "Encode", "weight": 3.0}
    assert body["job"]["meta"] == {"user": 7}
    assert len(body["worker_token"]) >= 24
    assert body["event_id"] == 1


async def test_create_with_client_id_is_idempotent(client: httpx.AsyncClient,
                                                   service: Service) -> None:
    """Creating the same id twice answers the existing job with 200 and stores one event."""
    first = await client.post("/api/jobs", json={"id": "export-42", "kind": "export"})
    again = await client.post("/api/jobs", json={"id": "export-42", "kind": "export"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["job"]["id"] == "export-42"
    assert "worker_token" not in again.json()
    assert [e["type"] for e in await db_events(service.settings.db)] == ["created"]


async def test_progress_json_and_form(client: httpx.AsyncClient) -> None:
    """Progress accepts JSON and form bodies, and the first post starts the job."""
    job = await create_job(client, kind="pdf")
    r = await client.post(f"/api/jobs/{job['id']}/progress", json={"progress": 25.5,
                                                                   "message": "page 1"})
    assert r.status_code == 200, r.text
    assert r.json()["job"]["status"] == "running"
    assert r.json()["job"]["progress"] == 25.5
    assert r.json()["control"] == {"cancel_requested": False, "pause_requested": False,
                                   "reason": None, "status": "running", "attempt": 1}
    r = await client.post(f"/api/jobs/{job['id']}/progress",
                          content=b"progress=40&message=page+2",
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert r.json()["job"]["progress"] == 40.0
    assert r.json()["job"]["message"] == "page 2"
    assert r.json()["event_id"] == 3


async def test_integers_beyond_64_bits_are_refused_not_rounded(
        client: httpx.AsyncClient, service: Service) -> None:
    """Bodies parse with a fast parser that would read such an integer as a float and
    let it through rounded; a body with one takes the exact parser, so it is refused as
    before, naming the field. Long digit runs inside strings are only text."""
    job = await create_job(client)
    url = f"/api/jobs/{job['id']}/progress"
    big = 123456789012345678901234567890
    for raw in (b'{"progress": 1, "data": {"n": %d}}' % big,
                b'{"progress": 1, "data": [-%d]}' % big):
        r = await client.post(url, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["field"] == "data"
    assert [e["type"] for e in await db_events(service.settings.db)] == ["created"]
    r = await client.post(url, json={"progress": 2, "message": f"order {big}",
                                     "data": {"n": 2**62}})
    assert r.status_code == 200, r.text
    assert r.json()["job"]["message"] == f"order {big}"
    assert r.json()["job"]["data"] == {"n": 2**62}


async def test_current_total_and_stages(client: httpx.AsyncClient) -> None:
    """current/total gives the fraction of the current stage, weighted into the whole."""
    job = await create_job(client, stages=STAGES)
    url = f"/api/jobs/{job['id']}/progress"
    r = await client.post(url, json={"stage": "fetch", "current": 1, "total": 2})
    assert r.json()["job"]["progress"] == 12.5
    r = await client.post(url, json={"stage": "encode", "current": 3, "total": 12})
    assert r.json()["job"]["progress"] == 25 + 75 * 0.25
    assert r.json()["job"]["current"] == 3


async def test_progress_never_goes_backwards(client: httpx.AsyncClient) -> None:
    """A lower percentage is held, and the event says so."""
    job = await create_job(client)
    url = f"/api/jobs/{job['id']}/progress"
    await client.post(url, json={"progress": 60})
    r = await client.post(url, json={"progress": 30, "message": "retrying"})
    assert r.json()["job"]["progress"] == 60
    assert r.json()["job"]["message"] == "retrying"
    history = (await client.get(f"/api/jobs/{job['id']}/events")).json()["events"]
    assert history[-1]["held"] is True


async def test_log_and_finish(client: httpx.AsyncClient) -> None:
    """Log lines and the finish are events; succeeded sets 100%."""
    job = await create_job(client)
    r = await client.post(f"/api/jobs/{job['id']}/log", json={"level": "warning",
                                                              "message": "slow disk"})
    assert r.status_code == 200
    r = await client.post(f"/api/jobs/{job['id']}/finish",
                          json={"status": "succeeded", "result": {"url": "/x.mp4"}})
    assert r.status_code == 200
    done = r.json()["job"]
    assert (done["status"], done["progress"], done["result"]) == ("succeeded", 100.0,
                                                                  {"url": "/x.mp4"})
    assert done["final_event_id"] == r.json()["event_id"]
    types = [e["type"] for e in (await client.get(f"/api/jobs/{job['id']}/events")).json()
             ["events"]]
    assert types == ["created", "log", "finished"]


async def test_post_to_finished_job_is_409_and_stores_nothing(
        client: httpx.AsyncClient, service: Service) -> None:
    """A finished job refuses more posts and its log does not change."""
    job = await create_job(client)
    await client.post(f"/api/jobs/{job['id']}/finish", json={"status": "failed",
                                                             "error": "boom"})
    before = await db_events(service.settings.db)
    for path, body in (("progress", {"progress": 50}), ("log", {"message": "x"}),
                       ("finish", {"status": "succeeded"})):
        r = await client.post(f"/api/jobs/{job['id']}/{path}", json=body)
        assert r.status_code == 409, path
        assert r.json()["error"]["code"] == "job_finished"
    assert await db_events(service.settings.db) == before


async def test_get_and_list_jobs(client: httpx.AsyncClient) -> None:
    """Jobs are listed newest first, filtered by status and kind, paginated with a head."""
    ids = [(await create_job(client, kind="a" if i % 2 else "b"))["id"] for i in range(5)]
    await client.post(f"/api/jobs/{ids[0]}/progress", json={"progress": 1})
    r = await client.get("/api/jobs", params={"limit": 2})
    page = r.json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    # 5 created + 1 progress, and the 4 jobs queued behind the started one each moved up
    # a place within the first five (where every move is announced)
    assert page["head"] == 10
    r2 = await client.get("/api/jobs", params={"limit": 2, "before": page["next"]})
    assert [j["id"] for j in r2.json()["jobs"]] == ids[::-1][2:4]
    kinds = (await client.get("/api/jobs", params={"kind": "a"})).json()["jobs"]
    assert sorted(j["id"] for j in kinds) == sorted([ids[1], ids[3]])
    running = (await client.get("/api/jobs", params={"status": "running"})).json()["jobs"]
    assert [j["id"] for j in running] == [ids[0]]
    one = (await client.get(f"/api/jobs/{ids[0]}")).json()
    assert one["job"]["status"] == "running"
    assert one["control"]["cancel_requested"] is False


async def test_unknown_job_and_path_are_json_404(client: httpx.AsyncClient) -> None:
    """Unknown jobs and paths answer the JSON error shape."""
    for method, path in (("GET", "/api/jobs/nope"), ("POST", "/api/jobs/nope/progress"),
                         ("GET", "/api/jobs/nope/events"), ("GET", "/api/nothing")):
        r = await client.request(method, path, json={} if method == "POST" else None)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"
    r = await client.delete("/api/jobs")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert "allow" in r.headers  # (Starlette names the first matching route's methods)


async def test_a_mistyped_path_is_404_for_every_method(client: httpx.AsyncClient) -> None:
    """Issue 16: a POST to `/api/jobs/X/progres` answered 405 (the dashboard's mount at
    "/" took every path, and static files answer only GET). A path that no route has is
    404 whatever the method; a route of another method is 405 with `Allow`."""
    job = await create_job(client)
    for method, path in (("POST", f"/api/jobs/{job['id']}/progres"),
                         ("POST", "/api/jobs/X/progres"), ("PUT", "/api/job"),
                         ("POST", "/no-such-page"), ("DELETE", "/nope/deeper")):
        r = await client.request(method, path, json={"progress": 10})
        assert r.status_code == 404, (method, path, r.status_code)
        assert r.json()["error"] == {"code": "not_found", "message": f"no such path: {path}"}
    r = await client.get(f"/api/jobs/{job['id']}/progress")
    assert (r.status_code, r.headers["allow"]) == (405, "POST")
    assert (await client.get("/")).status_code == 200  # the dashboard is still served
    assert (await client.post("/")).status_code == 405  # a page, not an API path


async def test_json_sent_as_a_form_is_read_as_json(client: httpx.AsyncClient) -> None:
    """Issue 16: `curl -d '{"progress": 10}'` labels JSON as a form (curl's default);
    it answered "the form body is malformed". A body that is plainly a JSON object is
    read as one; a broken one, or a broken form, says how to label the request."""
    job = await create_job(client)
    url = f"/api/jobs/{job['id']}/progress"
    form = {"content-type": "application/x-www-form-urlencoded"}  # what curl -d sends
    r = await client.post(url, content=b'{"progress": 10, "message": "from curl"}',
                          headers=form)
    assert r.status_code == 200, r.text
    assert (r.json()["job"]["progress"], r.json()["job"]["message"]) == (10.0, "from curl")
    r = await client.post(url, content=b' {"progress": 12, "data": {"n": [1]}}\n',
                          headers=form)
    assert r.status_code == 200, r.text
    assert r.json()["job"]["data"] == {"n": [1]}
    r = await client.post(url, content=b'{"progress": 10,}', headers=form)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "not valid JSON" in message and "Content-Type: application/json" in message
    r = await client.post(url, content=b"progress=1&&=", headers=form)
    assert r.status_code == 400
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    r = await client.post(url, content=b"progress=20", headers=form)  # a form is a form
    assert r.json()["job"]["progress"] == 20.0


async def test_json_answers_end_with_a_newline(client: httpx.AsyncClient,
                                               service: Service) -> None:
    """Issue 16: so the shell prompt after `curl` starts on its own line. Every JSON
    answer (routed, hot, errors, refusals below the routing) ends with one, and its
    content-length counts it."""
    job = await create_job(client)
    answers = [await client.post("/api/jobs", json={}),
               await client.get("/api/jobs"),
               await client.get(f"/api/jobs/{job['id']}"),
               await client.get(f"/api/jobs/{job['id']}/events"),
               await client.post(f"/api/jobs/{job['id']}/progress", json={"progress": 1}),
               await client.post(f"/api/jobs/{job['id']}/progress", json={"progress": -1}),
               await client.post("/api/jobs/X/progres", json={}),
               await client.get("/api/jobs/nope"),
               await client.get("/healthz"),
               await client.get("/openapi.json"),
               await client.post("/api/jobs", json={}, headers={"origin": "http://evil"})]
    assert answers[-1].status_code == 403  # security.refuse, below the routing
    for r in answers:
        assert r.headers["content-type"] == "application/json", r.request.url
        assert r.content.endswith(b"}\n"), (r.request.url, r.content[-20:])
        assert int(r.headers["content-length"]) == len(r.content)
        json.loads(r.content)


async def test_healthz_and_metrics(client: httpx.AsyncClient) -> None:
    """Health checks the store; metrics are Prometheus text."""
    await create_job(client)
    r = await client.get("/healthz")
    assert r.json()["status"] == "ok"
    m = await client.get("/metrics")
    assert metric(m.text, "progress_sse_head_event_id") == 1
    assert metric(m.text, "progress_sse_writes_total") == 1  # the create, in one commit
    assert metric(m.text, "progress_sse_write_batches_total") == 1
    assert m.headers["content-type"].startswith("text/plain")


async def test_hot_routes_answer_like_the_router(client: httpx.AsyncClient) -> None:
    """Worker posts and streams skip the router but keep every answer's shape: request
    id and security headers, JSON errors; near misses fall through to the router."""
    job = await create_job(client)
    hot = [await client.post(f"/api/jobs/{job['id']}/progress", json={"progress": 5}),
           await client.post(f"/api/jobs/{job['id']}/progress", json={"progress": "x"}),
           await client.post("/api/jobs/nope/log", json={"message": "m"}),
           await client.get(f"/api/jobs/{job['id']}/events")]
    assert [r.status_code for r in hot] == [200, 400, 404, 200]
    assert hot[1].json()["error"]["field"] == "progress"
    async with client.stream("GET", "/api/events", headers={"accept": "text/event-stream"}) as r:
        hot.append(r)
        assert r.headers["content-type"].startswith("text/event-stream")
    for r in hot:
        assert r.headers["x-request-id"] and r.headers["x-content-type-options"] == "nosniff"
    # the same paths with another method, a trailing slash or an empty id: the router's
    # (405 for a route of another method, 404 for no such path: not the dashboard's)
    for method, path, status in (("GET", f"/api/jobs/{job['id']}/progress", 405),
                                 ("POST", f"/api/jobs/{job['id']}/progress/", 404),
                                 ("POST", "/api/jobs//progress", 404),
                                 ("POST", "/api/events", 405)):
        r = await client.request(method, path, json={"progress": 1})
        assert r.status_code == status, (method, path, r.status_code)
        assert r.json()["error"]["code"] in ("not_found", "method_not_allowed")


async def test_a_crash_in_a_worker_route_is_a_json_500_and_the_service_carries_on(
        db: str) -> None:
    """An exception that is not one of ours (a bug) answers like the router would: a 500
    in the error shape, with the request id, logged; the next request is served."""
    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    def break_progress(app: ASGIApp) -> ASGIApp:
        assert isinstance(app, App)
        routes = app.router.routes
        [at] = [i for i, r in enumerate(routes) if isinstance(r, Route)
                and r.path == "/api/jobs/{job_id}/progress" and "POST" in (r.methods or ())]
        routes[at] = Route("/api/jobs/{job_id}/progress", broken, methods=["POST"])
        return app

    svc = await start_service(Settings(db=db), wrap=break_progress)
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c:
            job = await create_job(c)
            r = await c.post(f"/api/jobs/{job['id']}/progress", json={"progress": 1})
            assert r.status_code == 500
            assert r.json()["error"]["code"] == "internal"
            assert r.headers["x-request-id"] and r.headers["x-content-type-options"]
            r = await c.post(f"/api/jobs/{job['id']}/log", json={"message": "still here"})
            assert r.status_code == 200
            assert (await c.get("/healthz")).json()["status"] == "ok"
    finally:
        await svc.stop()


async def test_worker_posts_pipelined_on_one_connection_then_closed(
        service: Service, client: httpx.AsyncClient) -> None:
    """Worker answers written whole to the connection keep HTTP/1.1 as uvicorn does it:
    pipelined posts answered in order on a kept-alive connection, each with the server's
    and the service's headers, and `Connection: close` honoured."""
    job = await create_job(client)
    reader, writer = await asyncio.open_connection("127.0.0.1", service.settings.port)

    def post(body: bytes, extra: bytes = b"") -> bytes:
        return (b"POST /api/jobs/%s/progress HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                % (job["id"].encode(), service.settings.port, len(body), extra, body))

    async def answer() -> tuple[bytes, dict[bytes, bytes], dict[str, Any]]:
        head = await reader.readuntil(b"\r\n\r\n")
        status, *lines = head[:-4].split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines)
        body = await reader.readexactly(int(headers[b"content-length"]))
        return status, headers, json.loads(body)

    try:
        async with asyncio.timeout(10):
            writer.write(post(b'{"progress": 10}') + post(b'{"progress": 20}'))
            for pct in (10, 20):
                status, headers, body = await answer()
                assert status == b"HTTP/1.1 200 OK"
                assert body["job"]["progress"] == pct
                assert headers[b"content-type"] == b"application/json"
                assert headers[b"x-content-type-options"] == b"nosniff"
                assert headers[b"x-request-id"] and b"date" in headers
                assert b"connection" not in headers
            writer.write(post(b'{"progress": 130}', b"Connection: close\r\n"))
            status, headers, body = await answer()
            assert status == b"HTTP/1.1 400 Bad Request" and body["error"]["field"] == "progress"
            assert headers[b"connection"] == b"close"
            assert await reader.read() == b""  # closed after the answer
    finally:
        writer.close()

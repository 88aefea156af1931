"""/metrics from a real service: today's series kept, the new ones counting what they say."""

from __future__ import annotations

from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

from progress_sse.settings import Settings

from .helpers import Service, create_job, metric, samples, start_service, wait_for

SSE = {"Accept": "text/event-stream"}
PROGRESS = "/api/jobs/{job_id}/progress"
# every series /metrics had before prometheus_client (names as exposed)
OLD = ("progress_sse_head_event_id", "progress_sse_open_streams", "progress_sse_live_streams",
       "progress_sse_stream_catch_ups_total", "progress_sse_snapshot_reads_total",
       "progress_sse_watched_jobs", "progress_sse_write_batches_total",
       "progress_sse_writes_total", "progress_sse_writes_redone_total",
       "progress_sse_write_timeouts_total", "progress_sse_store_writable")


def requests(text: str, route: str, method: str, status: str) -> float:
    return metric(text, "progress_sse_request_duration_seconds_count", route=route,
                  method=method, status=status)


async def test_metrics_after_posts_and_a_stream(client: httpx.AsyncClient,
                                                service: Service) -> None:
    job = await create_job(client)
    posts = 7
    async with aconnect_sse(client, "GET", "/api/events", headers=SSE) as source:
        events = source.aiter_sse()
        assert (await anext(events)).event == "snapshot"
        await wait_for(lambda: service.ctx.hub.live == 1, what="the stream caught up")
        for i in range(posts):
            r = await client.post(f"/api/jobs/{job['id']}/progress", json={"progress": i})
            assert r.status_code == 200, r.text
        for _ in range(posts):
            await anext(events)
        assert (await client.get("/api/nope")).status_code == 404
        r = await client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=")
    text = r.text
    names = {name for name, _ in samples(text)}
    assert set(OLD) <= names, set(OLD) - names

    # today's series, with their meaning
    head = metric(text, "progress_sse_head_event_id")
    assert head == 1 + posts  # the create's event and one per post
    assert metric(text, "progress_sse_open_streams") == 1
    assert metric(text, "progress_sse_live_streams") == 1
    assert metric(text, "progress_sse_stream_catch_ups_total") >= 1
    assert metric(text, "progress_sse_snapshot_reads_total") == 1
    assert metric(text, "progress_sse_store_writable") == 1
    writes = metric(text, "progress_sse_writes_total")
    batches = metric(text, "progress_sse_write_batches_total")
    assert writes == 1 + posts and 1 <= batches <= writes

    # request durations by route template, never the raw path
    assert requests(text, PROGRESS, "POST", "200") == posts
    assert requests(text, "/api/jobs", "POST", "201") == 1
    assert requests(text, "/api/events", "GET", "200") == 1  # the stream, timed to its start
    assert requests(text, "unmatched", "GET", "404") == 1
    assert metric(text, "progress_sse_request_duration_seconds_sum", route=PROGRESS,
                  method="POST", status="200") > 0
    assert not any(job["id"] in dict(labels).get("route", "") for _, labels in samples(text))
    # commits: one observation per group commit, carrying every write
    assert metric(text, "progress_sse_commit_batch_size_count") == batches
    assert metric(text, "progress_sse_commit_batch_size_sum") == writes
    assert metric(text, "progress_sse_commit_seconds_count") == batches
    assert metric(text, "progress_sse_commit_seconds_sum") > 0
    assert metric(text, "progress_sse_commit_seconds_bucket", le="+Inf") == batches
    # events published: every committed event, since this service started on a new file
    assert metric(text, "progress_sse_events_published_total") == head

    # the stream gone, the gauges say so at the next scrape
    await wait_for(lambda: service.ctx.hub.streams == 0, what="stream released")
    text = (await client.get("/metrics")).text
    assert metric(text, "progress_sse_open_streams") == 0
    assert metric(text, "progress_sse_live_streams") == 0
    assert requests(text, "/metrics", "GET", "200") == 1  # the scrape before this one


async def test_two_apps_in_one_process_count_apart(settings: Settings, tmp_path: Path) -> None:
    """Each app has its own registry: nothing of one shows in the other's /metrics."""
    other = settings.model_copy(update={"db": f"{tmp_path}/other.db"})
    one, two = await start_service(settings), await start_service(other)
    try:
        async with httpx.AsyncClient(base_url=one.url, timeout=10) as c1, \
                httpx.AsyncClient(base_url=two.url, timeout=10) as c2:
            job = await create_job(c1)
            for i in range(3):
                r = await c1.post(f"/api/jobs/{job['id']}/progress", json={"progress": i})
                assert r.status_code == 200
            await create_job(c2)
            text1, text2 = (await c1.get("/metrics")).text, (await c2.get("/metrics")).text
    finally:
        await one.stop()
        await two.stop()
    assert requests(text1, PROGRESS, "POST", "200") == 3
    assert ("progress_sse_request_duration_seconds_count",
            frozenset({("route", PROGRESS), ("method", "POST"), ("status", "200")})
            ) not in samples(text2)
    assert requests(text1, "/api/jobs", "POST", "201") == 1
    assert requests(text2, "/api/jobs", "POST", "201") == 1
    assert metric(text1, "progress_sse_events_published_total") == 4
    assert metric(text2, "progress_sse_events_published_total") == 1
    assert metric(text1, "progress_sse_commit_batch_size_sum") == 4
    assert metric(text2, "progress_sse_commit_batch_size_sum") == 1


async def test_methods_a_client_makes_up_are_one_label(settings: Settings) -> None:
    """A method no HTTP client uses counts as "other": a client names the method (h11
    takes any token), and each name kept as a label would be a series held for the
    process's life."""
    svc = await start_service(settings, http="h11")
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            for i in range(20):
                await client.request(f"X{i}", "/api/jobs")
            text = (await client.get("/metrics")).text
    finally:
        await svc.stop()
    methods = {dict(labels).get("method") for name, labels in samples(text)
               if name == "progress_sse_request_duration_seconds_count"}
    assert not any(m.startswith("X") for m in methods if m), methods
    assert requests(text, "/api/jobs", "other", "405") == 20

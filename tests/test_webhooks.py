"""Completion webhooks through the durable outbox, against a real HTTP receiver on a
loopback port (tests/webhook_receiver.py) and real service processes: retried across
restarts and delivered once, signed as Standard Webhooks say; delivered after a kill -9
right after the finish; a hanging receiver slows neither posts nor other receivers;
the SSRF rules; two instances on one PostgreSQL database send each delivery once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from progress_sse.client import APIError, AsyncProgressClient, ProgressClient
from progress_sse.errors import ConfigError
from progress_sse.settings import Settings
from progress_sse.store.postgres_schema import is_postgres

from . import pg
from .helpers import Service, create_job, free_port, metric, start_service, wait_for
from .pg import PgProcess
from .stored import fetch
from .webhook_receiver import HANG, Receiver

STORES = ("sqlite", "postgres")
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def env(**values: str) -> dict[str, str]:
    """The service's environment for webhooks: signed, retried after 1-2 s, 3 s per try."""
    base = {"webhook_secret": SECRET, "webhook_retry_min": "2", "webhook_timeout": "3"}
    return {f"PROGRESS_SSE_{k.upper()}": v for k, v in {**base, **values}.items()}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver().start()
    yield rx
    rx.stop()


@contextlib.asynccontextmanager
async def process(db: str, tmp_path: Path, environ: dict[str, str]
                  ) -> AsyncIterator[PgProcess]:
    proc = PgProcess(db, free_port(), tmp_path, environ)
    await asyncio.to_thread(proc.start)
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.stop)


async def finished_job(url: str, **fields: Any) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        job = await create_job(c, **fields)
        r = await c.post(f"/api/jobs/{job['id']}/finish",
                         json={"status": "succeeded", "result": {"rows": 3}})
        assert r.status_code == 200, r.text
        return str(job["id"])


async def notifications(url: str, job_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        r = await c.get(f"/api/jobs/{job_id}")
        assert r.status_code == 200, r.text
        found: list[dict[str, Any]] = r.json()["notifications"]
        return found


async def test_retried_across_restarts_arrives_once_and_verifies(
        db: str, tmp_path: Path, receiver: Receiver) -> None:
    """500, restart, 500, restart, 200: one success, the same webhook-id on every
    attempt, its signature verified by the standardwebhooks library."""
    receiver.script = [500, 500]
    environ = env(webhook_url=receiver.url)
    async with process(db, tmp_path, environ) as svc:
        job_id = await finished_job(svc.url, title="export")
        await wait_for(lambda: _failed(svc.url, job_id, 1), 10, what="the first attempt")
    async with process(db, tmp_path, environ) as svc:
        await wait_for(lambda: _failed(svc.url, job_id, 2), 15, what="the second attempt")
    async with process(db, tmp_path, environ) as svc:
        await wait_for(lambda: len(receiver.successes()) >= 1, 20, what="the success")
        await wait_for(lambda: _delivered(svc.url, job_id), 5, what="delivered")
        [note] = await notifications(svc.url, job_id)
        await asyncio.sleep(0.5)  # nothing more may arrive
    assert receiver.answered == [500, 500, 200]
    [ok] = receiver.successes()
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    payload = Webhook(SECRET).verify(ok.body, ok.headers)
    assert payload["type"] == "finished" and payload["status"] == "succeeded"
    assert payload["job"]["id"] == job_id and payload["job"]["result"] == {"rows": 3}
    stored = await fetch(db, "SELECT body FROM events WHERE type = 'finished'")
    assert ok.body.decode() == stored[0][0]  # the event exactly as streams carry it
    assert note == {"channel": "service_webhook", "event_id": payload["id"],
                    "status": "delivered", "attempts": 3, "last_error": "HTTP 500",
                    "next_attempt_at": None}
    with pytest.raises(WebhookVerificationError):  # and a tampered body does not verify
        Webhook(SECRET).verify(ok.body.replace(b"succeeded", b"failed"), ok.headers)


async def _failed(url: str, job_id: str, attempts: int) -> bool:
    """The notification's `attempts`-th attempt has failed and is recorded so."""
    found = await notifications(url, job_id)
    return bool(found) and found[0]["attempts"] == attempts \
        and found[0]["last_error"] == "HTTP 500"


async def _delivered(url: str, job_id: str) -> bool:
    return [n["status"] for n in await notifications(url, job_id)] == ["delivered"]


async def test_kill_9_right_after_the_finish_still_delivers(
        db: str, tmp_path: Path) -> None:
    """The finish is answered, the service is killed at once, with the receiver not
    yet listening: after a restart the webhook arrives (the outbox row was committed
    with the event)."""
    port = free_port()  # nothing listens here yet
    url = f"http://127.0.0.1:{port}/hook"
    proc = PgProcess(db, free_port(), tmp_path, env(webhook_url=url))
    await asyncio.to_thread(proc.start)
    try:
        job_id = await finished_job(proc.url)
        proc.kill()
    finally:
        await asyncio.to_thread(proc.stop)
    rows = await fetch(db, "SELECT status, channel FROM notifications WHERE job_id = ?",
                       job_id)
    assert rows == [("pending", "service_webhook")]
    rx = Receiver(port=port).start()
    try:
        async with process(db, tmp_path, env(webhook_url=url)) as svc:
            # on PostgreSQL a claim the killed process held comes back after its lease
            await wait_for(lambda: len(rx.successes()) == 1, 30, what="the webhook")
            await wait_for(lambda: _delivered(svc.url, job_id), 5, what="delivered")
        assert json.loads(rx.successes()[0].body)["job_id"] == job_id
    finally:
        rx.stop()


def hooks(db: str, **values: Any) -> Settings:
    base: dict[str, Any] = {"webhook_secret": SECRET, "webhook_retry_min": 0.3,
                            "webhook_timeout": 2.0}
    return Settings(db=db, **{**base, **values})


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[Service, httpx.AsyncClient]]:
    svc = await start_service(settings)
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c:
            yield svc, c
    finally:
        await svc.stop()


async def test_an_unlisted_origin_is_refused_naming_webhook(db: str, receiver: Receiver
                                                            ) -> None:
    """A job's webhook must point at an origin WEBHOOK_ORIGINS lists (SSRF): any other
    origin, scheme or port is a 400 naming `webhook`, and nothing is stored."""
    async with serving(hooks(db, webhook_origins=receiver.origin)) as (_, c):
        for url in ("http://169.254.169.254/latest/meta-data", "http://127.0.0.1:1/hook",
                    receiver.url.replace("http://", "https://"), "file:///etc/passwd",
                    f"http://user@{receiver.origin[7:]}/hook", "not a url"):
            r = await c.post("/api/jobs", json={"webhook": url})
            assert r.status_code == 400, (url, r.text)
            assert r.json()["error"]["field"] == "webhook", r.text
        r = await c.post("/api/jobs", json={"webhook": receiver.url + "?x=1"})
        assert r.status_code == 201, r.text
        [(n,)] = await fetch(db, "SELECT COUNT(*) FROM jobs")
        assert n == 1


async def test_mail_is_refused_without_smtp(db: str) -> None:
    """notify_email on a service with no SMTP_URL is a 400 naming `notify_email`."""
    async with serving(Settings(db=db)) as (_, c):
        for value in ("ops@example.com", ["ops@example.com", "dev@example.com"]):
            r = await c.post("/api/jobs", json={"notify_email": value})
            assert r.status_code == 400 and r.json()["error"]["field"] == "notify_email"
        r = await c.post("/api/jobs", json={"webhook": "http://127.0.0.1:9/x"})
        assert r.status_code == 400 and r.json()["error"]["field"] == "webhook"


async def test_a_redirect_is_not_followed(db: str, receiver: Receiver) -> None:
    """A receiver answering 302 to another URL: the other URL never gets a request, and
    the delivery is retried, then given up, with the redirect as its reason."""
    elsewhere = Receiver().start()
    try:
        receiver.default = 302
        receiver.location = elsewhere.url
        settings = hooks(db, webhook_origins=receiver.origin, webhook_max_age=1.5)
        async with serving(settings) as (svc, c):
            job_id = await finished_job(svc.url, webhook=receiver.url)
            await wait_for(lambda: _status(svc.url, job_id, "failed"), 15, what="given up")
            [note] = await notifications(svc.url, job_id)
            text = (await c.get("/metrics")).text
        assert note["channel"] == "webhook" and note["attempts"] >= 2, note
        assert "HTTP 302" in note["last_error"] and "not followed" in note["last_error"]
        assert len(receiver.requests) == note["attempts"]
        assert elsewhere.requests == []
        assert metric(text, "progress_sse_notifications_failed_total") == 1
    finally:
        elsewhere.stop()


async def _equal(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


async def _status(url: str, job_id: str, status: str) -> bool:
    return any(n["status"] == status for n in await notifications(url, job_id))


async def test_giving_up_is_logged_once_with_the_reason(db: str, receiver: Receiver) -> None:
    """A receiver that always fails: retried with backoff until WEBHOOK_MAX_AGE, then
    `failed`, one log line with the reason, and counted in /metrics."""
    from structlog.testing import capture_logs

    receiver.default = 503
    with capture_logs() as logs:
        async with serving(hooks(db, webhook_url=receiver.url, webhook_max_age=2.0)
                           ) as (svc, c):
            job_id = await finished_job(svc.url)
            await wait_for(lambda: _status(svc.url, job_id, "failed"), 15, what="given up")
            await asyncio.sleep(0.5)
            text = (await c.get("/metrics")).text
    gave_up = [e for e in logs if e["event"] == "notify.gave_up"]
    assert len(gave_up) == 1, gave_up
    assert "HTTP 503" in gave_up[0]["reason"] and gave_up[0]["job_id"] == job_id
    assert 2 <= len(receiver.requests) <= 6, receiver.answered  # backoff, not a loop
    assert metric(text, "progress_sse_notifications_failed_total") == 1
    assert metric(text, "progress_sse_notifications_delivered_total") == 0


async def test_stalled_is_sent_only_to_jobs_that_asked(db: str, receiver: Receiver) -> None:
    """webhook_events ["stalled", "finished"]: the job's webhook hears of its stall and
    its finish; a job that did not ask hears of its finish only."""
    settings = hooks(db, webhook_origins=receiver.origin, stall_check_s=0.1)
    async with serving(settings) as (_, c):
        asked = await create_job(c, webhook=receiver.url + "/asked", heartbeat_timeout_s=1,
                                 webhook_events=["stalled", "finished"])
        plain = await create_job(c, webhook=receiver.url + "/plain", heartbeat_timeout_s=1)
        for job in (asked, plain):
            await c.post(f"/api/jobs/{job['id']}/progress", json={"progress": 5})
        await wait_for(lambda: len(receiver.requests) >= 1, 10, what="the stall webhook")
        for job in (asked, plain):
            await c.post(f"/api/jobs/{job['id']}/finish", json={"status": "failed",
                                                                "error": "boom"})
        await wait_for(lambda: len(receiver.requests) >= 3, 10, what="the finish webhooks")
        await asyncio.sleep(0.3)
    seen = sorted((r.path, json.loads(r.body)["type"], json.loads(r.body).get("stalled"))
                  for r in receiver.requests)
    assert seen == [("/hook/asked", "finished", None), ("/hook/asked", "status", True),
                    ("/hook/plain", "finished", None)]


def test_webhooks_are_refused_without_a_signing_secret() -> None:
    """WEBHOOK_URL or WEBHOOK_ORIGINS without a whsec_ secret, or a bad URL or origin,
    stops the service at start with a clear message."""
    for values, said in (
            ({"webhook_url": "http://hooks.example/x"}, "PROGRESS_SSE_WEBHOOK_SECRET"),
            ({"webhook_origins": "http://hooks.example"}, "PROGRESS_SSE_WEBHOOK_SECRET"),
            ({"webhook_url": "http://hooks.example/x", "webhook_secret": "hunter2"},
             "whsec_"),
            ({"webhook_url": "ftp://hooks.example/x", "webhook_secret": SECRET},
             "webhook_url"),
            ({"webhook_origins": "http://hooks.example/path", "webhook_secret": SECRET},
             "webhook_origins"),
            ({"webhook_origins": "https://*.example.com", "webhook_secret": SECRET},
             "webhook_origins")):
        with pytest.raises(ConfigError, match=said):
            Settings.load(**values)
    Settings.load(webhook_url="https://hooks.example/x", webhook_secret=SECRET,
                  webhook_origins="https://a.example, http://127.0.0.1:8080")


async def posts_per_second(url: str, job_ids: list[str], seconds: float) -> float:
    """Progress posts answered per second by 32 workers posting as fast as they can."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker(c: httpx.AsyncClient, job_id: str) -> None:
        nonlocal done
        n = 0
        while time.monotonic() < stop:
            n += 1
            r = await c.post(f"/api/jobs/{job_id}/progress", json={"current": n})
            assert r.status_code == 200, r.text
            done += 1

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as c:
        started = time.monotonic()
        await asyncio.gather(*(worker(c, j) for j in job_ids))
        return done / (time.monotonic() - started)


async def test_a_hanging_receiver_slows_neither_posts_nor_other_receivers(
        db: str, tmp_path: Path, receiver: Receiver) -> None:
    """40 finished jobs whose service-wide webhook never answers: posts/s in the same
    run stays at 0.7x or more of the mean of before them and after the receiver answers
    again, a stream still gets events at once, and another receiver still gets its
    webhook within seconds."""
    other = Receiver().start()
    receiver.default = HANG
    environ = env(webhook_url=receiver.url, webhook_origins=other.origin,
                  webhook_timeout="10")
    try:
        async with process(db, tmp_path, environ) as svc, \
                httpx.AsyncClient(base_url=svc.url, timeout=10) as c:
            workers = [(await create_job(c))["id"] for _ in range(32)]
            await posts_per_second(svc.url, workers, 1.0)  # warm up
            before = await posts_per_second(svc.url, workers, 3.0)
            for _ in range(40):
                await finished_job(svc.url)
            await wait_for(lambda: len(receiver.requests) >= 2, 10, what="hanging attempts")
            during = await posts_per_second(svc.url, workers, 3.0)
            # another receiver: its job's webhook arrives while the hanging ones wait
            started = time.monotonic()
            await finished_job(svc.url, webhook=other.url)
            await wait_for(lambda: len(other.successes()) == 1, 5, what="the other receiver")
            other_s = time.monotonic() - started
            # a stream: an event posted now arrives at once
            job = await create_job(c)
            async with c.stream("GET", "/api/events", params={"job": job["id"]}) as s:
                lines = s.aiter_lines()
                async for line in lines:
                    if line.startswith("event: snapshot"):
                        break
                posted = time.monotonic()
                await c.post(f"/api/jobs/{job['id']}/progress", json={"progress": 50})
                async with asyncio.timeout(5):
                    async for line in lines:
                        if line.startswith("event: progress"):
                            break
                stream_s = time.monotonic() - posted
            hanging = len(receiver.requests)
            # and without again, once the receiver answers (drift of a shared machine)
            receiver.default = 200
            receiver.release()
            try:
                await wait_for(lambda: len(receiver.successes()) >= 40, 30, what="40 webhooks")
            except AssertionError:  # seen once, not since: say what the receiver saw
                raise AssertionError(f"answers: {receiver.answered}") from None
            after = await posts_per_second(svc.url, workers, 3.0)
    finally:
        other.stop()
    without = (before + after) / 2
    print(f"posts/s without a hanging receiver {before:.0f} and {after:.0f}, with one "
          f"{during:.0f} ({during / without:.2f}x); other receiver {other_s:.2f} s; stream "
          f"{stream_s:.3f} s; {hanging} hanging attempts")
    assert during >= 0.7 * without, (before, during, after)
    assert other_s < 3 and stream_s < 1
    assert hanging <= 4  # at most per_target (2) at a time on the dead receiver


async def test_two_instances_send_each_delivery_once(pg_dsn: str, tmp_path: Path,
                                                     receiver: Receiver) -> None:
    """Two service processes on one PostgreSQL database, 30 jobs finished across both,
    a receiver that takes 0.2 s per request: every webhook-id arrives exactly once
    (SKIP LOCKED claims; the tail wakes both deliverers for every finish)."""
    db = pg_dsn
    await pg.empty(db)
    receiver.delay_s = 0.2
    environ = env(webhook_url=receiver.url)
    async with process(db, tmp_path, environ) as a, process(db, tmp_path, environ) as b:
        jobs = await asyncio.gather(*(finished_job((a, b)[i % 2].url) for i in range(30)))
        await wait_for(lambda: len(receiver.successes()) >= 30, 20, what="30 webhooks")
        await asyncio.sleep(1.0)  # any duplicate would come now
        async with httpx.AsyncClient(timeout=10) as c:
            texts = [(await c.get(s.url + "/metrics")).text for s in (a, b)]
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert len(ids) == len(set(ids)) == 30, sorted(ids)
    assert {json.loads(r.body)["job_id"] for r in receiver.requests} == set(jobs)
    counts = [metric(t, "progress_sse_notifications_delivered_total") for t in texts]
    assert sum(counts) == 30
    print(f"delivered by each instance: {counts}")


async def test_a_claim_held_by_a_killed_instance_comes_back(
        db: str, tmp_path: Path, receiver: Receiver) -> None:
    """The service is killed while its attempt hangs (the row claimed): after a restart
    the notification is sent again and delivered, with the same webhook-id (SQLite:
    at once, the file's one service takes its claims back; PostgreSQL: once the dead
    claim's lease, 2 x 2 s + 5 s here, has passed)."""
    receiver.script = [HANG]
    environ = env(webhook_url=receiver.url, webhook_timeout="2")
    proc = PgProcess(db, free_port(), tmp_path, environ)
    await asyncio.to_thread(proc.start)
    try:
        job_id = await finished_job(proc.url)
        await wait_for(lambda: len(receiver.requests) == 1, 10, what="the hanging attempt")
        proc.kill()
    finally:
        await asyncio.to_thread(proc.stop)
    [(claimed_until, attempts)] = await fetch(
        db, "SELECT claimed_until, attempts FROM notifications WHERE job_id = ?", job_id)
    assert claimed_until > time.time() and attempts == 1  # held by the dead process
    started = time.monotonic()
    async with process(db, tmp_path, environ) as svc:
        await wait_for(lambda: len(receiver.successes()) == 1, 20, what="the retry")
        waited = time.monotonic() - started
        await wait_for(lambda: _delivered(svc.url, job_id), 5, what="delivered")
    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    print(f"delivered {waited:.1f} s after the restart began")
    if not is_postgres(db):
        assert waited < 5  # not the lease: taken back at start


async def test_a_stopped_instance_lets_go_of_its_claims(
        db: str, tmp_path: Path, receiver: Receiver) -> None:
    """SIGTERM while an attempt hangs: the attempt ends and its row is due again at
    once, not held until its lease runs out (another instance may take it now)."""
    receiver.script = [HANG]
    proc = PgProcess(db, free_port(), tmp_path, env(webhook_url=receiver.url,
                                                    webhook_timeout="10"))
    await asyncio.to_thread(proc.start)
    try:
        job_id = await finished_job(proc.url)
        await wait_for(lambda: len(receiver.requests) == 1, 10, what="the hanging attempt")
    finally:
        await asyncio.to_thread(proc.stop)
    assert "service.stopped" in proc.log_path.read_text()  # stopped, not killed
    [(status, claimed_until, error)] = await fetch(
        db, "SELECT status, claimed_until, last_error FROM notifications WHERE job_id = ?",
        job_id)
    assert (status, claimed_until) == ("pending", 0)
    assert error == "the service stopped during the attempt"


async def test_ended_notifications_are_pruned_and_pending_ones_kept(
        db: str, receiver: Receiver) -> None:
    """The outbox does not grow for ever: delivered (and failed) rows older than the
    retention go, a page per transaction; a pending one stays, whatever its age."""
    failing = Receiver(default=500).start()
    try:
        settings = hooks(db, webhook_url=failing.url, webhook_origins=receiver.origin,
                         webhook_retry_min=30)
        async with serving(settings) as (svc, c):
            job_id = await finished_job(svc.url, webhook=receiver.url)
            await wait_for(lambda: len(receiver.successes()) == 1 and failing.requests, 10,
                           what="both attempts")
            await wait_for(lambda: _status(svc.url, job_id, "delivered"), 5, what="delivered")
            notes = svc.ctx.notifications
            assert notes is not None

            async def pending() -> float:
                return metric((await c.get("/metrics")).text,
                              "progress_sse_notifications_pending")

            await wait_for(lambda: _equal(pending(), 1), 5, what="one pending in /metrics")
            assert await notes.outbox.prune(3600.0, 1000) == 0  # too recent
            assert await notes.outbox.prune(0.0, 1000) == 1
            left = await notifications(svc.url, job_id)
    finally:
        failing.stop()
    assert [(n["channel"], n["status"]) for n in left] == [("service_webhook", "pending")]


async def test_the_sdk_asks_for_notifications(db: str, receiver: Receiver) -> None:
    """The SDK's create and job() carry webhook, webhook_events and notify_email, in
    both drivers: the finish of each job reaches its webhook; mail without SMTP is
    refused naming the field."""
    async with serving(hooks(db, webhook_origins=receiver.origin)) as (svc, _):
        async with AsyncProgressClient(svc.url) as apc:
            async with apc.job(kind="aio", webhook=receiver.url + "/aio",
                               webhook_events=["finished"]) as job:
                await job.progress(50)
            created = await apc.create(kind="made", webhook=receiver.url + "/made")
            made = apc.attach(created.job["id"], token=created.worker_token)
            await made.finish("failed", error="boom")
            with pytest.raises(APIError) as refused:
                await apc.create(notify_email=["ops@example.com"])
            assert refused.value.field == "notify_email"

        def sync_job() -> None:
            with ProgressClient(svc.url) as pc, \
                    pc.job(kind="sync", webhook=receiver.url + "/sync") as job:
                job.progress(50)
        await asyncio.to_thread(sync_job)
        await wait_for(lambda: len(receiver.requests) >= 3, 15, what="three webhooks")
    seen = sorted((r.path, json.loads(r.body)["job"]["status"]) for r in receiver.requests)
    assert seen == [("/hook/aio", "succeeded"), ("/hook/made", "failed"),
                    ("/hook/sync", "succeeded")]

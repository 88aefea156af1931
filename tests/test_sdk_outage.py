"""The worker SDK through outages of the service: reporting never ends the work.

While the service is unreachable, posts wait in the job's bounded outbox and the
worker's loop goes on; they are flushed in order when the service is back. The real
restarts use a separate service process (kill -9, then started again on the same port
and database); the buffer's bounds and the finish timeout use a fake service behind
httpx.MockTransport, so they are exact and quick.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from progress_sse.client import (
    AsyncJob,
    AsyncProgressClient,
    Job,
    NotRecorded,
    ProgressClient,
    ServiceUnavailable,
)

from .helpers import ROOT, ProcessService, free_port, stored_log, wait_for

STAGES = [{"key": "download", "label": "Download", "weight": 1},
          {"key": "transcode", "label": "Transcode", "weight": 6}]
TERMINAL = {"succeeded", "failed", "cancelled"}
CHUNKS = 40


# ------------------------------------------------ the README's loop, across a restart


@dataclass
class Loop:
    """What the worker's loop saw, and the handshake with the test that kills the service."""

    kill_now: threading.Event = field(default_factory=threading.Event)
    killed: threading.Event = field(default_factory=threading.Event)
    restart_now: threading.Event = field(default_factory=threading.Event)
    chunks: int = 0
    slowest_call: float = 0.0
    most_pending: int = 0
    saw_unreachable: bool = False
    job: Job | AsyncJob | None = None

    def chunk_done(self, i: int, job: Job | AsyncJob, took: float) -> None:
        self.chunks = i
        self.slowest_call = max(self.slowest_call, took)
        self.most_pending = max(self.most_pending, job.pending)
        self.saw_unreachable = self.saw_unreachable or job.unreachable


def client_options() -> dict[str, Any]:
    """Few, quick retries: the old SDK gave up within a second, so an outage of a few
    seconds is as long, for it, as the user's 11 s were for the default retries."""
    return {"retries": 1, "backoff": 0.05, "max_rate": 20, "heartbeat_interval": 0.3}


def sync_worker(url: str, loop: Loop) -> None:
    with ProgressClient(url, **client_options()) as pc, \
            pc.job(kind="video", title="intro.mp4", stages=STAGES) as job:
        loop.job = job
        job.stage("download")
        job.stage("transcode")
        for i in range(1, CHUNKS + 1):
            time.sleep(0.05)  # encode(chunk)
            started = time.monotonic()
            job.progress(current=i, total=CHUNKS, message=f"chunk {i}")
            if i % 5 == 0:
                job.log(f"after chunk {i}")
            job.checkpoint()
            loop.chunk_done(i, job, time.monotonic() - started)
            if i == 10:
                loop.kill_now.set()
                assert loop.killed.wait(20)
            if i == 30:
                loop.restart_now.set()


async def async_worker(url: str, loop: Loop) -> None:
    async with AsyncProgressClient(url, **client_options()) as pc, \
            pc.job(kind="video", title="intro.mp4", stages=STAGES) as job:
        loop.job = job
        await job.stage("download")
        await job.stage("transcode")
        for i in range(1, CHUNKS + 1):
            await asyncio.sleep(0.05)
            started = time.monotonic()
            await job.progress(current=i, total=CHUNKS, message=f"chunk {i}")
            if i % 5 == 0:
                await job.log(f"after chunk {i}")
            await job.checkpoint()
            loop.chunk_done(i, job, time.monotonic() - started)
            if i == 10:
                loop.kill_now.set()
                assert await asyncio.to_thread(loop.killed.wait, 20)
            if i == 30:
                loop.restart_now.set()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_the_workers_loop_completes_across_a_kill_9_restart(mode: str,
                                                                   tmp_path: Path) -> None:
    """The service is killed (-9) after chunk 10 and started again (same port and
    database) after chunk 30: every call returns at once meanwhile, the loop runs all
    40 chunks, and every post buffered meanwhile arrives once, in the order of the
    calls; the job ends succeeded."""
    svc = ProcessService(db=str(tmp_path / "p.db"), port=free_port())
    await asyncio.to_thread(svc.start)
    loop = Loop()

    def work() -> None:
        if mode == "sync":
            sync_worker(svc.url, loop)
        else:
            asyncio.run(async_worker(svc.url, loop))

    worker = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        await wait_for(lambda: loop.kill_now.is_set() or worker.done(), timeout=20,
                       what="chunk 10")
        svc.signal(signal.SIGKILL)
        await asyncio.to_thread(svc.wait)
        loop.killed.set()
        await wait_for(lambda: loop.restart_now.is_set() or worker.done(), timeout=20,
                       what="chunk 30")
        await asyncio.to_thread(svc.start)
        await asyncio.wait_for(worker, 60)
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            assert loop.job is not None and loop.job.id is not None
            events = await stored_log(client, loop.job.id)
    finally:
        loop.killed.set()
        await asyncio.to_thread(svc.stop)

    job = loop.job
    assert loop.chunks == CHUNKS
    assert loop.saw_unreachable and loop.most_pending > 0
    assert loop.slowest_call < 0.5, loop.slowest_call  # no retry loop in the user's calls
    assert job.pending == 0 and not job.unreachable and job.dropped_logs == 0
    assert job.status == "succeeded"

    logs = [e["message"] for e in events if e["type"] == "log"]
    assert logs == [f"after chunk {k}" for k in range(5, CHUNKS + 1, 5)]
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["stage"] for e in progress if "stage" in e] == ["download", "transcode"]
    currents = [e["job"]["current"] for e in progress if e["job"].get("current") is not None]
    assert currents == sorted(currents) and currents[-1] == CHUNKS
    last_current = None
    for e in events:  # each log line comes right after the progress posted before it
        if e["type"] == "progress":
            last_current = e["job"].get("current")
        elif e["type"] == "log":
            assert last_current is not None, e
            assert e["message"] == f"after chunk {int(last_current)}", (e, last_current)
    assert events[-1]["type"] == "finished"
    assert events[-1]["job"]["status"] == "succeeded"


# ---------------------------------------------------------------- a fake service


class FakeService:
    """Just enough of the worker API, stored with the real seq rule (a seq at or below
    the last one stored repeats it), and a switch that makes it unreachable."""

    def __init__(self) -> None:
        self.down = False
        self.stored: list[tuple[str, dict[str, Any]]] = []
        self.sent_seqs: list[int] = []  # every attempt's, reachable or not
        self.last_seq = 0
        self.job = {"id": "j_fake", "status": "running", "attempt": 1, "stage": None}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path == "/api/jobs":
            return httpx.Response(201, json={"job": self.job, "worker_token": "t",
                                             "created": True})
        what = path.rsplit("/", 1)[-1]
        body = json.loads(request.content) if request.method == "POST" else {}
        if "seq" in body:
            self.sent_seqs.append(body["seq"])
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        control = {"cancel_requested": False, "pause_requested": False, "attempt": 1}
        if request.method == "POST" and what in ("progress", "log", "finish"):
            if body["seq"] > self.last_seq:
                self.last_seq = body["seq"]
                self.stored.append((what, body))
            if what == "finish":
                self.job = {**self.job, "status": body["status"]}
        return httpx.Response(200, json={"job": self.job, "control": control})

    def summary(self) -> list[tuple[str, Any]]:
        return [(what, body.get("progress", body.get("message", body.get("status"))))
                for what, body in self.stored]


def test_outbox_keeps_newest_progress_and_a_bounded_log_in_order() -> None:
    """While unreachable: progress merges (only the newest value between two log lines
    counts), log lines beyond the limit drop the oldest and one warning line says how
    many; a post tried once keeps its seq. Back: all of it arrives in call order."""
    fake = FakeService()
    with ProgressClient("http://fake", transport=httpx.MockTransport(fake), max_rate=None,
                        backoff=0.01, max_buffered_logs=3) as pc, pc.job() as job:
        job.progress(1)
        fake.down = True
        job.progress(2)  # tried once: it keeps its seq
        job.log("a")
        job.progress(3)
        job.progress(4)
        for line in "bcde":
            job.log(line)
        job.progress(5)
        assert job.unreachable and job.dropped_logs == 2
        assert job.pending == 7  # 2, the "dropped" line, 4, c, d, e, 5
        fake.down = False
        deadline = time.monotonic() + 10
        while job.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert job.pending == 0 and not job.unreachable
    dropped = "2 log lines dropped while the service was unreachable (the worker's buffer " \
              "was full)"
    assert fake.summary() == [("progress", 1), ("progress", 2), ("log", dropped),
                              ("progress", 4), ("log", "c"), ("log", "d"), ("log", "e"),
                              ("progress", 5), ("finish", "succeeded")]
    assert fake.sent_seqs.count(2) >= 2  # progress 2 re-sent with its first seq
    assert fake.sent_seqs == sorted(fake.sent_seqs)
    assert job.status == "succeeded"


async def test_finish_gives_up_after_finish_timeout_and_says_what_was_not_recorded() -> None:
    """Unreachable for longer than `finish_timeout`: leaving the block raises NotRecorded
    (a ServiceUnavailable) naming the finish and the posts still waiting."""
    fake = FakeService()
    started = 0.0
    with pytest.raises(NotRecorded) as caught:
        async with AsyncProgressClient("http://fake", transport=httpx.MockTransport(fake),
                                       max_rate=None, backoff=0.01,
                                       finish_timeout=0.5) as pc, pc.job() as job:
            await job.progress(10)
            fake.down = True
            await job.log("encoder warmed up")
            await job.progress(20)
            await job.progress(30)
            await job.checkpoint()  # no cancel can be learnt meanwhile: it goes on
            started = time.monotonic()
    waited = time.monotonic() - started
    err = caught.value
    assert isinstance(err, ServiceUnavailable)
    assert 0.5 <= waited < 5
    assert (err.status, err.progress_posts, err.log_lines, err.dropped_logs) == \
        ("succeeded", 1, 1, 0)
    assert "not recorded: the finish (succeeded), 1 progress post, 1 log line" in str(err)
    assert fake.summary() == [("progress", 10)]


# ---------------------------------------------------------------- the demo, across a restart


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PROGRESS_SSE_")}


@pytest.mark.slow
async def test_demo_lives_through_a_kill_9_restart(tmp_path: Path) -> None:
    """`demo --once` keeps working while the service is down for longer than a request's
    retries last (8 s), finishes every job when it is back, and exits 0 without a
    traceback: no job is left running."""
    svc = ProcessService(db=str(tmp_path / "p.db"), port=free_port())
    await asyncio.to_thread(svc.start)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "progress_sse", "demo", "--once", "--jobs", "3", "--speed", "2",
        "--fail-rate", "0", "--seed", "5", "--url", svc.url, cwd=ROOT, env=cli_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            async def three_running() -> bool:
                r = await client.get("/api/jobs", params={"status": "running"})
                return len(r.json()["jobs"]) == 3

            await wait_for(three_running, timeout=20, what="three demo jobs running")
        svc.signal(signal.SIGKILL)
        await asyncio.to_thread(svc.wait)
        await asyncio.sleep(8)
        await asyncio.to_thread(svc.start)
        _, err = await asyncio.wait_for(proc.communicate(), 90)
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            jobs = (await client.get("/api/jobs")).json()["jobs"]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.to_thread(svc.stop)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"ExceptionGroup" not in err, err.decode()
    assert len(jobs) == 3
    assert {j["status"] for j in jobs} == {"succeeded"}, jobs

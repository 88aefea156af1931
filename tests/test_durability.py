"""The service as a real process: kill -9, SIGTERM with open streams, curl, frozen readers."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from .helpers import (
    ProcessService,
    aiter_sse_lines,
    create_job,
    free_port,
    sse_lines,
    wait_for,
)
from .stored import db_events

pytestmark = pytest.mark.slow


@pytest.fixture
async def proc(tmp_path: Path) -> AsyncIterator[ProcessService]:
    svc = ProcessService(db=str(tmp_path / "p.db"), port=free_port())
    svc.start()
    yield svc
    svc.stop()


def children(proc: ProcessService) -> list[int]:
    assert proc.proc is not None
    pid = proc.proc.pid
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def test_kill_9_keeps_every_acknowledged_event(proc: ProcessService) -> None:
    """Every post answered 2xx before a kill -9 is in the log after restart."""
    acked: dict[int, tuple[str, float]] = {}
    async with httpx.AsyncClient(base_url=proc.url, timeout=5) as client:
        jobs = [await create_job(client, title=f"crash {i}") for i in range(4)]

        async def post_forever(job_id: str) -> None:
            i = 0
            while True:
                i += 1
                try:
                    r = await client.post(f"/api/jobs/{job_id}/progress",
                                          json={"progress": min(i / 10, 100), "seq": i})
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    acked[r.json()["event_id"]] = (job_id, r.json()["job"]["progress"])

        tasks = [asyncio.create_task(post_forever(j["id"])) for j in jobs]
        await wait_for(lambda: len(acked) > 300, timeout=20, what="posts acknowledged")
        # the writer is a thread: it dies with the service, and nothing is committed
        # behind a restarted one's back
        assert children(proc) == []
        proc.signal(signal.SIGKILL)
        proc.wait()
        await asyncio.gather(*tasks)
    proc.start()
    stored = {e["id"]: e for e in await db_events(proc.db)}
    missing = sorted(set(acked) - set(stored))
    assert not missing, f"acknowledged events lost: {missing[:10]}"
    for event_id, (job_id, progress) in acked.items():
        assert stored[event_id]["job_id"] == job_id
        assert stored[event_id]["job"]["progress"] == progress
    # the service goes on from the stored head, ids still contiguous
    async with httpx.AsyncClient(base_url=proc.url, timeout=5) as client:
        r = await client.post(f"/api/jobs/{jobs[0]['id']}/progress", json={"message": "after"})
        assert r.json()["event_id"] == max(stored) + 1
        seq_again = await client.post(f"/api/jobs/{jobs[0]['id']}/progress",
                                      json={"progress": 0.1, "seq": 1})
        assert seq_again.json()["duplicate"] is True


async def open_raw_stream(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
    await writer.drain()
    return reader, writer


async def test_sigterm_ends_many_open_streams_promptly(proc: ProcessService) -> None:
    """SIGTERM with 1,000 open streams: every stream ends and the process exits."""
    conns = []
    for _ in range(1000):
        conns.append(await open_raw_stream(proc.port))
    for reader, _ in conns:
        async with asyncio.timeout(10):
            await reader.readuntil(b"event: snapshot")
    async with httpx.AsyncClient() as client:
        health = (await client.get(proc.url + "/healthz")).json()
    assert health["streams"] == 1000
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    ended = 0
    async with asyncio.timeout(10):
        for reader, writer in conns:
            await reader.read()  # EOF: the server ended the stream
            ended += 1
            writer.close()
    code = await asyncio.to_thread(proc.wait, 10)
    took = time.monotonic() - started
    assert ended == 1000
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean stop
    assert "service.stopped" in proc.log_path.read_text()  # the lifespan ran to its end
    assert took < 10, took  # not a speed goal (that is in `make bench`): it must not hang


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_receives_frames_live_and_resumes(proc: ProcessService) -> None:
    """curl -N sees each event as it is posted, and resumes with a Last-Event-ID header."""
    async with httpx.AsyncClient(base_url=proc.url, timeout=5) as client:
        job = await create_job(client)
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sN", f"{proc.url}/api/events?job={job['id']}",
            stdout=asyncio.subprocess.PIPE)
        assert curl.stdout is not None
        try:
            async with asyncio.timeout(10):
                line = await curl.stdout.readline()
                while not line.startswith(b"event: snapshot"):
                    line = await curl.stdout.readline()
                await curl.stdout.readuntil(b"\n\n")  # the rest of the snapshot frame
                for pct in (10, 20):
                    r = await client.post(f"/api/jobs/{job['id']}/progress",
                                          json={"progress": pct})
                    event_id = r.json()["event_id"]
                    # each frame arrives while curl is connected, before the next post
                    frame = await curl.stdout.readuntil(b"\n\n")
                    assert frame.startswith(f"id: {event_id}\nevent: progress\n".encode())
                    assert json.loads(frame.split(b"data: ", 1)[1])["job"]["progress"] == pct
        finally:
            curl.kill()
            await curl.wait()
        resumed = await asyncio.create_subprocess_exec(
            "curl", "-sN", "--max-time", "2", "-H", "Last-Event-ID: 2",
            f"{proc.url}/api/events?job={job['id']}", stdout=asyncio.subprocess.PIPE)
        out, _ = await resumed.communicate()
        ids = [int(line[4:]) for line in sse_lines(out.decode()) if line.startswith("id: ")]
        assert ids == [3]


async def test_frozen_reader_does_not_delay_others_and_memory_stays_bounded(
        proc: ProcessService) -> None:
    """A client that never reads neither slows another reader nor grows server memory."""
    frozen = socket.create_connection(("127.0.0.1", proc.port))
    frozen.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    frozen.sendall(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
    payload = "x" * 8000
    async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
        job = await create_job(client)
        # fill the frozen reader's socket buffers with a first round
        for _ in range(300):
            await client.post(f"/api/jobs/{job['id']}/log", json={"message": payload})
        rss = []
        async with client.stream("GET", "/api/events",
                                 headers={"Last-Event-ID": str(301)}) as live:
            lines = aiter_sse_lines(live)
            latencies = []
            for i in range(3000):
                if i % 1000 == 0:
                    rss.append(proc.rss_kib())
                sent = time.monotonic()
                r = await client.post(f"/api/jobs/{job['id']}/log",
                                      json={"message": payload})
                want = f"id: {r.json()['event_id']}"
                async with asyncio.timeout(5):
                    async for line in lines:
                        if line == want:
                            break
                latencies.append(time.monotonic() - sent)
        rss.append(proc.rss_kib())
    frozen.close()
    latencies.sort()
    # each round of 1,000 events of ~10 KiB (10 MB) went past the frozen reader: a queue
    # for it would grow by that much a round; the hub's bounded tail (8 MiB) fills once
    growth = [b - a for a, b in itertools.pairwise(rss)]
    assert max(growth[1:]) < 4 * 1024, rss
    assert latencies[len(latencies) // 2] < 0.5, latencies[len(latencies) // 2]


async def test_stream_request_is_logged_when_it_opens_and_keeps_its_request_id(
        proc: ProcessService) -> None:
    """A stream runs after the layers that started it have returned: its request line is
    written as it opens (not hours later when it ends), and its own lines, to the last,
    carry the same request id as its response header."""
    async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
        job = await create_job(client)
        async with client.stream("GET", f"/api/jobs/{job['id']}/events",
                                 headers={"Accept": "text/event-stream"}) as r:
            rid = r.headers["x-request-id"]
            assert r.headers["x-content-type-options"] == "nosniff"  # the layers' headers

            def logged() -> list[dict[str, object]]:
                return [json.loads(line) for line in proc.log_path.read_text().splitlines()
                        if line.startswith("{") and rid in line]

            await wait_for(lambda: any(e["event"] == "stream.opened" for e in logged()),
                           what="the stream's request line while it is open")
            assert [e["event"] for e in logged()] == ["request", "stream.opened"]
            lines = aiter_sse_lines(r)
            async for line in lines:
                if line == "event: snapshot":
                    break  # posted after the snapshot, `finished` is an event of the stream
            await client.post(f"/api/jobs/{job['id']}/finish", json={"status": "succeeded"})
            async for _ in lines:
                pass  # the per-job stream ends after `finished`
    await wait_for(lambda: any(e["event"] == "stream.closed" for e in logged()),
                   what="stream.closed")
    [closed] = [e for e in logged() if e["event"] == "stream.closed"]
    assert closed["ended"] == "finished" and closed["events"] >= 1


async def test_a_worker_post_logs_one_line_with_its_callers_request_id(
        proc: ProcessService) -> None:
    """The caller's X-Request-ID names the post in its answer and its log line; a post
    without one gets an id of its own, not the one before it."""
    async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
        job = await create_job(client)
        path = f"/api/jobs/{job['id']}/progress"
        named = await client.post(path, json={"progress": 1},
                                  headers={"X-Request-ID": "caller-42"})
        unnamed = await client.post(path, json={"progress": 2})
    assert named.headers["x-request-id"] == "caller-42"
    rid = unnamed.headers["x-request-id"]
    assert rid and rid != "caller-42"

    def lines(request_id: str) -> list[dict[str, object]]:
        return [e for e in map(json.loads, proc.log_path.read_text().splitlines())
                if e.get("request_id") == request_id]

    await wait_for(lambda: lines(rid), what="the second post's log line")
    for request_id in ("caller-42", rid):
        [line] = lines(request_id)
        assert line["event"] == "request" and line["path"] == path
        assert line["status"] == 200

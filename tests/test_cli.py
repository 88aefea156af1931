"""The command line as users run it: a subprocess against a real in-process server.

The server runs on the test's event loop, so the CLI runs through
`asyncio.create_subprocess_exec` (a blocking subprocess.run would freeze the server).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from progress_sse.app import create_app
from progress_sse.server import make_server
from progress_sse.settings import Settings

from .helpers import (
    ROOT,
    SEPARATORS,
    Service,
    create_job,
    free_port,
    raw_separators,
    reframed,
    start_service,
    stored_log,
    wait_for,
)

STAGES = [{"key": "fetch", "label": "Fetch", "weight": 1},
          {"key": "encode", "label": "Encode", "weight": 3}]
TERMINAL = {"succeeded", "failed", "cancelled"}


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PROGRESS_SSE_")}


async def start_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "progress_sse", *args, cwd=ROOT, env=cli_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def run_cli(*args: str, within: float = 15) -> tuple[int, str, str]:
    proc = await start_cli(*args)
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def read_json_line(proc: asyncio.subprocess.Process, within: float = 10
                         ) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), within)
    assert line, "the watcher ended its output early"
    value: dict[str, Any] = json.loads(line)
    return value


async def finish_watch(proc: asyncio.subprocess.Process, within: float = 10
                       ) -> tuple[int, list[dict[str, Any]]]:
    """Wait for the watcher to exit; its exit code and the rest of its NDJSON."""
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None, err
    return proc.returncode, [json.loads(line) for line in out.decode().splitlines()]


async def status_of(client: httpx.AsyncClient, job_id: str) -> str:
    status: str = (await client.get(f"/api/jobs/{job_id}")).json()["job"]["status"]
    return status


async def until_status(client: httpx.AsyncClient, job_id: str, status: str,
                       within: float = 10) -> None:
    async def reached() -> bool:
        return await status_of(client, job_id) == status

    await wait_for(reached, timeout=within, what=f"{job_id} to be {status}")


# ---------------------------------------------------------------- watch


@pytest.mark.parametrize(("outcome", "code"), [("succeeded", 0), ("failed", 1),
                                               ("cancelled", 2)])
async def test_watch_json_prints_every_event_and_exits_with_outcome(
        service: Service, client: httpx.AsyncClient, outcome: str, code: int) -> None:
    """`watch --json` prints the snapshot then each event as NDJSON, and exits 0, 1 or 2."""
    job = await create_job(client, kind="video", stages=STAGES)
    proc = await start_cli("watch", job["id"], "--json", "--url", service.url)
    snapshot = await read_json_line(proc)
    assert snapshot["type"] == "snapshot"
    assert [j["id"] for j in snapshot["jobs"]] == [job["id"]]
    url = f"/api/jobs/{job['id']}"
    await client.post(f"{url}/progress", json={"stage": "fetch", "progress": 50})
    await client.post(f"{url}/log", json={"message": "halfway"})
    if outcome == "cancelled":
        await client.post(f"{url}/cancel")
    await client.post(f"{url}/finish", json={"status": outcome, "error": "boom"
                                             if outcome == "failed" else None})
    returncode, lines = await finish_watch(proc)
    assert returncode == code
    stored = await stored_log(client, job["id"], after=snapshot["id"])
    assert lines == stored
    assert lines[-1]["type"] == "finished" and lines[-1]["job"]["status"] == outcome


async def test_watch_finished_job_exits_at_once(service: Service,
                                                client: httpx.AsyncClient) -> None:
    """Watching a job that already failed prints its snapshot and exits 1 straight away."""
    job = await create_job(client)
    await client.post(f"/api/jobs/{job['id']}/finish", json={"status": "failed"})
    code, out, _ = await run_cli("watch", job["id"], "--json", "--url", service.url)
    assert code == 1
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["snapshot"]


async def test_watch_unknown_job_exits_with_service_error(service: Service) -> None:
    """An unknown job is reported on stderr with exit code 5, not mistaken for an outcome."""
    code, out, err = await run_cli("watch", "no-such-job", "--url", service.url)
    assert code == 5 and out == ""
    assert "404" in err and "no-such-job" in err


async def test_watch_plain_output_shows_progress_lines(service: Service,
                                                       client: httpx.AsyncClient) -> None:
    """Without a terminal and without --json, watch prints one readable line per event."""
    job = await create_job(client, title="intro.mp4", stages=STAGES)
    proc = await start_cli("watch", job["id"], "--url", service.url)
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 10)
    assert b"intro.mp4" in first and b"queued" in first
    await client.post(f"/api/jobs/{job['id']}/progress",
                      json={"stage": "encode", "progress": 50, "message": "chunk 2"})
    await client.post(f"/api/jobs/{job['id']}/finish", json={"status": "succeeded"})
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    assert re.search(r"62\.5%\s+running\s+Encode 2/2 .*chunk 2", out.decode())
    assert "succeeded" in out.decode().splitlines()[-1]


@pytest.mark.parametrize("wire", ["escaped", "raw"])
async def test_watch_reads_messages_with_line_separators(settings: Settings,
                                                         wire: str) -> None:
    """U+2028, U+2029 and U+0085 in a job's messages split no event: watch prints each
    event whole (one NDJSON line each) and exits 0, whether the wire escapes them (as the
    service does) or carries them raw (as JSON allows). Before watch used the SDK's
    reader, the raw wire cut the event there: JSONDecodeError, exit 1."""
    service = await start_service(settings, wrap=reframed(raw_separators)
                                  if wire == "raw" else None)
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            job = await create_job(client)
            proc = await start_cli("watch", job["id"], "--json", "--url", service.url)
            snapshot = await read_json_line(proc)
            url = f"/api/jobs/{job['id']}"
            await client.post(f"{url}/log", json={"message": SEPARATORS})
            await client.post(f"{url}/progress", json={"progress": 50, "message": SEPARATORS})
            await client.post(f"{url}/finish", json={"status": "succeeded"})
            returncode, lines = await finish_watch(proc)
            stored = await stored_log(client, job["id"], after=snapshot["id"])
    finally:
        await service.stop()
    assert returncode == 0
    assert lines == stored
    assert [e["type"] for e in lines] == ["log", "progress", "finished"]
    assert lines[0]["message"] == SEPARATORS and lines[1]["job"]["message"] == SEPARATORS
    assert lines[-1]["job"]["status"] == "succeeded"


@pytest.fixture
async def restartable(settings: Settings) -> AsyncIterator[list[Any]]:
    """Servers started on one fixed port and one database, stopped at the end."""
    servers: list[Any] = []
    yield servers
    for server, task in servers:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def start_on(settings: Settings, servers: list[Any]) -> None:
    server = make_server(create_app(settings), settings)
    task = asyncio.create_task(server.serve())
    servers.append((server, task))
    await wait_for(lambda: server.started or task.done(), what="server start")
    assert not task.done()


async def test_watch_resumes_after_server_restart(settings: Settings,
                                                  restartable: list[Any]) -> None:
    """When the server restarts mid-job, watch reconnects with Last-Event-ID: no loss, no repeat."""
    settings = settings.model_copy(update={"port": free_port()})
    url = f"http://127.0.0.1:{settings.port}"
    await start_on(settings, restartable)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        job = await create_job(client)
        proc = await start_cli("watch", job["id"], "--json", "--url", url)
        seen = [await read_json_line(proc)]
        await client.post(f"/api/jobs/{job['id']}/progress", json={"progress": 10})
        seen.append(await read_json_line(proc))
        server, task = restartable.pop()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        await start_on(settings, restartable)
        await client.post(f"/api/jobs/{job['id']}/progress", json={"progress": 20})
        await client.post(f"/api/jobs/{job['id']}/progress", json={"progress": 30})
        await client.post(f"/api/jobs/{job['id']}/finish", json={"status": "succeeded"})
        code, rest = await finish_watch(proc, within=15)
        assert code == 0
        stored = await stored_log(client, job["id"], after=seen[0]["id"])
    assert seen[1:] + rest == stored
    assert [e["job"]["progress"] for e in rest] == [20, 30, 100]


# ---------------------------------------------------------------- post


async def test_post_exit_code_follows_the_control_state(service: Service,
                                                        client: httpx.AsyncClient) -> None:
    """post prints the control state and exits 0, 4 on a pause request, 3 on a cancel."""
    job = await create_job(client, stages=STAGES)
    jid, url = job["id"], service.url
    code, out, err = await run_cli("post", jid, "--stage", "fetch", "--progress", "40",
                                   "--message", "fetching", "--url", url)
    assert code == 0, err
    assert json.loads(out) == {"cancel_requested": False, "pause_requested": False,
                               "reason": None, "status": "running", "attempt": 1}
    await client.post(f"/api/jobs/{jid}/pause")
    assert (await run_cli("post", jid, "--progress", "50", "--url", url))[0] == 4
    await client.post(f"/api/jobs/{jid}/resume")
    await client.post(f"/api/jobs/{jid}/cancel", json={"reason": "not needed"})
    code, out, _ = await run_cli("post", jid, "--progress", "60", "--log", "still here",
                                 "--url", url)
    assert code == 3
    assert json.loads(out)["cancel_requested"] is True
    assert (await run_cli("post", jid, "--finish", "cancelled", "--url", url))[0] == 0
    assert (await run_cli("post", jid, "--progress", "70", "--url", url))[0] == 3
    events = await stored_log(client, jid)
    assert [e["type"] for e in events if e["type"] in ("log", "finished")] == \
        ["log", "finished"]
    assert events[-1]["job"]["status"] == "cancelled"


async def test_post_checkpoint_waits_while_paused(service: Service,
                                                  client: httpx.AsyncClient) -> None:
    """post --checkpoint acknowledges a pause, waits for the resume, then exits 0."""
    job = await create_job(client)
    await client.post(f"/api/jobs/{job['id']}/progress", json={"progress": 10})
    await client.post(f"/api/jobs/{job['id']}/pause")
    proc = await start_cli("post", job["id"], "--progress", "20", "--checkpoint",
                           "--url", service.url)
    await until_status(client, job["id"], "paused")
    assert proc.returncode is None
    await client.post(f"/api/jobs/{job['id']}/resume")
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err
    assert json.loads(out)["pause_requested"] is False
    assert await status_of(client, job["id"]) == "running"


async def test_post_to_unknown_job_is_a_service_error(service: Service) -> None:
    """A refused post exits 5 with the service's message."""
    code, _, err = await run_cli("post", "nope", "--progress", "1", "--url", service.url)
    assert code == 5 and "404" in err


async def test_shell_worker_with_curl_only_succeeds(service: Service,
                                                    client: httpx.AsyncClient) -> None:
    """The documented curl-only shell worker drives a job through its steps to succeeded."""
    doc = (ROOT / "README.md").read_text()
    script = doc.split("<!-- tested: curl-worker")[1].split("```bash\n")[1].split("```")[0]
    assert "    sleep 1   # the real work" in script
    script = script.replace("    sleep 1   #", "    sleep 0.01   #")
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, env={**cli_env(), "PROGRESS_SSE_URL": service.url,
                                   "JOB": "curl-worker-1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()
    events = await stored_log(client, "curl-worker-1")
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["job"]["current"] for e in progress] == [1, 2, 3, 4, 5]
    assert progress[-1]["message"] == "step 5 of 5"
    assert events[-1]["job"]["status"] == "succeeded"


# ---------------------------------------------------------------- demo


async def test_demo_once_runs_jobs_to_terminal_states(service: Service,
                                                      client: httpx.AsyncClient) -> None:
    """demo --once runs one multi-stage job per worker to an end; some fail on purpose."""
    code, out, err = await run_cli("demo", "--once", "--jobs", "4", "--speed", "40",
                                   "--fail-rate", "0.5", "--seed", "3", "--url", service.url,
                                   within=25)
    assert code == 0, err
    jobs = (await client.get("/api/jobs")).json()["jobs"]
    assert len(jobs) == 4
    assert {j["status"] for j in jobs} == {"succeeded", "failed"}
    assert all(len(j["stages"]) >= 3 for j in jobs)
    assert all(j["error"] for j in jobs if j["status"] == "failed")
    assert out.count(" started ") == 4


async def test_demo_workers_obey_pause_cancel_and_sigterm(service: Service,
                                                          client: httpx.AsyncClient) -> None:
    """Demo jobs pause, resume and cancel when asked; SIGTERM ends the rest as cancelled."""
    proc = await start_cli("demo", "--jobs", "2", "--speed", "4", "--fail-rate", "0",
                           "--seed", "1", "--url", service.url)

    async def two_running() -> bool:
        r = await client.get("/api/jobs", params={"status": "running"})
        return len(r.json()["jobs"]) == 2

    await wait_for(two_running, timeout=10, what="two demo jobs running")
    first, second = [j["id"] for j in (await client.get("/api/jobs")).json()["jobs"]]
    await client.post(f"/api/jobs/{first}/pause")
    await until_status(client, first, "paused")
    await client.post(f"/api/jobs/{first}/resume")
    await until_status(client, first, "running")
    await client.post(f"/api/jobs/{first}/cancel")
    await until_status(client, first, "cancelled")
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err
    jobs = (await client.get("/api/jobs")).json()["jobs"]
    assert all(j["status"] == "cancelled" for j in jobs), jobs
    assert (await client.get(f"/api/jobs/{second}")).json()["job"]["error"] == \
        "worker interrupted (CancelledError)"


def test_watch_line_freezes_a_paused_estimate_and_shows_none_for_a_stalled_job() -> None:
    """A paused job's remaining time is not counted down between events; a stalled job,
    which has no estimate, shows a dash."""
    from progress_sse.watch import job_line

    paused = {"id": "j", "title": "t", "status": "paused", "progress": 50.0, "eta_s": 60.0}
    assert "~1:00 left" in job_line(paused, 30.0, 200, False)
    running = {**paused, "status": "running"}
    assert "~30s left" in job_line(running, 30.0, 200, False)
    stalled = {**running, "eta_s": None, "stalled": True}
    assert "— left" in job_line(stalled, 30.0, 200, False)

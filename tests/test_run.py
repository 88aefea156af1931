"""`progress-sse run` and `progress-sse create` as users run them: real child processes
under the CLI, as a subprocess, against a real in-process server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from progress_sse.settings import Settings

from .helpers import ROOT, Service, free_port, start_service, stored_log, wait_for
from .test_cli import cli_env, run_cli, status_of, until_status

JOB_LINE = re.compile(r"progress-sse run: job (\S+) at ")
NOTICE = re.compile(r"\[progress-sse run\] (\d+) output lines? not recorded")


async def start_run(url: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "progress_sse", "run", "--url", url, *args, cwd=ROOT,
        env=cli_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def run_to_end(url: str, *args: str, within: float = 20
                     ) -> tuple[int, str, str, str]:
    """Run to the end: exit code, stdout, stderr, and the job id run printed."""
    proc = await start_run(url, *args)
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    match = JOB_LINE.search(err.decode())
    assert match, err.decode()
    return proc.returncode, out.decode(), err.decode(), match.group(1)


async def job_id_from(proc: asyncio.subprocess.Process) -> str:
    """The job id from run's first stderr line (read while it runs)."""
    assert proc.stderr is not None
    line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
    match = JOB_LINE.search(line)
    assert match, line
    return match.group(1)


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids to SIGKILL at the end, so a failing test leaves no `sleep 1000` behind."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if state_of(pid) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def read_pids(proc: asyncio.subprocess.Process, leftovers: list[int],
                    *names: str) -> dict[str, int]:
    """`NAME PID` lines the child prints on stdout, until every name was seen."""
    assert proc.stdout is not None
    pids: dict[str, int] = {}
    while set(names) - set(pids):
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().split()
        assert line, "the command's output ended early"
        if len(line) == 2 and line[0] in names:
            pids[line[0]] = int(line[1])
            leftovers.append(pids[line[0]])
    return pids


def state_of(pid: int) -> str | None:
    """The process's state letter; None once it is gone (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    state = stat.rsplit(")", 1)[1].split()[0]
    return None if state in ("Z", "X") else state


def logs(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["level"], e["message"]) for e in events if e["type"] == "log"]


async def job_of(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = (await client.get(f"/api/jobs/{job_id}")).json()["job"]
    return job


# ---------------------------------------------------------------- outcomes


@pytest.mark.parametrize(("code", "status"), [(0, "succeeded"), (3, "failed")])
async def test_exit_status_is_the_outcome_and_output_becomes_log_lines(
        service: Service, client: httpx.AsyncClient, code: int, status: str) -> None:
    """The command's exit code is run's, 0 is succeeded, else failed; stdout lines are
    info and stderr lines warning in the log, and both still reach the terminal."""
    script = f"echo one; echo two >&2; printf 'a\\rb\\rthree\\n'; exit {code}"
    returncode, out, err, job_id = await run_to_end(service.url, "--kind", "build",
                                                    "--", "sh", "-c", script)
    assert returncode == code, err
    assert out == "one\na\rb\rthree\n"  # relayed as is
    assert "two\n" in err
    job = await job_of(client, job_id)
    assert job["status"] == status
    assert (job["kind"], job["title"]) == ("build", shlex.join(["sh", "-c", script]))
    lines = logs(await stored_log(client, job_id))
    assert [m for lv, m in lines if lv == "info"] == ["one", "three"]
    assert ("warning", "two") in lines
    if code:
        assert job["error"] == ("the command exited with status 3; the last lines of "
                                "stderr:\ntwo")
    else:
        assert job["error"] is None and job["result"] == {"exit_code": 0}


async def test_failure_error_is_the_last_twenty_stderr_lines(
        service: Service, client: httpx.AsyncClient) -> None:
    """A long stderr leaves only its last 20 lines in the error."""
    script = "for i in $(seq 1 30); do echo err$i >&2; done; exit 7"
    returncode, _, _, job_id = await run_to_end(service.url, "--", "sh", "-c", script)
    assert returncode == 7
    job = await job_of(client, job_id)
    assert job["status"] == "failed"
    head, tail = job["error"].split("\n", 1)
    assert head == "the command exited with status 7; the last lines of stderr:"
    assert tail.split("\n") == [f"err{i}" for i in range(11, 31)]


async def test_death_by_signal_exits_128_plus_n(service: Service,
                                                client: httpx.AsyncClient) -> None:
    """A command killed by a signal fails, and run exits 128+N as a shell would."""
    returncode, _, _, job_id = await run_to_end(service.url, "--", "sh", "-c", "kill -KILL $$")
    assert returncode == 137
    job = await job_of(client, job_id)
    assert job["status"] == "failed"
    assert job["error"] == "the command was killed by SIGKILL (exit status 137)"


async def test_command_not_found_exits_127_and_fails_the_job(
        service: Service, client: httpx.AsyncClient) -> None:
    returncode, _, err, job_id = await run_to_end(service.url, "--", "/nonexistent/cmd")
    assert returncode == 127
    assert "cannot run '/nonexistent/cmd'" in err
    job = await job_of(client, job_id)
    assert job["status"] == "failed" and "cannot run" in job["error"]


async def test_unreachable_service_does_not_start_the_command(tmp_path: Path) -> None:
    """No job, no run: exit 125 with a clear message, and the command never ran."""
    marker = tmp_path / "ran"
    proc = await start_run(f"http://127.0.0.1:{free_port()}", "--", "touch", str(marker))
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 125
    assert "could not create the job" in err.decode()
    assert "The command was not started" in err.decode()
    assert not marker.exists()


async def test_usage_without_a_command_is_64(service: Service) -> None:
    code, _, err = await run_cli("run", "--url", service.url, "--")
    assert code == 64 and "name the command" in err


# ---------------------------------------------------------------- the command's side


async def test_command_sees_the_job_and_posts_progress_itself(
        service: Service, client: httpx.AsyncClient) -> None:
    """$PROGRESS_SSE_JOB, _WORKER_TOKEN and _URL let the command post (the token must fit:
    a wrong one is refused); run's own log lines go on being stored after the command's
    clock-numbered posts."""
    script = ('echo "url=$PROGRESS_SSE_URL"; '
              '"$0" -m progress_sse post "$PROGRESS_SSE_JOB" '
              '--token "$PROGRESS_SSE_WORKER_TOKEN" --progress 40 --message from-child '
              '> /dev/null || exit 9; echo after')
    returncode, _, err, job_id = await run_to_end(service.url, "--", "sh", "-c", script,
                                                  sys.executable)
    assert returncode == 0, err
    events = await stored_log(client, job_id)
    progress = [e for e in events if e["type"] == "progress" and e["job"]["message"]]
    assert [(e["job"]["progress"], e["job"]["message"]) for e in progress] == [
        (40, "from-child")]
    assert [m for _, m in logs(events)] == [f"url={service.url}", "after"]
    assert events[-1]["job"]["status"] == "succeeded"


async def test_output_is_rate_limited_and_the_skipped_lines_counted(
        service: Service, client: httpx.AsyncClient) -> None:
    """A flood is posted up to the rate (bursts of 5 s worth) and the rest counted in a
    notice; the terminal still gets every line."""
    script = "i=0; while [ $i -lt 500 ]; do echo line$i; i=$((i+1)); done"
    returncode, out, _, job_id = await run_to_end(service.url, "--log-rate", "5",
                                                  "--", "sh", "-c", script)
    assert returncode == 0
    assert out.split() == [f"line{i}" for i in range(500)]
    lines = logs(await stored_log(client, job_id))
    posted = [int(m[4:]) for lv, m in lines if m.startswith("line")]
    skipped = [int(n) for _, m in lines for n in NOTICE.findall(m)]
    assert 25 <= len(posted) < 100, len(posted)
    assert posted == sorted(posted)
    assert skipped and len(posted) + sum(skipped) == 500
    assert all(lv == "warning" for lv, m in lines if NOTICE.search(m))


@pytest.fixture
async def quick_stalls(settings: Settings) -> AsyncIterator[Service]:
    """A service that marks a silent job stalled within a tenth of a second of its timeout."""
    svc = await start_service(settings.model_copy(update={"stall_check_s": 0.1}))
    yield svc
    await svc.stop()


async def test_a_quiet_command_is_heartbeated_not_stalled(quick_stalls: Service) -> None:
    """A silent command three times longer than the job's heartbeat timeout: never stalled."""
    returncode, _, err, job_id = await run_to_end(quick_stalls.url, "--heartbeat-timeout",
                                                  "1", "--", "sleep", "3")
    assert returncode == 0, err
    async with httpx.AsyncClient(base_url=quick_stalls.url, timeout=10) as client:
        events = await stored_log(client, job_id)
    assert events[-1]["job"]["status"] == "succeeded"
    assert events[-1]["job"]["heartbeat_timeout_s"] == 1
    assert not any(e.get("stalled") or e["job"].get("stalled") for e in events)


# ---------------------------------------------------------------- cancel and pause


async def test_cancel_terminates_the_command_and_its_children(
        service: Service, client: httpx.AsyncClient, leftovers: list[int]) -> None:
    """A cancel sends SIGTERM to the command's process group: the shell and its
    background grandchild end long before the grace period; the job ends cancelled and
    run exits 143 (the shell's death by SIGTERM)."""
    script = 'sleep 1000 & echo "grandchild $!"; echo "shell $$"; wait'
    proc = await start_run(service.url, "--grace", "60", "--", "sh", "-c", script)
    job_id = await job_id_from(proc)
    pids = await read_pids(proc, leftovers, "shell", "grandchild")
    assert all(state_of(pid) for pid in pids.values())
    await until_status(client, job_id, "running")
    started = time.monotonic()
    assert (await client.post(f"/api/jobs/{job_id}/cancel", json={"reason": "no more"})
            ).status_code == 202
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert time.monotonic() - started < 15  # SIGTERM did it, not the 60 s SIGKILL
    assert proc.returncode == 143, err.decode()
    await wait_for(lambda: not any(state_of(pid) for pid in pids.values()),
                   what="the shell and its grandchild to be gone")
    job = await job_of(client, job_id)
    assert (job["status"], job["error"]) == ("cancelled", "no more")
    lines = [m for _, m in logs(await stored_log(client, job_id))]
    assert any("SIGTERM sent to the command" in m for m in lines)
    assert "the command was killed by SIGTERM (exit status 143)" in lines


async def test_a_command_ignoring_sigterm_gets_sigkill_after_the_grace(
        service: Service, client: httpx.AsyncClient, leftovers: list[int]) -> None:
    """SIGTERM ignored (the shell and its children): SIGKILL after --grace, not before,
    to the whole process group."""
    script = "trap '' TERM; sleep 1000 & echo \"sleeper $!\"; echo \"shell $$\"; wait"
    proc = await start_run(service.url, "--grace", "1.5", "--", "sh", "-c", script)
    job_id = await job_id_from(proc)
    pids = await read_pids(proc, leftovers, "shell", "sleeper")
    await until_status(client, job_id, "running")
    started = time.monotonic()
    await client.post(f"/api/jobs/{job_id}/cancel")
    await until_status(client, job_id, "cancelling")
    await asyncio.sleep(0.5)  # within the grace the command must still be there
    assert all(state_of(pid) for pid in pids.values())
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert time.monotonic() - started >= 1.5
    assert proc.returncode == 137, err.decode()
    await wait_for(lambda: not any(state_of(pid) for pid in pids.values()),
                   what="the shell and its child to be gone")
    assert await status_of(client, job_id) == "cancelled"
    lines = [m for _, m in logs(await stored_log(client, job_id))]
    assert any("SIGKILL sent to the command" in m for m in lines)


async def test_pause_stops_the_command_and_resume_continues_it(
        service: Service, client: httpx.AsyncClient, leftovers: list[int]) -> None:
    """A pause stops the process group (SIGSTOP) and the job shows paused; a resume
    continues it; a cancel while paused still ends it."""
    script = 'echo "shell $$"; while :; do sleep 0.05; done'
    proc = await start_run(service.url, "--grace", "30", "--", "sh", "-c", script)
    job_id = await job_id_from(proc)
    pid = (await read_pids(proc, leftovers, "shell"))["shell"]
    await until_status(client, job_id, "running")
    await client.post(f"/api/jobs/{job_id}/pause")
    await until_status(client, job_id, "paused")
    assert state_of(pid) == "T"
    await client.post(f"/api/jobs/{job_id}/resume")
    await until_status(client, job_id, "running")
    await wait_for(lambda: state_of(pid) not in ("T", None), what="the command to continue")
    await client.post(f"/api/jobs/{job_id}/pause")
    await until_status(client, job_id, "paused")
    await client.post(f"/api/jobs/{job_id}/cancel")
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 143, err.decode()
    assert await status_of(client, job_id) == "cancelled"


# ---------------------------------------------------------------- create


async def test_create_prints_an_id_and_its_worker_token(
        service: Service, client: httpx.AsyncClient) -> None:
    """`create` prints `ID TOKEN`; the token opens that job's worker endpoints only."""
    code, out, err = await run_cli("create", "--kind", "backup", "--title", "nightly",
                                   "--stages", "dump,upload", "--url", service.url)
    assert code == 0, err
    job_id, token = out.split()
    job = await job_of(client, job_id)
    assert (job["kind"], job["title"], job["status"]) == ("backup", "nightly", "queued")
    assert [s["key"] for s in job["stages"]] == ["dump", "upload"]
    good = await client.post(f"/api/jobs/{job_id}/progress", json={"stage": "dump"},
                             headers={"X-Worker-Token": token})
    assert good.status_code == 200, good.text
    bad = await client.post(f"/api/jobs/{job_id}/progress", json={"progress": 1},
                            headers={"X-Worker-Token": token[::-1]})
    assert bad.status_code == 401


async def test_create_json_and_a_repeated_id(service: Service) -> None:
    code, out, _ = await run_cli("create", "--id", "nightly-1", "--json", "--url", service.url)
    assert code == 0
    answer = json.loads(out)
    assert answer["id"] == "nightly-1" and answer["job"]["id"] == "nightly-1"
    assert answer["worker_token"]
    code, out, err = await run_cli("create", "--id", "nightly-1", "--url", service.url)
    assert code == 5 and out == "" and "already exists" in err


async def test_readme_shell_worker_with_create_and_post(
        service: Service, client: httpx.AsyncClient, tmp_path: Path) -> None:
    """The README's shell worker: `create` then `post` per file, to succeeded."""
    doc = (ROOT / "README.md").read_text()
    script = doc.split("<!-- tested: shell-worker")[1].split("```bash\n")[1].split("```")[0]
    assert 'read -r JOB TOKEN <<< "$created"' in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "progress-sse"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m progress_sse "$@"\n')
    wrapper.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("a.csv", "b.csv", "c.csv"):
        (work / name).write_text("x\n")
    env = {**cli_env(), "PROGRESS_SSE_URL": service.url, "PYTHONPATH": str(ROOT),
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", 'import_file() { echo "importing $1" >&2; }\n' + script
        + '\necho "$JOB"', cwd=work, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    job_id = out.decode().split()[-1]
    events = await stored_log(client, job_id)
    assert events[0]["job"]["kind"] == "import"
    progress = [e["job"] for e in events if e["type"] == "progress"]
    assert [(j["current"], j["message"]) for j in progress] == [
        (1, "a.csv"), (2, "b.csv"), (3, "c.csv")]
    assert events[-1]["job"]["status"] == "succeeded"


async def test_sigterm_to_run_is_passed_on_and_the_job_ends_cancelled(
        service: Service, client: httpx.AsyncClient, leftovers: list[int]) -> None:
    """Stopping run (SIGTERM, as a supervisor does) ends the command the same way as a
    cancel: it gets the signal, and the job ends cancelled, saying why."""
    script = 'echo "shell $$"; sleep 1000'
    proc = await start_run(service.url, "--grace", "60", "--", "sh", "-c", script)
    job_id = await job_id_from(proc)
    pid = (await read_pids(proc, leftovers, "shell"))["shell"]
    await until_status(client, job_id, "running")
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 143, err.decode()
    assert "progress-sse run was interrupted (SIGTERM): sending SIGTERM" in err.decode()
    await wait_for(lambda: state_of(pid) is None, what="the command to be gone")
    job = await job_of(client, job_id)
    assert job["status"] == "cancelled"
    assert job["error"] == "progress-sse run was interrupted (SIGTERM)"

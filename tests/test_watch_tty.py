"""`progress-sse watch` in a real pseudo-terminal, as a person sees it (issue 16, item 7):
log lines above the bars, a failed job's whole error, colours by state (none under
NO_COLOR), each job's id with --all, and no traceback on Ctrl-C or a closed pipe.

The server runs on the test's event loop, so the terminal is read by a thread.
"""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import subprocess
import sys
import threading
import time

import httpx

from .helpers import ROOT, Service, create_job, wait_for
from .test_cli import cli_env

ERROR = "encode failed at chunk 7\nffmpeg: invalid data found\nexit status 1"


class Terminal:
    """`progress-sse ARGS` with a pseudo-terminal as its stdin, stdout and stderr."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "progress_sse", *args], cwd=ROOT,
            env={**cli_env(), "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "30",
                 **(env or {})},
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the child has gone and the terminal is closed
                return
            if not chunk:
                return
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")

    async def shows(self, needle: str, within: float = 10) -> None:
        await wait_for(lambda: needle in self.text, timeout=within,
                       what=f"{needle!r} on the terminal; it shows {self.text[-600:]!r}")

    async def wait(self, within: float = 15) -> int:
        deadline = time.monotonic() + within
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"watch did not exit: {self.text[-600:]!r}"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.reader.join, 5)
        os.close(self.master)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def test_watch_in_a_terminal_writes_logs_above_the_bar_and_the_whole_error(
        service: Service, client: httpx.AsyncClient) -> None:
    """A log line is written once, above the board (not lost in a redraw); a failed
    job's error is shown whole, every line of it; the state is coloured; exit 1."""
    job = await create_job(client, title="intro.mp4")
    url = f"/api/jobs/{job['id']}"
    term = Terminal("watch", job["id"], "--url", service.url)
    try:
        await term.shows("intro.mp4")
        await client.post(f"{url}/progress", json={"progress": 40, "message": "chunk 4"})
        await client.post(f"{url}/log", json={"level": "warning", "message": "slow disk"})
        await term.shows("slow disk")
        await client.post(f"{url}/finish", json={"status": "failed", "error": ERROR})
        assert await term.wait() == 1
    finally:
        term.kill()
    text = term.text
    # the log line is written with the board cleared below it, then the board again
    log_at = text.index("slow disk")
    assert "\x1b[J" in text[max(0, log_at - 80):log_at]
    assert "intro.mp4" in text[log_at:], "the board is drawn again below the log line"
    for line in ERROR.splitlines():
        assert line in text, f"the error's line {line!r} is not shown"
    assert "\x1b[31m" in text, "a failed job is drawn in red"
    assert "\x1b[33mwarning" in text, "a warning's level is coloured"
    assert "Traceback" not in text


async def test_watch_respects_no_color(service: Service, client: httpx.AsyncClient) -> None:
    """NO_COLOR set: the same board, without a single colour code."""
    job = await create_job(client, title="plain.mp4")
    term = Terminal("watch", job["id"], "--url", service.url, env={"NO_COLOR": "1"})
    try:
        await term.shows("plain.mp4")
        await client.post(f"/api/jobs/{job['id']}/finish",
                          json={"status": "failed", "error": ERROR})
        assert await term.wait() == 1
    finally:
        term.kill()
    assert "plain.mp4" in term.text and "exit status 1" in term.text
    assert "\x1b[3" not in term.text and "\x1b[0m" not in term.text


async def test_watch_all_shows_ids_and_ends_quietly_on_ctrl_c(
        service: Service, client: httpx.AsyncClient) -> None:
    """--all names each job by its id (two jobs of the same title are told apart), and
    Ctrl-C ends it with exit 0 and no traceback."""
    first = await create_job(client, title="same title")
    second = await create_job(client, title="same title")
    term = Terminal("watch", "--all", "--url", service.url)
    try:
        await term.shows(first["id"])
        await term.shows(second["id"])
        term.proc.send_signal(signal.SIGINT)
        assert await term.wait() == 0
    finally:
        term.kill()
    assert "Traceback" not in term.text and "KeyboardInterrupt" not in term.text


async def test_watch_into_a_closed_pipe_ends_quietly(service: Service,
                                                     client: httpx.AsyncClient) -> None:
    """`watch --all | head -1`: once the reader has gone, watch ends at its next write
    with exit 0, without a BrokenPipeError traceback (at the write or at exit)."""
    job = await create_job(client, title="piped")
    read_end, write_end = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "progress_sse", "watch", "--all", "--url", service.url,
        cwd=ROOT, env=cli_env(), stdout=write_end, stderr=asyncio.subprocess.PIPE)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:  # what `head -1` does
        first = await asyncio.to_thread(reader.readline)
    assert b"piped" in first
    for i in range(20):  # the reader has gone: the next writes meet a closed pipe
        await client.post(f"/api/jobs/{job['id']}/progress", json={"progress": i})
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()
    assert proc.returncode == 0

"""Real servers for tests: in-process uvicorn on a free port, or a separate process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from progress_sse.app import create_app
from progress_sse.app_context import Context
from progress_sse.server import Server, make_server
from progress_sse.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(check: Callable[[], Awaitable[bool]] | Callable[[], bool],
                   timeout: float = 5.0, interval: float = 0.01, what: str = "condition") -> None:
    """Poll `check` until it is true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class Service:
    """A running in-process service."""

    settings: Settings
    server: Server
    task: asyncio.Task[None]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def ctx(self) -> Context:
        return self.server.ctx

    async def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, timeout)


def relay_send(app: ASGIApp) -> ASGIApp:
    """The app behind a `send` of its own, as under a server other than uvicorn:
    streams cannot write pushed events at once and catch up in a task for each."""

    async def relayed(scope: Scope, receive: Receive, send: Send) -> None:
        async def relay(message: Message) -> None:
            await send(message)

        await app(scope, receive, relay)

    return relayed


def reframed(rewrite: Callable[[bytes], bytes]) -> Callable[[ASGIApp], ASGIApp]:
    """The app with each chunk of its streams' bodies rewritten: another server's framing."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            async def rewriting(message: Message) -> None:
                if message["type"] == "http.response.body" and message.get("more_body"):
                    message = {**message, "body": rewrite(message["body"])}
                await send(message)

            await app(scope, receive, rewriting)

        return wrapped

    return wrap


def raw_separators(body: bytes) -> bytes:
    """U+2028, U+2029 and U+0085 raw in the JSON (valid JSON; servers may send them so)."""
    for escaped, char in ((b"\\u2028", "\u2028"), (b"\\u2029", "\u2029"),
                          (b"\\u0085", "\x85")):
        body = body.replace(escaped, char.encode())
    return body


SEPARATORS = "one\u2028two\u2029three\x85four"  # characters str.splitlines cuts lines at


def settings_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                      **flags: Any) -> Settings:
    """Settings.load with `env` as the PROGRESS_SSE_* variables (and `flags` over them)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings.load(**flags)


async def start_service(settings: Settings, wrap: Callable[[ASGIApp], ASGIApp] | None = None,
                        **config: Any) -> Service:
    """The service in this process; `config` goes to uvicorn (http="h11", say)."""
    settings = settings.model_copy(update={"port": free_port()})
    app = create_app(settings)
    server = make_server(app, settings, **config)
    if wrap is not None:
        server.config.app = wrap(app)
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started or task.done(), what="server start")
    if task.done():
        task.result()
        raise AssertionError("server stopped during start-up")
    return Service(settings, server, task)


@dataclass
class ProcessService:
    """The service as a separate process, for kill -9, SIGTERM and restarts."""

    db: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra: str) -> None:
        env = {**os.environ, **(self.env or {})}
        env.setdefault("PROGRESS_SSE_LOG_FORMAT", "json")
        self.log_path = Path(self.db).with_suffix(f".{self.port}.log")
        self._log = open(self.log_path, "ab")  # closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "progress_sse", "serve", "--port", str(self.port),
             "--db", self.db, *extra],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError("server did not become healthy")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.wait(5)

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


_SSE_LINE_END = re.compile(r"\r\n|\r|\n")


def sse_lines(text: str) -> list[str]:
    """Lines as the SSE spec splits them: on CR, LF and CRLF only (str.splitlines and
    httpx's aiter_lines also cut at U+2028, U+2029, U+0085 and more)."""
    lines = _SSE_LINE_END.split(text)
    return lines[:-1] if lines and lines[-1] == "" else lines


async def aiter_sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """A streamed response's lines, split as the SSE spec says (see sse_lines)."""
    rest = ""
    async for text in response.aiter_text():
        lines = _SSE_LINE_END.split(rest + text)
        if lines[-1] == "" and (rest + text).endswith("\r"):
            lines[-2:] = [lines[-2] + "\r"]  # a CR that may be half of a CRLF: wait
        rest = lines.pop()
        for line in lines:
            yield line
    if rest:
        yield rest.rstrip("\r")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics answer: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value in a /metrics answer (fails if it is missing)."""
    found = samples(text)
    key = (name, frozenset(labels.items()))
    assert key in found, f"{key} not in /metrics:\n{text}"
    return found[key]


async def create_job(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    r = await client.post("/api/jobs", json=fields)
    assert r.status_code in (200, 201), r.text
    job: dict[str, Any] = r.json()["job"]
    return job


async def stored_log(client: httpx.AsyncClient, job_id: str | None = None,
                     after: int = 0) -> list[dict[str, Any]]:
    """Every stored event (of one job, or of all through each job), in id order."""
    events: list[dict[str, Any]] = []
    path = f"/api/jobs/{job_id}/events"
    while True:
        r = await client.get(path, params={"after": after, "limit": 1000})
        assert r.status_code == 200, r.text
        page = r.json()["events"]
        if not page:
            return events
        events.extend(page)
        after = page[-1]["id"]

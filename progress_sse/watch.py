"""`progress-sse watch`: follow one job (or every job) live, resuming by itself after a drop.

The stream is read with a small SSE parser over httpx, so the package needs no SSE
library. Every reconnect sends the last id seen as `Last-Event-ID`, so the output has
each event once, in order, across server restarts. A reader task fills a queue and
the main loop draws, so the clock on a live bar keeps ticking between events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import sys
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

from .client import resolve_url

OUTCOME_CODES = {"succeeded": 0, "failed": 1, "cancelled": 2}
EXIT_ERROR = 5
EXIT_INTERRUPTED = 130
TERMINAL = frozenset(OUTCOME_CODES)
READ_TIMEOUT_S = 60.0  # several keep-alives (15 s by default): a silent stream is a dead one
TICK_S = 0.25  # the live board's clock
DRAW_GAP_S = 0.1  # at most this often redrawn for events (a busy --all stream)


class WatchError(Exception):
    """The stream cannot be followed: refused (4xx) or unreachable for too long."""


# ---------------------------------------------------------------- SSE wire format


@dataclass(frozen=True)
class Frame:
    """One dispatched server-sent event."""

    id: str | None
    event: str
    data: str

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value


class SSEDecoder:
    """Lines in, events out, by the WHATWG rules that matter for a client."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.retry_ms: int | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> Frame | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the keep-alive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Frame | None:
        data, event = self._data, self._event or "message"
        self._data, self._event = [], ""
        if not data:
            return None
        return Frame(self.last_id, event, "\n".join(data))


# ---------------------------------------------------------------- following a stream


@dataclass
class Follower:
    """Reads one stream, reconnecting with Last-Event-ID until it ends for good (204)."""

    http: httpx.AsyncClient
    path: str
    params: httpx.QueryParams
    headers: dict[str, str]
    give_up_s: float  # consecutive seconds of failure before giving up; 0: never
    notify: Callable[[str], None] | None = None  # told when the connection is lost
    last_id: str | None = None
    retry_s: float = 1.0
    _failing_since: float | None = field(default=None, init=False)
    _failures: int = field(default=0, init=False)
    _ended: bool = field(default=False, init=False)

    async def frames(self) -> AsyncGenerator[Frame, None]:
        while True:
            try:
                async with contextlib.aclosing(self._connect()) as frames:
                    async for frame in frames:
                        yield frame
                if self._ended:
                    return
                delay = self.retry_s  # the server ended the stream (shutdown): come back
            except httpx.TransportError as exc:
                delay = self._failed(exc)
            await asyncio.sleep(delay)

    async def _connect(self) -> AsyncGenerator[Frame, None]:
        self._ended = False
        headers = {"Accept": "text/event-stream", **self.headers}
        if self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id
        timeout = httpx.Timeout(10.0, read=READ_TIMEOUT_S)
        async with self.http.stream("GET", self.path, params=self.params, headers=headers,
                                    timeout=timeout) as response:
            if response.status_code == 204:  # the job ended and we saw its end
                self._ended = True
                return
            if response.status_code >= 500 or response.status_code in (408, 429):
                raise httpx.RemoteProtocolError(f"{response.status_code} from the service")
            if response.status_code >= 400:
                raise WatchError(_error_text(response.status_code, await response.aread()))
            self._failing_since, self._failures = None, 0
            decoder = SSEDecoder()
            async for line in response.aiter_lines():
                frame = decoder.feed(line)
                if decoder.retry_ms is not None:
                    self.retry_s = decoder.retry_ms / 1000.0
                if frame is not None:
                    self.last_id = frame.id if frame.id is not None else self.last_id
                    yield frame

    def _failed(self, exc: Exception) -> float:
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if self.give_up_s and now - self._failing_since > self.give_up_s:
            raise WatchError(f"cannot reach the service for {self.give_up_s:g}s: {exc}") from exc
        self._failures += 1
        backoff: float = self.retry_s * 2 ** min(self._failures - 1, 4)
        return min(10.0, backoff) * random.uniform(0.7, 1.0)


def _error_text(status: int, body: bytes) -> str:
    try:
        err = json.loads(body)["error"]
        return f"{status} {err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{status}: {body[:200].decode(errors='replace')}"


# ---------------------------------------------------------------- what is shown


@dataclass
class Board:
    """The jobs as the stream last described them, and when each was heard of."""

    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    heard: dict[str, float] = field(default_factory=dict)

    def apply(self, frame: Frame) -> dict[str, Any]:
        data = frame.json()
        now = time.monotonic()
        if frame.event == "snapshot":
            if data.get("reset"):
                self.jobs.clear()
            for job in data.get("jobs", []):
                self.jobs[job["id"]] = job
                self.heard[job["id"]] = now
        elif isinstance(data.get("job"), dict):
            self.jobs[data["job"]["id"]] = data["job"]
            self.heard[data["job"]["id"]] = now
        return data

    def shown(self, limit: int) -> list[dict[str, Any]]:
        """Active jobs first, then the most recently heard-of finished ones."""
        active = [j for j in self.jobs.values() if j["status"] not in TERMINAL]
        done = sorted((j for j in self.jobs.values() if j["status"] in TERMINAL),
                      key=lambda j: self.heard.get(j["id"], 0.0), reverse=True)
        return (active + done)[:max(1, limit)]


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}:{secs:02d}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def bar(percent: float, width: int, fancy: bool) -> str:
    filled = round(max(0.0, min(100.0, percent)) * width / 100)
    full, empty = ("█", "░") if fancy else ("#", "-")
    return full * filled + empty * (width - filled)


def stage_text(job: dict[str, Any]) -> str:
    stages = job.get("stages") or []
    key = job.get("stage")
    for i, stage in enumerate(stages):
        if stage["key"] == key:
            return f"{stage['label']} {i + 1}/{len(stages)}"
    return key or ""


def job_line(job: dict[str, Any], since_heard: float, width: int, fancy: bool) -> str:
    """One job as one line: title, bar, percent, status, stage, elapsed, remaining, message."""
    finished = job["status"] in TERMINAL
    status = job["status"] + (" (stalled)" if job.get("stalled") else "")
    if job.get("pause_requested") and job["status"] == "running":
        status += " (pausing)"
    parts = [f"{(job.get('title') or job['id'])[:28]:<28}",
             f"[{bar(job.get('progress') or 0.0, 20, fancy)}]",
             f"{job.get('progress') or 0.0:5.1f}%", f"{status:<9}"]
    if stage_text(job):
        parts.append(stage_text(job))
    if job.get("elapsed_s") is not None:
        extra = 0.0 if finished or job["status"] == "paused" else since_heard
        parts.append(f"{duration(job['elapsed_s'] + extra)} elapsed")
    if not finished and job.get("eta_s") is not None:
        parts.append(f"~{duration(job['eta_s'] - since_heard)} left")
    note = job.get("error") if job["status"] == "failed" else job.get("message")
    if note:
        parts.append(str(note).splitlines()[0])
    line = "  ".join(parts)
    return line if len(line) <= width else line[:max(1, width - 1)] + "…"


class View:
    """Where events go: NDJSON, a redrawn live board, or one plain line per event."""

    def __init__(self, out: TextIO, mode: str) -> None:
        self.out = out
        self.mode = mode  # "json", "live" or "plain"
        self.board = Board()
        self.fancy = (getattr(out, "encoding", "") or "").lower().replace("-", "") == "utf8"
        self._drawn = 0
        self._drawn_at = 0.0

    def show(self, frame: Frame) -> dict[str, Any]:
        data = self.board.apply(frame)
        if self.mode == "json":
            self.out.write(frame.data + "\n")
        elif self.mode == "live":
            if time.monotonic() - self._drawn_at >= DRAW_GAP_S:
                self.draw()
        else:
            self._plain(frame, data)
        self.out.flush()
        return data

    def tick(self) -> None:
        if self.mode == "live":
            self.draw()
            self.out.flush()

    def draw(self) -> None:
        size = shutil.get_terminal_size((100, 24))
        now = time.monotonic()
        lines = [job_line(j, now - self.board.heard.get(j["id"], now), size.columns - 1,
                          self.fancy) for j in self.board.shown(size.lines - 1)]
        up = f"\x1b[{self._drawn}F" if self._drawn else "\r"
        self.out.write(up + "".join(f"\x1b[2K{line}\n" for line in lines) + "\x1b[J")
        self._drawn = len(lines)
        self._drawn_at = time.monotonic()

    def _plain(self, frame: Frame, data: dict[str, Any]) -> None:
        stamp = time.strftime("%H:%M:%S")
        if frame.event == "snapshot":
            for job in data.get("jobs", []):
                self.out.write(f"{stamp} {job['id']} {job_line(job, 0.0, 200, False)}\n")
        elif frame.event == "log":
            self.out.write(f"{stamp} {data['job_id']} log {data.get('level')}: "
                           f"{data.get('message')}\n")
        elif isinstance(data.get("job"), dict):
            self.out.write(f"{stamp} {data['job_id']} "
                           f"{job_line(data['job'], 0.0, 200, False)}\n")


# ---------------------------------------------------------------- the command


def outcome(frame: Frame, data: dict[str, Any], job_id: str) -> str | None:
    """The job's final status when this event tells it, else None."""
    if frame.event == "finished" and data.get("job_id") == job_id:
        return str(data["job"]["status"])
    if frame.event == "snapshot":
        for job in data.get("jobs", []):
            if job["id"] == job_id and job["status"] in TERMINAL:
                return str(job["status"])
    return None


async def _pump(follower: Follower, queue: asyncio.Queue[Frame | BaseException | None]) -> None:
    try:
        async with contextlib.aclosing(follower.frames()) as frames:
            async for frame in frames:
                await queue.put(frame)
        await queue.put(None)
    except Exception as exc:
        await queue.put(exc)


async def watch(*, url: str | None, token: str | None, job_id: str | None,
                kinds: Sequence[str] = (), as_json: bool = False, give_up_s: float = 60.0,
                out: TextIO = sys.stdout) -> int:
    """Follow a job to its end (exit code from its outcome), or every job until interrupted."""
    mode = "json" if as_json else ("live" if out.isatty() else "plain")
    view = View(out, mode)
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    if job_id is not None:
        path, params = f"/api/jobs/{job_id}/events", httpx.QueryParams()
    else:
        path, params = "/api/events", httpx.QueryParams([("kind", k) for k in kinds])
    async with httpx.AsyncClient(base_url=resolve_url(url), headers=auth) as http:
        follower = Follower(http, path, params, auth, give_up_s,
                            notify=None if mode == "live" else _warn)
        queue: asyncio.Queue[Frame | BaseException | None] = asyncio.Queue()
        reader = asyncio.create_task(_pump(follower, queue))
        try:
            status = await _consume(queue, view, job_id)
            view.tick()  # the final state, however recently the board was drawn
        except WatchError as exc:
            print(f"progress-sse watch: {exc}", file=sys.stderr)
            return EXIT_ERROR
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if job_id is not None and status is None:  # 204: we had seen the end already
            r = await http.get(f"/api/jobs/{job_id}")
            status = r.json()["job"]["status"] if r.status_code == 200 else None
    return OUTCOME_CODES.get(status or "", EXIT_ERROR)


def _warn(text: str) -> None:
    print(f"progress-sse watch: {text}", file=sys.stderr, flush=True)


async def _consume(queue: asyncio.Queue[Frame | BaseException | None], view: View,
                   job_id: str | None) -> str | None:
    while True:
        try:
            item = await asyncio.wait_for(queue.get(), TICK_S if view.mode == "live" else None)
        except TimeoutError:
            view.tick()
            continue
        if item is None:
            return None
        if isinstance(item, WatchError):
            raise item
        if isinstance(item, BaseException):
            raise WatchError(str(item)) from item
        data = view.show(item)
        if job_id is not None:
            status = outcome(item, data, job_id)
            if status is not None:
                return status

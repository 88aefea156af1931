"""`progress-sse watch`: follow one job (or every job) live, resuming by itself after a drop.

The stream is read by the SDK's reader (`AsyncProgressClient.events`, over httpx-sse,
which splits lines on CR, LF and CRLF only, as the spec says), not a parser of our
own: every reconnect sends the last id seen as `Last-Event-ID`, so the output has
each event once, in order, across server restarts. A reader task fills a queue and
the main loop draws, so the clock on a live bar keeps ticking between events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .client import TERMINAL, AsyncProgressClient, Event, ProgressClientError
from .codec import escape_separators

OUTCOME_CODES = {"succeeded": 0, "failed": 1, "cancelled": 2}
EXIT_ERROR = 5
EXIT_INTERRUPTED = 130
TICK_S = 0.25  # the live board's clock
DRAW_GAP_S = 0.1  # at most this often redrawn for events (a busy --all stream)


class WatchError(Exception):
    """The stream cannot be followed: refused (4xx) or unreachable for too long."""


# ---------------------------------------------------------------- what is shown


@dataclass
class Board:
    """The jobs as the stream last described them, and when each was heard of."""

    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    heard: dict[str, float] = field(default_factory=dict)

    def apply(self, event: Event) -> dict[str, Any]:
        data = event.data
        now = time.monotonic()
        if event.type == "snapshot":
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


def job_line(job: dict[str, Any], since_heard: float, width: int, fancy: bool,
             paint: bool = False, with_id: bool = False) -> str:
    """One job as one line: (id,) title, bar, percent, status, stage, elapsed, remaining,
    message. `paint`: the bar and status in the state's colour, for a terminal."""
    finished = job["status"] in TERMINAL
    status = job["status"] + (" (stalled)" if job.get("stalled") else "")
    if job.get("pause_requested") and job["status"] == "running":
        status += " (pausing)"
    title = job.get("title") or job["id"]
    head = [f"{job['id']}", f"{title[:28]:<28}"] if with_id else [f"{title[:28]:<28}"]
    coloured = [f"[{bar(job.get('progress') or 0.0, 20, fancy)}]",
                f"{job.get('progress') or 0.0:5.1f}%", f"{status:<9}"]
    parts: list[str] = []
    if stage_text(job):
        parts.append(stage_text(job))
    if job.get("elapsed_s") is not None:
        extra = 0.0 if finished or job["status"] == "paused" else since_heard
        parts.append(f"{duration(job['elapsed_s'] + extra)} elapsed")
    if not finished and job.get("eta_s") is not None:
        # a paused job's remaining time is frozen by the service: not counted down here
        ticking = 0.0 if job["status"] == "paused" else since_heard
        parts.append(f"~{duration(job['eta_s'] - ticking)} left")
    elif not finished and job.get("stalled"):
        parts.append("— left")  # a stalled job has no estimate
    note = job.get("error") if job["status"] == "failed" else job.get("message")
    if note:
        parts.append(str(note).splitlines()[0])
    line = "  ".join(head + coloured + parts)
    if len(line) > width:
        line = line[:max(1, width - 1)] + "…"
    if not paint:
        return line
    start = len("  ".join(head)) + 2  # the colour is added after the cut, on what is left
    end = start + len("  ".join(coloured))
    colour = state_colour(job)
    return f"{line[:start]}{colour}{line[start:end]}{RESET}{line[end:]}" if start < len(line) \
        else line


# SGR colours by state (https://no-color.org: none when NO_COLOR is set and not empty)
COLOURS = {"queued": "\x1b[2m", "running": "\x1b[36m", "paused": "\x1b[33m",
           "cancelling": "\x1b[33m", "succeeded": "\x1b[32m", "failed": "\x1b[31m",
           "cancelled": "\x1b[35m", "stalled": "\x1b[1;31m"}
LEVEL_COLOURS = {"warning": "\x1b[33m", "error": "\x1b[31m", "debug": "\x1b[2m"}
RESET = "\x1b[0m"


def state_colour(job: dict[str, Any]) -> str:
    if job.get("stalled") and job["status"] not in TERMINAL:
        return COLOURS["stalled"]
    return COLOURS.get(job["status"], "")


def use_colour(out: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set to anything."""
    env = os.environ if environ is None else environ
    return not env.get("NO_COLOR") and env.get("TERM") != "dumb" and out.isatty()


class View:
    """Where events go: NDJSON, a redrawn live board, or one plain line per event.

    On the live board, log lines and a failed job's whole error are written above the
    bars, which are drawn again below them (as tqdm's `write` does): they stay in the
    terminal's scrollback while the board keeps its place at the bottom."""

    def __init__(self, out: TextIO, mode: str, *, with_id: bool = False,
                 colour: bool = False) -> None:
        self.out = out
        self.mode = mode  # "json", "live" or "plain"
        self.with_id = with_id  # --all: each line names its job
        self.colour = colour and mode == "live"
        self.board = Board()
        self.fancy = (getattr(out, "encoding", "") or "").lower().replace("-", "") == "utf8"
        self.errors_shown: set[str] = set()
        self._drawn = 0
        self._drawn_at = 0.0

    def show(self, event: Event) -> dict[str, Any]:
        data = self.board.apply(event)
        if self.mode == "json":  # one line each, even for readers that split on U+2028
            self.out.write(escape_separators(event.raw) + "\n")
        elif self.mode == "live":
            for text in self._notes(event, data):
                self.write_above(text)
            if time.monotonic() - self._drawn_at >= DRAW_GAP_S:
                self.draw()
        else:
            self._plain(event, data)
            for text in self._notes(event, data, logs=False):
                self.out.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.out.flush()
        return data

    def tick(self) -> None:
        if self.mode == "live":
            self.draw()
            self.out.flush()

    def write_above(self, text: str) -> None:
        """A line (or lines) printed above the live board, which is drawn again below."""
        up = f"\x1b[{self._drawn}F" if self._drawn else "\r"
        self.out.write(up + "\x1b[J" + text.replace("\r", "") + "\n")
        self._drawn = 0
        self.draw()

    def draw(self) -> None:
        size = shutil.get_terminal_size((100, 24))
        now = time.monotonic()
        lines = [job_line(j, now - self.board.heard.get(j["id"], now), size.columns - 1,
                          self.fancy, self.colour, self.with_id)
                 for j in self.board.shown(size.lines - 1)]
        up = f"\x1b[{self._drawn}F" if self._drawn else "\r"
        self.out.write(up + "".join(f"\x1b[2K{line}\n" for line in lines) + "\x1b[J")
        self._drawn = len(lines)
        self._drawn_at = time.monotonic()

    def _notes(self, event: Event, data: dict[str, Any], logs: bool = True) -> list[str]:
        """What is written once, not redrawn: a log line; the whole error of a job that
        failed (the board's line has room for its first line only)."""
        notes: list[str] = []
        if logs and event.type == "log":
            level = str(data.get("level") or "info")
            colour = LEVEL_COLOURS.get(level, "") if self.colour else ""
            notes.append(f"{data.get('job_id')} {colour}{level}{RESET if colour else ''}: "
                         f"{data.get('message')}")
        jobs = event.jobs if event.type == "snapshot" else [event.job] if event.job else []
        for job in jobs:
            if job["status"] == "failed" and job.get("error") \
                    and job["id"] not in self.errors_shown:
                self.errors_shown.add(job["id"])
                colour = COLOURS["failed"] if self.colour else ""
                notes.append(f"{job['id']} {colour}failed{RESET if colour else ''}: "
                             f"{job['error']}")
        return notes

    def _plain(self, event: Event, data: dict[str, Any]) -> None:
        stamp = time.strftime("%H:%M:%S")
        if event.type == "snapshot":
            for job in data.get("jobs", []):
                self.out.write(f"{stamp} {job['id']} {job_line(job, 0.0, 200, False)}\n")
        elif event.type == "log":
            self.out.write(f"{stamp} {data['job_id']} log {data.get('level')}: "
                           f"{data.get('message')}\n")
        elif isinstance(data.get("job"), dict):
            self.out.write(f"{stamp} {data['job_id']} "
                           f"{job_line(data['job'], 0.0, 200, False)}\n")


# ---------------------------------------------------------------- the command


def outcome(event: Event, job_id: str) -> str | None:
    """The job's final status when this event tells it, else None."""
    if event.type == "finished" and event.job_id == job_id and event.job is not None:
        return str(event.job["status"])
    if event.type == "snapshot":
        for job in event.jobs:
            if job["id"] == job_id and job["status"] in TERMINAL:
                return str(job["status"])
    return None


Item = Event | BaseException | None  # an event, what stopped the reader, or its end


async def _pump(pc: AsyncProgressClient, job_id: str | None, kinds: Sequence[str],
                give_up_s: float, queue: asyncio.Queue[Item]) -> None:
    try:
        async with contextlib.aclosing(pc.events(job_id, kinds=kinds,
                                                 give_up_after=give_up_s or None)) as events:
            async for event in events:
                await queue.put(event)
        await queue.put(None)
    except Exception as exc:
        await queue.put(exc)


async def watch(*, url: str | None, token: str | None, job_id: str | None,
                kinds: Sequence[str] = (), as_json: bool = False, give_up_s: float = 60.0,
                out: TextIO = sys.stdout) -> int:
    """Follow a job to its end (exit code from its outcome), or every job until interrupted."""
    mode = "json" if as_json else ("live" if out.isatty() else "plain")
    view = View(out, mode, with_id=job_id is None, colour=use_colour(out))
    async with AsyncProgressClient(url, token=token or None, max_rate=None) as pc:
        queue: asyncio.Queue[Item] = asyncio.Queue()
        reader = asyncio.create_task(_pump(pc, job_id, kinds, give_up_s, queue))
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
            with contextlib.suppress(ProgressClientError):
                status = str((await pc.get(job_id))["status"])
    return OUTCOME_CODES.get(status or "", EXIT_ERROR)


async def _consume(queue: asyncio.Queue[Item], view: View, job_id: str | None) -> str | None:
    while True:
        try:
            item = await asyncio.wait_for(queue.get(), TICK_S if view.mode == "live" else None)
        except TimeoutError:
            view.tick()
            continue
        if item is None:
            return None
        if isinstance(item, BaseException):
            raise WatchError(str(item)) from item
        view.show(item)
        if job_id is not None:
            status = outcome(item, job_id)
            if status is not None:
                return status

"""The command's output: relayed as is, and its lines queued and posted as the job's log."""

from __future__ import annotations

import asyncio
import os
import time
from typing import IO

from ..client import ProgressClientError, ServiceUnavailable
from .options import FLUSH_S, MAX_MESSAGE, MAX_QUEUED, clean_line, say
from .state import _RunState


class _Output(_RunState):
    """Output pumps and the log poster, rate-limited (see the package doc)."""

    async def pump(self, fd: int, relay: IO[str], level: str, tail: bool = False) -> None:
        """Relay the command's output as is, and queue its lines for the job's log."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
        out: IO[bytes] | None = getattr(relay, "buffer", None)
        partial = b""
        try:
            while chunk := await reader.read(65536):
                if out is not None:
                    try:
                        out.write(chunk)
                        out.flush()
                    except (BrokenPipeError, ValueError, OSError):
                        out = None  # our own output is gone (`| head`); keep logging
                *lines, partial = (partial + chunk).split(b"\n")
                for raw in lines:
                    self.line(raw, level, tail)
                if len(partial) > 4 * MAX_MESSAGE:  # no newline for a long time
                    partial = partial[partial.rfind(b"\r", 0, -1) + 1:]
                    if len(partial) > 4 * MAX_MESSAGE:
                        self.line(partial, level, tail)
                        partial = b""
        finally:
            if partial:
                self.line(partial, level, tail)
            transport.close()

    def line(self, raw: bytes, level: str, tail: bool) -> None:
        text = clean_line(raw)
        if not text:
            return
        if tail:
            self.stderr_tail.append(text)
        if self.job_over:
            return
        if not self.bucket.take() or len(self.lines) >= MAX_QUEUED:
            self.skipped += 1
            return
        notice = self.notice()
        if notice:
            self.lines.append(("warning", notice))
        self.lines.append((level, text))
        self.have_lines.set()

    def notice(self) -> str | None:
        """Say how many lines the log is missing, once, where they went missing."""
        parts = []
        if self.skipped:
            parts.append(f"{self.skipped} output line{'s' * (self.skipped != 1)} not "
                         f"recorded (over {self.opts.log_rate:g} lines/s)")
        if self.lost:
            parts.append(f"{self.lost} output line{'s' * (self.lost != 1)} lost while the "
                         "service was unreachable")
        self.skipped = self.lost = 0
        return "[progress-sse run] " + "; ".join(parts) if parts else None

    async def poster(self) -> None:
        """Post queued lines in order; a failure drops the line and counts it."""
        while True:
            while not self.lines:
                self.idle = True
                self.have_lines.clear()
                await self.have_lines.wait()
            self.idle = False
            level, message = self.lines.popleft()
            if self.job_over:
                continue
            try:
                await self.post("log", {"level": level, "message": message})
            except ServiceUnavailable as exc:
                self.lost += 1
                self.service_down(exc)
            except ProgressClientError as exc:
                self.lost += 1
                say(f"a log line was refused: {exc}")

    async def flush(self, poster: asyncio.Task[None]) -> None:
        """Let the queued lines go out (for a while), then say what the log misses."""
        notice = self.notice()
        if notice and not self.job_over:
            self.lines.append(("warning", notice))
            self.have_lines.set()
        deadline = time.monotonic() + FLUSH_S
        while (self.lines or not self.idle) and time.monotonic() < deadline \
                and not poster.done():
            await asyncio.sleep(0.02)
        poster.cancel()
        await asyncio.gather(poster, return_exceptions=True)
        # the line being posted when it was cancelled may not be stored: count the rest
        if self.lines and not self.job_over:
            say(f"{len(self.lines)} output lines were not posted to the job")

"""`progress-sse run -- CMD ARGS...`: any program becomes a tracked job, unchanged.

The command runs as a child with the job's id, worker token and the service URL in its
environment ($PROGRESS_SSE_JOB, $PROGRESS_SSE_WORKER_TOKEN, $PROGRESS_SSE_URL), so it may
post progress itself. Its output still reaches the terminal; each line is also posted as
a `log` event (stdout at level info, stderr at --stderr-level), rate-limited. The job
is heartbeated while the command runs and finished by its exit status.

Choices that may look odd but are deliberate:

* The runner's own posts carry no `seq`. The service keeps one last `seq` per job, and
  a command that posts too (`progress-sse post`, the SDK) numbers its posts from the
  clock; numbered posts from two writers would refuse each other (409). A lost answer
  may thus store a log line twice, which is better than refusing the command's posts.
* The command starts in a session of its own, so a cancel reaches its children too
  (SIGTERM to the whole process group, SIGKILL to what is left after --grace). It has
  no controlling terminal; Ctrl-C, SIGTERM and SIGHUP sent to `run` are passed on.
* Output is read from pipes of our own, not asyncio's: a background grandchild that
  keeps them open must not keep the job running once the command itself has exited.
* A pause stops the command's process group (SIGSTOP) and a resume continues it
  (SIGCONT); `--no-pause` leaves it running and says so in the job's log.
* The service being unreachable never stops the command: log lines that cannot be
  posted are counted and reported later, and the finish is retried for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import IO, Any

from .client import (
    LONG_POLL_S,
    TERMINAL,
    URL_ENV,
    AsyncProgressClient,
    Control,
    CreatedJob,
    JobFinishedError,
    ProgressClientError,
    ServiceUnavailable,
    StaleAttemptError,
)

JOB_ENV = "PROGRESS_SSE_JOB"
WORKER_TOKEN_ENV = "PROGRESS_SSE_WORKER_TOKEN"

EXIT_RUN_ERROR = 125  # run could not start the job; the command did not run (as env, timeout)
EXIT_CANNOT_EXECUTE = 126  # as shells say: found, but not executable
EXIT_NOT_FOUND = 127

MAX_MESSAGE = 8000  # the service's limit for log messages and errors
MAX_TITLE = 200
MAX_QUEUED = 1000  # log lines waiting for the service; beyond it they are counted, not kept
DRAIN_AFTER_EXIT_S = 0.5  # output still arriving from grandchildren after the command exits
FLUSH_S = 10.0  # longest wait for queued log lines once the command is over
RETRY_S = 2.0  # between tries of the control poll and the finish while the service is away

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class RunOptions:
    """What `progress-sse run` was asked to do."""

    command: list[str]
    url: str | None = None
    token: str | None = None
    kind: str = "command"
    title: str | None = None
    heartbeat_timeout_s: float | None = None
    grace_s: float = 10.0
    log_rate: float = 10.0  # lines per second, sustained; bursts of 5 s worth pass
    stderr_level: str = "warning"
    error_lines: int = 20
    pause: bool = True
    finish_timeout_s: float = 60.0


def say(message: str) -> None:
    """Our own voice on stderr, apart from the command's output."""
    print(f"progress-sse run: {message}", file=sys.stderr, flush=True)


def clean_line(raw: bytes) -> str:
    """One output line as a terminal would leave it: the text after the last CR, without
    colour codes or control characters (the service refuses those), at most 8000."""
    text = raw.rstrip(b"\r").rpartition(b"\r")[2].decode("utf-8", "replace")
    text = _CONTROL.sub("", _ANSI.sub("", text)).rstrip()
    return text[:MAX_MESSAGE]


def default_title(command: list[str]) -> str:
    title = _CONTROL.sub("?", shlex.join(command))
    return title if len(title) <= MAX_TITLE else title[:MAX_TITLE - 1] + "…"


def exit_code(returncode: int) -> int:
    """As a shell reports it: a death by signal N is 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the command was killed by {name} (exit status {128 - returncode})"
    return f"the command exited with status {returncode}"


class _Bucket:
    """Token bucket: `rate` lines a second, bursts of `burst`."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


async def run_command(opts: RunOptions) -> int:
    """Create the job, run the command under it, finish it; the command's exit code."""
    async with AsyncProgressClient(opts.url, token=opts.token, max_rate=None,
                                   retries=3) as pc:
        title = opts.title if opts.title is not None else default_title(opts.command)
        try:
            created = await pc.create(kind=opts.kind, title=title,
                                      heartbeat_timeout_s=opts.heartbeat_timeout_s)
        except ProgressClientError as exc:
            say(f"could not create the job at {pc.url}: {exc}. The command was not started.")
            return EXIT_RUN_ERROR
        if created.worker_token is None:  # only a repeated id answers without one
            say(f"the service gave no worker token for job {created.id}")
            return EXIT_RUN_ERROR
        return await _Runner(pc, created, opts).run()


class _Runner:
    """One command under one job: output pumps, poster, heartbeat, control poll."""

    def __init__(self, pc: AsyncProgressClient, created: CreatedJob, opts: RunOptions) -> None:
        self.pc = pc
        self.opts = opts
        self.job_id = created.id
        self.token: str = created.worker_token or ""
        self.attempt = int(created.job.get("attempt") or 1)
        timeout = float(created.job.get("heartbeat_timeout_s") or 60.0)
        self.heartbeat_s = min(30.0, max(0.2, timeout / 3.0))
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: deque[tuple[str, str]] = deque()
        self.have_lines = asyncio.Event()
        self.idle = True  # the poster waits for lines, none is on its way
        self.bucket = _Bucket(max(opts.log_rate, 0.01), max(1.0, opts.log_rate * 5.0))
        self.skipped = 0  # over the rate (or the queue's bound), not yet reported
        self.lost = 0  # the service could not take them, not yet reported
        self.stderr_tail: deque[str] = deque(maxlen=max(1, opts.error_lines))
        self.stop_reason: str | None = None  # why the job ends cancelled
        self.stop_signal = signal.SIGTERM
        self.killer: asyncio.Task[None] | None = None
        self.paused = False
        self.pause_refused = False
        self.job_over = False  # finished by someone else (the command itself, say)
        self.unreachable = False

    # ------------------------------------------------------------ the whole run

    async def run(self) -> int:
        env = {**os.environ, URL_ENV: self.pc.url, JOB_ENV: self.job_id,
               WORKER_TOKEN_ENV: self.token}
        say(f"job {self.job_id} at {self.pc.url}")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.opts.command, stdout=out_w, stderr=err_w, env=env,
                start_new_session=True)
        except OSError as exc:
            os.close(out_r)
            os.close(err_r)
            code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXECUTE
            error = f"cannot run {self.opts.command[0]!r}: {exc.strerror or exc}"
            say(error)
            await self.finish("failed", error=error)
            return code
        finally:
            os.close(out_w)
            os.close(err_w)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self.interrupted, sig)
        pumps = [asyncio.create_task(self.pump(out_r, sys.stdout, "info")),
                 asyncio.create_task(self.pump(err_r, sys.stderr, self.opts.stderr_level,
                                               tail=True))]
        helpers = [asyncio.create_task(self.poster()), asyncio.create_task(self.heartbeat()),
                   asyncio.create_task(self.watch_control())]
        try:
            returncode = await self.proc.wait()
            await asyncio.wait(pumps, timeout=DRAIN_AFTER_EXIT_S)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for task in pumps + helpers[1:]:
                task.cancel()
            await asyncio.gather(*pumps, *helpers[1:], return_exceptions=True)
        if self.stop_reason is not None:
            await self.end_group()
        await self.flush(helpers[0])
        return await self.conclude(returncode)

    async def conclude(self, returncode: int) -> int:
        """Finish the job by how the command ended; run's exit code."""
        code = exit_code(returncode)
        if self.stop_reason is not None:
            with contextlib.suppress(ProgressClientError):
                await self.post("log", {"level": "warning", "message": describe_exit(returncode)})
            await self.finish("cancelled", error=self.stop_reason)
            return code or 128 + self.stop_signal  # never "success" for a cancelled job
        if returncode == 0:
            await self.finish("succeeded", result={"exit_code": 0})
            return 0
        error = describe_exit(returncode)
        if self.stderr_tail:
            tail = "\n".join(self.stderr_tail)
            room = MAX_MESSAGE - len(error) - 40
            error += f"; the last lines of stderr:\n{tail[-room:]}"
        await self.finish("failed", error=error)
        return code

    # ------------------------------------------------------------ output

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

    # ------------------------------------------------------------ the service

    async def post(self, what: str, body: dict[str, Any]) -> dict[str, Any]:
        """One worker post, without `seq` (see the module doc); learns of a finished job."""
        try:
            answer = await self.pc.post_worker(self.job_id, what,
                                               {**body, "attempt": self.attempt},
                                               token=self.token)
        except (JobFinishedError, StaleAttemptError):
            self.job_over = True
            raise
        self.service_back()
        return answer

    def service_down(self, exc: Exception) -> None:
        if not self.unreachable:
            self.unreachable = True
            say(f"the service is unreachable ({exc}); the command goes on")

    def service_back(self) -> None:
        if self.unreachable:
            self.unreachable = False
            say("the service is reachable again")

    async def heartbeat(self) -> None:
        """Mark the job running, then keep it from looking stalled while the command is
        quiet."""
        what = "progress"  # first an event, so viewers see the job start
        while True:
            try:
                answer = await self.post(what, {})
                what = "heartbeat"
            except ServiceUnavailable as exc:
                self.service_down(exc)
            except ProgressClientError:
                return
            else:
                await self.obey(Control.from_dict(answer.get("control") or {}))
            await asyncio.sleep(self.heartbeat_s)

    async def watch_control(self) -> None:
        """Long-poll the control state: a cancel or a pause reaches us at once."""
        while not self.job_over and self.stop_reason is None:
            try:
                control = await self.pc.control(self.job_id, wait=LONG_POLL_S,
                                                pause_requested=self.paused or
                                                self.pause_refused, token=self.token)
            except ServiceUnavailable as exc:
                self.service_down(exc)
                await asyncio.sleep(RETRY_S)
                continue
            except ProgressClientError as exc:
                say(f"cannot read the job's control state: {exc}")
                return
            self.service_back()
            await self.obey(control)

    async def obey(self, control: Control) -> None:
        if self.stop_reason is not None or self.proc is None:
            return
        if control.attempt is not None and control.attempt > self.attempt:
            self.job_over = True
            self.stop("the job was requeued; this run's attempt is over", signal.SIGTERM)
        elif control.cancel_requested or control.status == "cancelled":
            self.stop(control.reason or "cancel requested", signal.SIGTERM)
        elif control.status in TERMINAL:
            self.job_over = True
        elif control.pause_requested != self.paused:
            await self.pause(control.pause_requested)

    async def pause(self, on: bool) -> None:
        """Stop or continue the command's process group, and tell the service."""
        if not self.opts.pause:
            if on and not self.pause_refused:
                self.pause_refused = True
                with contextlib.suppress(ProgressClientError):
                    await self.post("log", {"level": "warning", "message":
                                            "pause requested, but run was started with "
                                            "--no-pause: the command keeps running"})
            self.pause_refused = on
            return
        self.signal_group(signal.SIGSTOP if on else signal.SIGCONT)
        self.paused = on
        with contextlib.suppress(ProgressClientError):
            await self.post("progress", {"paused": on})

    # ------------------------------------------------------------ stopping

    def interrupted(self, sig: int) -> None:
        """Ctrl-C, SIGTERM or SIGHUP to us: pass it on; a second one kills at once."""
        if self.stop_reason is not None:
            self.signal_group(signal.SIGKILL)
            return
        self.stop(f"progress-sse run was interrupted ({signal.Signals(sig).name})",
                  signal.Signals(sig))

    def stop(self, reason: str, sig: signal.Signals) -> None:
        """Ask the command's process group to end; SIGKILL it after the grace period."""
        self.stop_reason = reason
        self.stop_signal = sig
        say(f"{reason}: sending {sig.name} to the command")
        self.signal_group(sig)
        if self.paused:
            self.signal_group(signal.SIGCONT)  # a stopped process cannot act on it
        self.killer = asyncio.create_task(self.kill_after_grace())
        self.lines.append(("warning", f"{reason}: {sig.name} sent to the command, SIGKILL "
                           f"in {self.opts.grace_s:g} s if it is still running"))
        self.have_lines.set()

    async def kill_after_grace(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), self.opts.grace_s)
        if self.proc.returncode is None:
            say(f"the command is still running after {self.opts.grace_s:g} s: SIGKILL")
            self.lines.append(("warning", f"still running after {self.opts.grace_s:g} s: "
                               "SIGKILL sent to the command"))
            self.have_lines.set()
            self.signal_group(signal.SIGKILL)

    async def end_group(self) -> None:
        """After a cancel, nothing of the command outlives the grace period."""
        if self.killer is not None:
            await self.killer
        self.signal_group(signal.SIGKILL)

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def finish(self, status: str, *, error: str | None = None,
                     result: Any = None) -> None:
        """Record the outcome, retrying while the service is away (finish_timeout_s)."""
        body: dict[str, Any] = {"status": status}
        if error is not None and status != "succeeded":
            body["error"] = error[:MAX_MESSAGE]
        if result is not None:
            body["result"] = result
        deadline = time.monotonic() + self.opts.finish_timeout_s
        while True:
            try:
                await self.post("finish", body)
                return
            except (JobFinishedError, StaleAttemptError):
                return  # the command (or a requeue) ended the job: that outcome stands
            except ServiceUnavailable as exc:
                if time.monotonic() >= deadline:
                    say(f"could not record the outcome ({status}) of job {self.job_id}: {exc}")
                    return
                self.service_down(exc)
                await asyncio.sleep(RETRY_S)
            except ProgressClientError as exc:
                say(f"the service refused the outcome ({status}) of job {self.job_id}: {exc}")
                return


def main(opts: RunOptions) -> int:
    """Entry point for the CLI: the event loop around run_command."""
    return asyncio.run(run_command(opts))


__all__ = ["EXIT_CANNOT_EXECUTE", "EXIT_NOT_FOUND", "EXIT_RUN_ERROR", "JOB_ENV",
           "WORKER_TOKEN_ENV", "RunOptions", "main", "run_command"]

"""What `progress-sse run` was asked to do, and the text it makes of a command's output."""

from __future__ import annotations

import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass

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

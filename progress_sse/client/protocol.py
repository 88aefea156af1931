"""What goes over the wire, and how a failed request is retried; no I/O here.

Constants, the values the SDK hands out (Control, CreatedJob), request bodies, the
reading of answers and the retry policy, shared by the sync and async drivers.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ..schema import MAX_TEXT
from .errors import APIError, JobFinishedError, ServiceUnavailable, StaleAttemptError

log = logging.getLogger("progress_sse.client")  # one logger for the whole SDK

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "PROGRESS_SSE_URL"
TOKEN_ENV = "PROGRESS_SSE_TOKEN"
LONG_POLL_S = 25.0  # one control long-poll while paused; the server caps it (max_wait_s)
MAX_ERROR_CHARS = MAX_TEXT  # the server's limit for `error` and log messages
ABANDONED = "worker interrupted while starting"
WORKER_POSTS = frozenset({"progress", "log", "finish", "heartbeat"})
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_RETRY_S = 1.0  # the reconnect delay until a stream's `retry:` says otherwise
MAX_RECONNECT_S = 30.0  # the longest backoff between failed reconnects (unless `retry:` is longer)
STREAM_READ_TIMEOUT_S = 60.0  # several keep-alives (15 s by default): a silent stream is dead

StageSpec = str | Mapping[str, Any]

# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class Control:
    """What the worker must obey, as of the last answer from the service."""

    cancel_requested: bool = False
    pause_requested: bool = False
    reason: str | None = None
    status: str | None = None
    attempt: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Control:
        return cls(bool(d.get("cancel_requested")), bool(d.get("pause_requested")),
                   d.get("reason"), d.get("status"), d.get("attempt"))

    def as_dict(self) -> dict[str, Any]:
        return {"cancel_requested": self.cancel_requested,
                "pause_requested": self.pause_requested, "reason": self.reason,
                "status": self.status, "attempt": self.attempt}


@dataclass(frozen=True)
class CreatedJob:
    """A producer's view of a new job: the job and the token its worker needs."""

    job: dict[str, Any]
    worker_token: str | None  # None when the id already existed (a repeat of the create)
    created: bool

    @property
    def id(self) -> str:
        return str(self.job["id"])


@dataclass(frozen=True)
class _Options:
    max_rate: float | None
    retries: int
    backoff: float
    timeout: float
    heartbeat_interval: float | None
    control_max_age: float
    finish_timeout: float = 120.0
    max_buffered_logs: int = 1000


# ---------------------------------------------------------------- helpers


def resolve_url(url: str | None) -> str:
    """The service URL: the argument, else $PROGRESS_SSE_URL, else the local default."""
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def resolve_token(token: str | None) -> str | None:
    return token if token is not None else (os.environ.get(TOKEN_ENV) or None)


def clock_seq() -> int:
    """A first `seq` ahead of any earlier worker's: the clock in 10-microsecond units.

    The service takes a seq up to schema.MAX_SEQ (10**15), which this stays under until the
    year 2286.
    """
    return time.time_ns() // 10_000


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _retry_delays(retries: int, backoff: float, cap: float = 8.0) -> Iterator[float]:
    """Exponential backoff with jitter, so many workers do not retry in step."""
    for i in range(retries):
        yield min(cap, backoff * 2**i) * random.uniform(0.5, 1.0)


class _Attempts:
    """One request's retry policy, for both drivers: after each failure or answer, how
    long to wait before trying again, or what to raise; the driver sends and sleeps."""

    def __init__(self, method: str, path: str, retries: int, backoff: float) -> None:
        self.what = f"{method} {path}"
        self._delays = _retry_delays(retries, backoff)

    def failed(self, exc: httpx.TransportError) -> float:
        """The wait after a connection error; raises once the retries are spent."""
        delay = next(self._delays, None)
        if delay is None:
            raise ServiceUnavailable(f"{self.what}: {exc!r}") from exc
        log.info("retrying %s in %.2fs: %r", self.what, delay, exc)
        return delay

    def answered(self, response: httpx.Response) -> float | None:
        """The wait before trying again (5xx, 408, 429), or None: the answer stands."""
        if not _retryable(response.status_code):
            return None
        delay = next(self._delays, None)
        if delay is not None:
            return max(delay, _retry_after(response))
        if response.status_code >= 500:
            raise ServiceUnavailable(f"{self.what}: {response.status_code}")
        return None


def _retryable(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def unreachable(exc: BaseException) -> bool:
    """A failure that says nothing about the post itself: keep it and send it again later."""
    return isinstance(exc, ServiceUnavailable) or (
        isinstance(exc, APIError) and _retryable(exc.status_code))


def _retry_after(response: httpx.Response) -> float:
    raw = response.headers.get("retry-after", "")
    return min(float(raw), 30.0) if raw.replace(".", "", 1).isdigit() else 0.0


def _api_error(response: httpx.Response) -> APIError:
    try:
        err = response.json()["error"]
        code, message, field = str(err["code"]), str(err["message"]), err.get("field")
    except (ValueError, KeyError, TypeError):
        code, message, field = "http_error", response.text[:200] or response.reason_phrase, None
    kind = {"job_finished": JobFinishedError, "stale_attempt": StaleAttemptError}.get(
        code, APIError)
    return kind(response.status_code, code, message, field)


def _decode(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise _api_error(response)
    if response.status_code == 204 or not response.content:
        return {}
    body: dict[str, Any] = response.json()
    return body


def _clean(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Text the service accepts: no control characters, within its length limit."""
    text = _CONTROL_CHARS.sub("?", text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _fields(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _merge(pending: dict[str, Any] | None, update: dict[str, Any]) -> dict[str, Any]:
    """The newest progress wins; a newer `current` makes an older `progress` stale."""
    merged = dict(pending or {})
    if "current" in update and "progress" not in update:
        merged.pop("progress", None)
    merged.update(update)
    return merged


def _job_spec(*, kind: str, title: str, queue: str | None, stages: Sequence[StageSpec] | None,
              total: float | None, meta: Mapping[str, Any] | None, id: str | None,
              heartbeat_timeout_s: float | None, webhook: str | None = None,
              webhook_events: Sequence[str] | None = None,
              notify_email: str | Sequence[str] | None = None) -> dict[str, Any]:
    """The create body; a client-made id makes a retried create safe."""
    return _fields(id=id or f"j_{secrets.token_hex(8)}", kind=kind, title=title, queue=queue,
                   stages=[dict(s) if isinstance(s, Mapping) else s for s in stages or ()] or None,
                   total=total, meta=dict(meta) if meta else None,
                   heartbeat_timeout_s=heartbeat_timeout_s, webhook=webhook,
                   webhook_events=None if webhook_events is None else list(webhook_events),
                   notify_email=notify_email if notify_email is None
                   or isinstance(notify_email, str) else list(notify_email))


def _control_params(wait: float, cancel_requested: bool, pause_requested: bool
                    ) -> dict[str, str]:
    return {"wait": f"{wait:g}", "cancel_requested": str(cancel_requested).lower(),
            "pause_requested": str(pause_requested).lower()}



def _finish_body(status: str, result: Any, error: str | None) -> dict[str, Any]:
    return _fields(status=status, result=result, error=None if error is None else _clean(error))


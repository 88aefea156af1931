"""What `events()` yields, and one reading's cursor and reconnect policy; no I/O here."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import ServerSentEvent

from .errors import ProgressClientError, ServiceUnavailable
from .protocol import (
    DEFAULT_RETRY_S,
    MAX_RECONNECT_S,
    TERMINAL,
    _api_error,
    _auth,
    _retry_after,
    _retryable,
)

log = logging.getLogger("progress_sse.client")  # one logger for the whole SDK


@dataclass(frozen=True)
class Event:
    """One event of a stream, as `events()` yields it: never a keep-alive or an empty frame.

    `data` is the parsed JSON the stream's `data:` line carried (the same object the JSON
    history answers); `raw` is that line as received.
    """

    id: int
    type: str  # snapshot, created, progress, log, status, finished
    data: dict[str, Any]
    raw: str = field(default="", repr=False, compare=False)

    @property
    def job_id(self) -> str | None:
        value = self.data.get("job_id")
        return None if value is None else str(value)

    @property
    def job(self) -> dict[str, Any] | None:
        """The job's state after this event (None for a snapshot: see `jobs`)."""
        job = self.data.get("job")
        return job if isinstance(job, dict) else None

    @property
    def jobs(self) -> list[dict[str, Any]]:
        """A snapshot's jobs (empty for other events)."""
        jobs = self.data.get("jobs")
        return jobs if isinstance(jobs, list) else []

    @property
    def reset(self) -> bool:
        """A snapshot sent because the resume point was older than the service keeps:
        events in between are lost, and this snapshot replaces what the reader knew."""
        return bool(self.data.get("reset"))


class _Reading:
    """One `events()` call's cursor and reconnect policy, shared by the sync and async
    readers; no I/O here. The wire is parsed by httpx-sse (lines split on CR, LF and
    CRLF only, as the spec says); this only turns its events into ours."""

    def __init__(self, job: str | None, jobs: Sequence[str], kinds: Sequence[str],
                 last_event_id: int | None, reconnect: bool, give_up_after: float | None,
                 read_timeout: float, timeout: float) -> None:
        if job is not None and jobs:
            raise ValueError("give `job` (one job's stream) or `jobs` (a filter), not both")
        self.job = job
        self.path = f"/api/jobs/{job}/events" if job is not None else "/api/events"
        pairs: list[tuple[str, str | int | float | bool | None]] = [("job", j) for j in jobs]
        self.params = httpx.QueryParams(pairs + [("kind", k) for k in kinds])
        self.last_id = last_event_id
        self.reconnect = reconnect
        self.give_up_after = give_up_after
        self.timeout = httpx.Timeout(timeout, read=read_timeout)
        self.retry_s = DEFAULT_RETRY_S  # until the service says otherwise
        self.done = False
        self._failing_since: float | None = None
        self._failures = 0

    def headers(self, token: str | None) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store", **_auth(token)}
        if self.last_id is not None:
            headers["Last-Event-ID"] = str(self.last_id)
        return headers

    def opened(self, response: httpx.Response) -> bool:
        """Whether to read this answer as a stream; False: the stream is over (204)."""
        if response.status_code == 204:  # the job finished and the caller saw its end
            self.done = True
            return False
        content_type = response.headers.get("content-type", "").partition(";")[0].strip()
        if response.status_code != 200 or content_type != "text/event-stream":
            raise ProgressClientError(f"GET {self.path}: expected an event stream, got "
                                      f"{response.status_code} {content_type or 'no type'}")
        self._failing_since, self._failures = None, 0
        return True

    def take(self, sse: ServerSentEvent) -> Event | None:
        """Our event for one of httpx-sse's, or None when it has no data.

        httpx-sse dispatches an event at every blank line once any id was seen (the id
        persists), so a blank line with nothing before it comes out as an event without
        data: never one for the caller. Its `retry` is the service's reconnect delay.
        """
        if sse.retry is not None and sse.retry >= 0:
            self.retry_s = sse.retry / 1000.0
        if not sse.data:
            return None
        try:
            data = json.loads(sse.data)
        except ValueError as exc:
            raise ProgressClientError(f"GET {self.path}: an event that is not JSON: "
                                      f"{sse.data[:200]!r}") from exc
        if not isinstance(data, dict):
            raise ProgressClientError(f"GET {self.path}: an event that is not an object")
        raw_id = sse.id if sse.id.isdigit() else data.get("id")
        if raw_id is None:
            raise ProgressClientError(f"GET {self.path}: an event without an id")
        event = Event(int(raw_id), sse.event, data, sse.data)
        self.last_id = event.id
        if self.job is not None:
            self.done = _job_ended(event, self.job)
        return event

    def ended(self) -> float | None:
        """The stream ended without an error (a restart or shutdown): the wait before
        reconnecting, or None to stop."""
        return self.retry_s if self.reconnect else None

    def refused(self, response: httpx.Response) -> float:
        """An answer other than a stream (its body read): the wait before trying again;
        raises what the caller must see."""
        status = response.status_code
        if not _retryable(status):
            raise _api_error(response)
        if status >= 500:
            return self.failed(ServiceUnavailable(f"GET {self.path}: {status}"))
        return self.failed(_api_error(response), at_least=_retry_after(response))

    def failed(self, exc: Exception, at_least: float = 0.0) -> float:
        """The wait before reconnecting after a failure; raises once it has gone on for
        `give_up_after` seconds (at once without `reconnect`)."""
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if not self.reconnect or (self.give_up_after is not None
                                  and now - self._failing_since >= self.give_up_after):
            if isinstance(exc, ProgressClientError):
                raise exc
            raise ServiceUnavailable(f"GET {self.path}: {exc!r}") from exc
        self._failures += 1
        backoff: float = self.retry_s * 2 ** min(self._failures - 1, 5)
        delay = max(self.retry_s, min(backoff, MAX_RECONNECT_S)) * random.uniform(1.0, 1.25)
        log.info("reconnecting to %s in %.2fs: %r", self.path, delay, exc)
        return max(delay, at_least)


def _job_ended(event: Event, job_id: str) -> bool:
    """The end of one job's stream: its `finished` event, or a snapshot showing it over."""
    if event.type == "finished":
        return event.job_id == job_id
    if event.type == "snapshot":
        return any(j.get("id") == job_id and j.get("status") in TERMINAL for j in event.jobs)
    return False



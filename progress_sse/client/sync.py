"""The sync driver: a blocking connection to the service (httpx.Client)."""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping, Sequence
from typing import Any

import httpx
from httpx_sse import EventSource

from .events import Event, _Reading
from .protocol import (
    STREAM_READ_TIMEOUT_S,
    WORKER_POSTS,
    Control,
    CreatedJob,
    StageSpec,
    _Attempts,
    _auth,
    _control_params,
    _decode,
    _fields,
    _job_spec,
    _Options,
    resolve_token,
    resolve_url,
)
from .sync_job import Job


class ProgressClient:
    """A connection to the service, for workers (`job`, `attach`) and producers (`create`).

    `url` and `token` default to $PROGRESS_SSE_URL and $PROGRESS_SSE_TOKEN. `max_rate` is
    the most posts per second per job (None: no limit); failed requests are retried
    `retries` times with exponential backoff from `backoff` seconds.
    """

    def __init__(self, url: str | None = None, *, token: str | None = None,
                 max_rate: float | None = 10.0, retries: int = 5, backoff: float = 0.25,
                 timeout: float = 10.0, heartbeat_interval: float | None = None,
                 control_max_age: float = 1.0, finish_timeout: float = 120.0,
                 max_buffered_logs: int = 1000,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = resolve_url(url)
        self.token = resolve_token(token)
        self.options = _Options(max_rate, retries, backoff, timeout, heartbeat_interval,
                                control_max_age, finish_timeout, max_buffered_logs)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers={"User-Agent": "progress-sse-client"})

    def __enter__(self) -> ProgressClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, json: Any = None,
                params: Mapping[str, str] | None = None, token: str | None = None,
                request_timeout: float | None = None, retries: int | None = None
                ) -> dict[str, Any]:
        """Send one request, retrying connection errors, 5xx and 429; the decoded answer.

        `retries` overrides the client's count (0: one attempt).
        """
        attempts = _Attempts(method, path,
                             self.options.retries if retries is None else retries,
                             self.options.backoff)
        headers = _auth(token or self.token)
        limit = (httpx.Timeout(request_timeout) if request_timeout is not None
                 else httpx.USE_CLIENT_DEFAULT)
        while True:
            try:
                response = self._http.request(method, path, json=json, params=params,
                                              headers=headers, timeout=limit)
            except httpx.TransportError as exc:
                time.sleep(attempts.failed(exc))
                continue
            delay = attempts.answered(response)
            if delay is None:
                return _decode(response)
            time.sleep(delay)

    # producers and viewers

    def create(self, *, kind: str = "job", title: str = "", queue: str | None = None,
               stages: Sequence[StageSpec] | None = None, total: float | None = None,
               meta: Mapping[str, Any] | None = None, id: str | None = None,
               heartbeat_timeout_s: float | None = None) -> CreatedJob:
        """Create a queued job for some worker to attach to."""
        spec = _job_spec(kind=kind, title=title, queue=queue, stages=stages, total=total,
                         meta=meta, id=id, heartbeat_timeout_s=heartbeat_timeout_s)
        answer = self.request("POST", "/api/jobs", json=spec)
        return CreatedJob(answer["job"], answer.get("worker_token"), bool(answer["created"]))

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's current state."""
        job: dict[str, Any] = self.request("GET", f"/api/jobs/{job_id}")["job"]
        return job

    def control(self, job_id: str, *, wait: float = 0.0, cancel_requested: bool = False,
                pause_requested: bool = False, token: str | None = None,
                retries: int | None = None) -> Control:
        """The control state; with `wait`, long-poll until it differs from what you know."""
        answer = self.request("GET", f"/api/jobs/{job_id}/control",
                              params=_control_params(wait, cancel_requested, pause_requested),
                              token=token, request_timeout=wait + self.options.timeout,
                              retries=retries)
        return Control.from_dict(answer["control"])

    def cancel(self, job_id: str, reason: str | None = None) -> Control:
        return self._viewer_request(job_id, "cancel", reason)

    def pause(self, job_id: str, reason: str | None = None) -> Control:
        return self._viewer_request(job_id, "pause", reason)

    def resume(self, job_id: str, reason: str | None = None) -> Control:
        return self._viewer_request(job_id, "resume", reason)

    def _viewer_request(self, job_id: str, action: str, reason: str | None) -> Control:
        answer = self.request("POST", f"/api/jobs/{job_id}/{action}", json=_fields(reason=reason))
        return Control.from_dict(answer["control"])

    # readers

    def events(self, job: str | None = None, *, jobs: Sequence[str] = (),
               kinds: Sequence[str] = (), last_event_id: int | None = None,
               reconnect: bool = True, give_up_after: float | None = 60.0,
               read_timeout: float = STREAM_READ_TIMEOUT_S) -> Generator[Event, None, None]:
        """Events as they happen, resuming by itself, so a backend needs no reconnect loop.

        With `job`, that job's stream: it ends after the job's `finished` event (or at
        once, after the snapshot, if the job is already over). Without it, every job the
        token may see (`jobs`, `kinds` filter them), until you stop iterating. A fresh
        read (no `last_event_id`) starts with a `snapshot` event whose `jobs` are the
        current states; a resume yields each event after `last_event_id`, once, in order
        (a snapshot with `reset` true if the service no longer keeps them all).

        A dropped connection, 5xx or 429 is retried after the service's `retry:` delay
        (backing off while it fails), resuming with `Last-Event-ID`; after
        `give_up_after` seconds of failing (None: never) it raises ServiceUnavailable.
        Other refusals raise APIError. Keep-alives and empty frames are never yielded.
        """
        reading = _Reading(job, jobs, kinds, last_event_id, reconnect, give_up_after,
                           read_timeout, self.options.timeout)
        while True:
            delay: float | None
            try:
                with self._http.stream("GET", reading.path, params=reading.params,
                                       headers=reading.headers(self.token),
                                       timeout=reading.timeout) as response:
                    if response.status_code >= 300:
                        response.read()
                        delay = reading.refused(response)
                    elif not reading.opened(response):
                        return
                    else:
                        for sse in EventSource(response).iter_sse():
                            event = reading.take(sse)
                            if event is not None:
                                yield event
                                if reading.done:
                                    return
                        delay = reading.ended()
            except httpx.TransportError as exc:
                delay = reading.failed(exc)
            if delay is None:
                return
            time.sleep(delay)

    # workers

    def job(self, *, kind: str = "job", title: str = "", queue: str | None = None,
            stages: Sequence[StageSpec] | None = None, total: float | None = None,
            meta: Mapping[str, Any] | None = None, id: str | None = None,
            heartbeat_timeout_s: float | None = None) -> Job:
        """A job created when its block is entered, and finished when the block is left."""
        spec = _job_spec(kind=kind, title=title, queue=queue, stages=stages, total=total,
                         meta=meta, id=id, heartbeat_timeout_s=heartbeat_timeout_s)
        return Job(self, job_id=None, token=None, attempt=None, spec=spec)

    def attach(self, job_id: str, *, token: str | None = None, attempt: int | None = None) -> Job:
        """Work on a job a producer created, with the worker token it was given."""
        return Job(self, job_id=job_id, token=token, attempt=attempt, spec=None)

    def post_worker(self, job_id: str, what: str, body: Mapping[str, Any], *,
                    token: str | None = None) -> dict[str, Any]:
        """One worker post (progress, log, finish, heartbeat) as is; the service's answer."""
        if what not in WORKER_POSTS:
            raise ValueError(f"what must be one of {sorted(WORKER_POSTS)}")
        return self.request("POST", f"/api/jobs/{job_id}/{what}", json=dict(body), token=token)


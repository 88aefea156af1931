"""The sync driver: a blocking connection to the service (httpx.Client)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, TypeVar

import httpx
from httpx_sse import EventSource

from .calls import _ClientCore
from .events import Event, _Reading
from .flow import Action, Done, Flow, Send, Sleep, advance
from .protocol import STREAM_READ_TIMEOUT_S, Control, CreatedJob, StageSpec, _job_spec
from .sync_job import Job

T = TypeVar("T")


class ProgressClient(_ClientCore[httpx.BaseTransport]):
    """A connection to the service, for workers (`job`, `attach`) and producers (`create`).

    `url` and `token` default to $PROGRESS_SSE_URL and $PROGRESS_SSE_TOKEN. `max_rate` is
    the most posts per second per job (None: no limit); failed requests are retried
    `retries` times with exponential backoff from `backoff` seconds.
    """

    _http: httpx.Client

    def _connect(self, transport: httpx.BaseTransport | None) -> None:
        self._http = httpx.Client(base_url=self.url, timeout=self.options.timeout,
                                  transport=transport,
                                  headers={"User-Agent": "progress-sse-client"})

    def __enter__(self) -> ProgressClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _drive(self, flow: Flow[T], perform: Callable[[Action], Any],
               lock: contextlib.AbstractContextManager[Any] | None = None) -> T:
        """Run a flow: perform each of its actions and hand it the outcome. `lock` is
        held while the flow decides, never while an action is performed."""
        value: Any = None
        error: BaseException | None = None
        while True:
            with lock or contextlib.nullcontext():
                step = advance(flow, value, error)
            if isinstance(step, Done):
                return step.value
            value, error = None, None
            try:
                value = perform(step)
            except BaseException as exc:  # the flow decides what it means
                error = exc

    def _perform(self, action: Action) -> Any:
        if isinstance(action, Send):
            return self._http.request(**action.arguments())
        assert isinstance(action, Sleep), action
        time.sleep(action.seconds)
        return None

    def request(self, method: str, path: str, *, json: Any = None,
                params: Mapping[str, str] | None = None, token: str | None = None,
                request_timeout: float | None = None, retries: int | None = None
                ) -> dict[str, Any]:
        """Send one request, retrying connection errors, 5xx and 429; the decoded answer.

        `retries` overrides the client's count (0: one attempt).
        """
        return self._drive(self._request(method, path, json=json, params=params, token=token,
                                         request_timeout=request_timeout, retries=retries),
                           self._perform)

    # producers and viewers

    def create(self, *, kind: str = "job", title: str = "", queue: str | None = None,
               stages: Sequence[StageSpec] | None = None, total: float | None = None,
               meta: Mapping[str, Any] | None = None, id: str | None = None,
               heartbeat_timeout_s: float | None = None, webhook: str | None = None,
            webhook_events: Sequence[str] | None = None,
            notify_email: str | Sequence[str] | None = None) -> CreatedJob:
        """Create a queued job for some worker to attach to."""
        return self._drive(self._create(_job_spec(
            kind=kind, title=title, queue=queue, stages=stages, total=total, meta=meta, id=id,
            heartbeat_timeout_s=heartbeat_timeout_s, webhook=webhook,
            webhook_events=webhook_events, notify_email=notify_email)), self._perform)

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's current state."""
        return self._drive(self._get(job_id), self._perform)

    def control(self, job_id: str, *, wait: float = 0.0, cancel_requested: bool = False,
                pause_requested: bool = False, token: str | None = None,
                retries: int | None = None) -> Control:
        """The control state; with `wait`, long-poll until it differs from what you know."""
        return self._drive(self._control(job_id, wait=wait, cancel_requested=cancel_requested,
                                         pause_requested=pause_requested, token=token,
                                         retries=retries), self._perform)

    def cancel(self, job_id: str, reason: str | None = None) -> Control:
        return self._drive(self._viewer_request(job_id, "cancel", reason), self._perform)

    def pause(self, job_id: str, reason: str | None = None) -> Control:
        return self._drive(self._viewer_request(job_id, "pause", reason), self._perform)

    def resume(self, job_id: str, reason: str | None = None) -> Control:
        return self._drive(self._viewer_request(job_id, "resume", reason), self._perform)

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
            heartbeat_timeout_s: float | None = None, webhook: str | None = None,
            webhook_events: Sequence[str] | None = None,
            notify_email: str | Sequence[str] | None = None) -> Job:
        """A job created when its block is entered, and finished when the block is left."""
        spec = _job_spec(kind=kind, title=title, queue=queue, stages=stages, total=total,
                         meta=meta, id=id, heartbeat_timeout_s=heartbeat_timeout_s,
                         webhook=webhook, webhook_events=webhook_events,
                         notify_email=notify_email)
        return Job(self, job_id=None, token=None, attempt=None, spec=spec)

    def attach(self, job_id: str, *, token: str | None = None, attempt: int | None = None) -> Job:
        """Work on a job a producer created, with the worker token it was given."""
        return Job(self, job_id=job_id, token=token, attempt=attempt, spec=None)

    def post_worker(self, job_id: str, what: str, body: Mapping[str, Any], *,
                    token: str | None = None) -> dict[str, Any]:
        """One worker post (progress, log, finish, heartbeat) as is; the service's answer."""
        return self._drive(self._post_worker(job_id, what, body, token=token), self._perform)

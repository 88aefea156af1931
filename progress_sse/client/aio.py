"""The async driver: the same connection over httpx.AsyncClient, every call awaited."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import httpx
from httpx_sse import EventSource

from .aio_job import AsyncJob
from .calls import _ClientCore
from .events import Event, _Reading
from .flow import Action, Done, Flow, Send, Sleep, advance
from .protocol import STREAM_READ_TIMEOUT_S, Control, CreatedJob, StageSpec, _job_spec

T = TypeVar("T")


class AsyncProgressClient(_ClientCore[httpx.AsyncBaseTransport]):
    """The async twin of ProgressClient: the same methods, awaited."""

    _http: httpx.AsyncClient

    def _connect(self, transport: httpx.AsyncBaseTransport | None) -> None:
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self.options.timeout,
                                       transport=transport,
                                       headers={"User-Agent": "progress-sse-client"})

    async def __aenter__(self) -> AsyncProgressClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _drive(self, flow: Flow[T], perform: Callable[[Action], Awaitable[Any]]) -> T:
        """Run a flow: perform each of its actions and hand it the outcome."""
        value: Any = None
        error: BaseException | None = None
        while not isinstance(step := advance(flow, value, error), Done):
            value, error = None, None
            try:
                value = await perform(step)
            except BaseException as exc:  # the flow decides what it means
                error = exc
        return step.value

    async def _perform(self, action: Action) -> Any:
        if isinstance(action, Send):
            return await self._http.request(**action.arguments())
        assert isinstance(action, Sleep), action
        await asyncio.sleep(action.seconds)
        return None

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: Mapping[str, str] | None = None, token: str | None = None,
                      request_timeout: float | None = None, retries: int | None = None
                      ) -> dict[str, Any]:
        """Send one request, retrying connection errors, 5xx and 429; the decoded answer.

        `retries` overrides the client's count (0: one attempt).
        """
        return await self._drive(self._request(
            method, path, json=json, params=params, token=token,
            request_timeout=request_timeout, retries=retries), self._perform)

    async def create(self, *, kind: str = "job", title: str = "", queue: str | None = None,
                     stages: Sequence[StageSpec] | None = None, total: float | None = None,
                     meta: Mapping[str, Any] | None = None, id: str | None = None,
                     heartbeat_timeout_s: float | None = None, webhook: str | None = None,
            webhook_events: Sequence[str] | None = None,
            notify_email: str | Sequence[str] | None = None) -> CreatedJob:
        """Create a queued job for some worker to attach to."""
        return await self._drive(self._create(_job_spec(
            kind=kind, title=title, queue=queue, stages=stages, total=total, meta=meta, id=id,
            heartbeat_timeout_s=heartbeat_timeout_s, webhook=webhook,
            webhook_events=webhook_events, notify_email=notify_email)), self._perform)

    async def get(self, job_id: str) -> dict[str, Any]:
        return await self._drive(self._get(job_id), self._perform)

    async def control(self, job_id: str, *, wait: float = 0.0, cancel_requested: bool = False,
                      pause_requested: bool = False, token: str | None = None,
                      retries: int | None = None) -> Control:
        return await self._drive(self._control(
            job_id, wait=wait, cancel_requested=cancel_requested,
            pause_requested=pause_requested, token=token, retries=retries), self._perform)

    async def cancel(self, job_id: str, reason: str | None = None) -> Control:
        return await self._drive(self._viewer_request(job_id, "cancel", reason), self._perform)

    async def pause(self, job_id: str, reason: str | None = None) -> Control:
        return await self._drive(self._viewer_request(job_id, "pause", reason), self._perform)

    async def resume(self, job_id: str, reason: str | None = None) -> Control:
        return await self._drive(self._viewer_request(job_id, "resume", reason), self._perform)

    async def events(self, job: str | None = None, *, jobs: Sequence[str] = (),
                     kinds: Sequence[str] = (), last_event_id: int | None = None,
                     reconnect: bool = True, give_up_after: float | None = 60.0,
                     read_timeout: float = STREAM_READ_TIMEOUT_S
                     ) -> AsyncGenerator[Event, None]:
        """Events as they happen, resuming by itself: see ProgressClient.events.

        To stop early, leave the loop inside `contextlib.aclosing(pc.events(...))`, so
        the connection closes then rather than when the generator is collected.
        """
        reading = _Reading(job, jobs, kinds, last_event_id, reconnect, give_up_after,
                           read_timeout, self.options.timeout)
        while True:
            delay: float | None
            try:
                async with self._http.stream("GET", reading.path, params=reading.params,
                                             headers=reading.headers(self.token),
                                             timeout=reading.timeout) as response:
                    if response.status_code >= 300:
                        await response.aread()
                        delay = reading.refused(response)
                    elif not reading.opened(response):
                        return
                    else:
                        async with contextlib.aclosing(
                                EventSource(response).aiter_sse()) as stream:
                            async for sse in stream:
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
            await asyncio.sleep(delay)

    def job(self, *, kind: str = "job", title: str = "", queue: str | None = None,
            stages: Sequence[StageSpec] | None = None, total: float | None = None,
            meta: Mapping[str, Any] | None = None, id: str | None = None,
            heartbeat_timeout_s: float | None = None, webhook: str | None = None,
            webhook_events: Sequence[str] | None = None,
            notify_email: str | Sequence[str] | None = None) -> AsyncJob:
        """A job created when its block is entered, and finished when the block is left."""
        spec = _job_spec(kind=kind, title=title, queue=queue, stages=stages, total=total,
                         meta=meta, id=id, heartbeat_timeout_s=heartbeat_timeout_s,
                         webhook=webhook, webhook_events=webhook_events,
                         notify_email=notify_email)
        return AsyncJob(self, job_id=None, token=None, attempt=None, spec=spec)

    def attach(self, job_id: str, *, token: str | None = None,
               attempt: int | None = None) -> AsyncJob:
        """Work on a job a producer created, with the worker token it was given."""
        return AsyncJob(self, job_id=job_id, token=token, attempt=attempt, spec=None)

    async def post_worker(self, job_id: str, what: str, body: Mapping[str, Any], *,
                          token: str | None = None) -> dict[str, Any]:
        """One worker post (progress, log, finish, heartbeat) as is; the service's answer."""
        return await self._drive(self._post_worker(job_id, what, body, token=token),
                                 self._perform)

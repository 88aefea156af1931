"""The client's requests as flows: one request and its retries, and each call of the
API; no I/O here. ProgressClient and AsyncProgressClient perform them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import httpx

from .flow import Flow, Send, Sleep
from .protocol import (
    WORKER_POSTS,
    Control,
    CreatedJob,
    _Attempts,
    _auth,
    _control_params,
    _decode,
    _fields,
    _Options,
    resolve_token,
    resolve_url,
)

TransportT = TypeVar("TransportT", httpx.BaseTransport, httpx.AsyncBaseTransport)


class _ClientCore(Generic[TransportT]):
    """What both clients know (the service, the token, the options) and their calls."""

    def __init__(self, url: str | None = None, *, token: str | None = None,
                 max_rate: float | None = 10.0, retries: int = 5, backoff: float = 0.25,
                 timeout: float = 10.0, heartbeat_interval: float | None = None,
                 control_max_age: float = 1.0, finish_timeout: float = 120.0,
                 max_buffered_logs: int = 1000, transport: TransportT | None = None) -> None:
        self.url = resolve_url(url)
        self.token = resolve_token(token)
        self.options = _Options(max_rate, retries, backoff, timeout, heartbeat_interval,
                                control_max_age, finish_timeout, max_buffered_logs)
        self._connect(transport)

    def _connect(self, transport: TransportT | None) -> None:
        """Open the driver's HTTP client."""
        raise NotImplementedError

    def _request(self, method: str, path: str, *, json: Any = None,
                 params: Mapping[str, str] | None = None, token: str | None = None,
                 request_timeout: float | None = None, retries: int | None = None
                 ) -> Flow[dict[str, Any]]:
        """One request, retried on connection errors, 5xx, 408 and 429; the decoded answer."""
        attempts = _Attempts(method, path,
                             self.options.retries if retries is None else retries,
                             self.options.backoff)
        send = Send(method, path, json, params, _auth(token or self.token), request_timeout)
        while True:
            try:
                response: httpx.Response = yield send
            except httpx.TransportError as exc:
                yield Sleep(attempts.failed(exc))
                continue
            delay = attempts.answered(response)
            if delay is None:
                return _decode(response)
            yield Sleep(delay)

    def _create(self, spec: dict[str, Any]) -> Flow[CreatedJob]:
        answer = yield from self._request("POST", "/api/jobs", json=spec)
        return CreatedJob(answer["job"], answer.get("worker_token"), bool(answer["created"]))

    def _get(self, job_id: str) -> Flow[dict[str, Any]]:
        answer = yield from self._request("GET", f"/api/jobs/{job_id}")
        job: dict[str, Any] = answer["job"]
        return job

    def _control(self, job_id: str, *, wait: float = 0.0, cancel_requested: bool = False,
                 pause_requested: bool = False, token: str | None = None,
                 retries: int | None = None) -> Flow[Control]:
        answer = yield from self._request(
            "GET", f"/api/jobs/{job_id}/control",
            params=_control_params(wait, cancel_requested, pause_requested), token=token,
            request_timeout=wait + self.options.timeout, retries=retries)
        return Control.from_dict(answer["control"])

    def _viewer_request(self, job_id: str, action: str, reason: str | None) -> Flow[Control]:
        answer = yield from self._request("POST", f"/api/jobs/{job_id}/{action}",
                                          json=_fields(reason=reason))
        return Control.from_dict(answer["control"])

    def _post_worker(self, job_id: str, what: str, body: Mapping[str, Any], *,
                     token: str | None = None) -> Flow[dict[str, Any]]:
        if what not in WORKER_POSTS:
            raise ValueError(f"what must be one of {sorted(WORKER_POSTS)}")
        return self._request("POST", f"/api/jobs/{job_id}/{what}", json=dict(body), token=token)

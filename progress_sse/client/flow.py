"""What the I/O-free core asks its drivers to do: the actions of a flow; no I/O here.

A flow is a generator (as httpx's auth flows are): it yields an action, the driver
performs it and sends back its outcome (or throws in its exception), until the flow
returns its result. Every decision (what to send, whether to retry, how long to wait,
what an answer means) is the flow's; the sync and async drivers only perform actions,
each in its own way, so nothing but the performing is written twice.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

import httpx

T = TypeVar("T")


@dataclass(frozen=True)
class Send:
    """One HTTP request, sent once; the driver answers with the httpx.Response, or throws
    in the httpx.TransportError."""

    method: str
    path: str
    json: Any
    params: Mapping[str, str] | None
    headers: dict[str, str]
    timeout: float | None  # None: the client's own timeout

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of httpx's `request` (and `AsyncClient.request`)."""
        return {"method": self.method, "url": self.path, "json": self.json,
                "params": self.params, "headers": self.headers,
                "timeout": (httpx.USE_CLIENT_DEFAULT if self.timeout is None
                            else httpx.Timeout(self.timeout))}


@dataclass(frozen=True)
class Sleep:
    """Wait this long (pacing, or backing off from a failure)."""

    seconds: float


@dataclass(frozen=True)
class Exclusive:
    """Run `flow` holding the job's send lock (held from taking a seq until its answer, so
    posts go out one at a time, in order); the driver answers with the flow's result.
    Without `blocking`, when another holds the lock the driver answers None at once."""

    flow: Flow[Any]
    blocking: bool = True


@dataclass(frozen=True)
class Idle:
    """The background's rest: until `wake()` is called, or `seconds` have passed."""

    seconds: float


@dataclass(frozen=True)
class Wake:
    """End the background's rest now: there is work for it (waiting posts, a retry)."""


Action: TypeAlias = Send | Sleep | Exclusive | Idle | Wake
Flow: TypeAlias = Generator[Action, Any, T]
WAKE = Wake()


@dataclass(frozen=True)
class Done(Generic[T]):
    """A flow's result: the driver's loop ends."""

    value: T


def advance(flow: Flow[T], value: Any, error: BaseException | None) -> Action | Done[T]:
    """Hand the flow the outcome of its last action: its next action, or its result."""
    try:
        return flow.throw(error) if error is not None else flow.send(value)
    except StopIteration as stop:
        return Done(stop.value)

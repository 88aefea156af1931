"""The async job handle: runs the core's flows, with a background task for its duties.

One lock, the send lock, held from taking a seq until its answer; a flow decides
without awaiting, so on one event loop nothing else changes the state meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from .core import _JobCore
from .flow import Action, Exclusive, Flow, Idle, Wake
from .protocol import Control

if TYPE_CHECKING:
    from .aio import AsyncProgressClient

T = TypeVar("T")


class AsyncJob(_JobCore):
    """The async twin of Job: `async with`, and every call awaited."""

    _block = "`async with`"

    def __init__(self, client: AsyncProgressClient, *, job_id: str | None, token: str | None,
                 attempt: int | None, spec: dict[str, Any] | None) -> None:
        super().__init__(client, job_id=job_id, token=token, attempt=attempt, spec=spec)
        self._driver = client
        self._send_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncJob:
        await self._run(self._enter())
        self._task = asyncio.create_task(self._run(self._background()),
                                         name=f"progress-sse-{self.id}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        """Stop the background task (a post it has in flight is let finish, not torn),
        then finish the job."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self._opts.timeout)
            except TimeoutError:
                task.cancel()
            except asyncio.CancelledError:
                task.cancel()
                raise
        return await self._run(self._exit(exc))

    async def progress(self, progress: float | None = None, *, current: float | None = None,
                       total: float | None = None, message: str | None = None,
                       data: Any = None, stage: str | None = None) -> Control:
        """Report progress (0-100, of the current stage for a staged job), throttled.

        Never raises because the service is unreachable: the value waits in the outbox.
        """
        return await self._run(self._progress(progress, current, total, message, data, stage))

    async def stage(self, key: str, *, message: str | None = None,
                    progress: float | None = None, current: float | None = None,
                    total: float | None = None) -> Control:
        """Enter a stage; never merged away, sent after any pending progress."""
        return await self._run(self._stage(key, message, progress, current, total))

    async def log(self, message: str, level: str = "info") -> Control:
        """Add a log line to the job; never merged away, sent after any pending progress."""
        return await self._run(self._log(message, level))

    async def checkpoint(self) -> None:
        """Raise Cancelled when a cancel was requested; wait while a pause is requested.

        While the service is unreachable it goes by the last control state it knew.
        """
        await self._run(self._checkpoint())

    async def finish(self, status: str = "succeeded", *, result: Any = None,
                     error: str | None = None) -> None:
        """Finish now (leaving the block does it otherwise); retried up to `finish_timeout`."""
        await self._run(self._finish(status, result, error))

    async def refresh(self) -> dict[str, Any]:
        """Read the job and its control state from the service."""
        return await self._run(self._refresh())

    async def _run(self, flow: Flow[T]) -> T:
        return await self._driver._drive(flow, self._perform)

    async def _perform(self, action: Action) -> Any:
        if isinstance(action, Exclusive):
            if not action.blocking and self._send_lock.locked():
                return None
            async with self._send_lock:
                return await self._run(action.flow)
        if isinstance(action, Idle):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), action.seconds)
            self._wake.clear()
        elif isinstance(action, Wake):
            self._wake.set()
        else:
            return await self._driver._perform(action)
        return None

"""The sync job handle: runs the core's flows, with a background thread for its duties.

Two locks, by the nature of threads: the state lock is held while a flow decides (so
the worker's thread and the background thread never change the outbox at once), and
the send lock from taking a seq until its answer (so posts go out one at a time).
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from .core import _JobCore
from .flow import Action, Exclusive, Flow, Idle, Wake
from .protocol import Control

if TYPE_CHECKING:
    from .sync import ProgressClient

T = TypeVar("T")


class Job(_JobCore):
    """One job as its worker sees it. Use it as a context manager (see the module doc)."""

    def __init__(self, client: ProgressClient, *, job_id: str | None, token: str | None,
                 attempt: int | None, spec: dict[str, Any] | None) -> None:
        super().__init__(client, job_id=job_id, token=token, attempt=attempt, spec=spec)
        self._driver = client
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Job:
        self._run(self._enter())
        self._thread = threading.Thread(target=self._run, args=(self._background(),),
                                        daemon=True, name=f"progress-sse-{self.id}")
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        self._stopping = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self._opts.timeout)
        return self._run(self._exit(exc))

    # the worker's calls

    def progress(self, progress: float | None = None, *, current: float | None = None,
                 total: float | None = None, message: str | None = None, data: Any = None,
                 stage: str | None = None) -> Control:
        """Report progress (0-100, of the current stage for a staged job), throttled.

        Never raises because the service is unreachable: the value waits in the outbox.
        """
        return self._run(self._progress(progress, current, total, message, data, stage))

    def stage(self, key: str, *, message: str | None = None, progress: float | None = None,
              current: float | None = None, total: float | None = None) -> Control:
        """Enter a stage; never merged away, sent after any pending progress."""
        return self._run(self._stage(key, message, progress, current, total))

    def log(self, message: str, level: str = "info") -> Control:
        """Add a log line to the job; never merged away, sent after any pending progress."""
        return self._run(self._log(message, level))

    def checkpoint(self) -> None:
        """Raise Cancelled when a cancel was requested; block while a pause is requested.

        While the service is unreachable it goes by the last control state it knew.
        """
        self._run(self._checkpoint())

    def finish(self, status: str = "succeeded", *, result: Any = None,
               error: str | None = None) -> None:
        """Finish now (leaving the block does it otherwise); retried up to `finish_timeout`."""
        self._run(self._finish(status, result, error))

    def refresh(self) -> dict[str, Any]:
        """Read the job and its control state from the service."""
        return self._run(self._refresh())

    # the driver

    def _run(self, flow: Flow[T]) -> T:
        return self._driver._drive(flow, self._perform, self._state_lock)

    def _perform(self, action: Action) -> Any:
        if isinstance(action, Exclusive):
            if not self._send_lock.acquire(blocking=action.blocking):
                return None
            try:
                return self._run(action.flow)
            finally:
                self._send_lock.release()
        if isinstance(action, Idle):
            self._wake.wait(action.seconds)
            self._wake.clear()
        elif isinstance(action, Wake):
            self._wake.set()
        else:
            return self._driver._perform(action)
        return None

"""The SDK's exceptions; no I/O here."""

from __future__ import annotations

from typing import Any


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]
             ) -> BaseException:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class _Picklable(Exception):
    """Rebuilt from its message and attributes, not its constructor's arguments: task
    queues (Celery, ARQ) pickle a task's exception, and the default rebuild calls the
    constructor with the message alone, which fails for these and hides the error."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self.args, self.__dict__)


class ProgressClientError(_Picklable):
    """Base of every error the SDK raises."""


class ServiceUnavailable(ProgressClientError):
    """The service stayed unreachable (or kept answering 5xx) through every retry."""


class NotRecorded(ServiceUnavailable):
    """`finish` ran out of `finish_timeout` with the service unreachable.

    The message names what the job's record lacks: the finish itself, how many
    progress and log posts were still waiting, and how many log lines were dropped.
    """

    def __init__(self, job_id: str | None, *, status: str | None, progress_posts: int,
                 log_lines: int, dropped_logs: int, waited: float) -> None:
        parts = [f"the finish ({status})" if status else "the finish"]
        if progress_posts:
            parts.append(_count(progress_posts, "progress post"))
        if log_lines:
            parts.append(_count(log_lines, "log line"))
        dropped = (f"; {_count(dropped_logs, 'log line')} had already been dropped"
                   if dropped_logs else "")
        super().__init__(f"job {job_id}: the service stayed unreachable for {waited:.0f}s; "
                         f"not recorded: {', '.join(parts)}{dropped}")
        self.job_id = job_id
        self.status = status
        self.progress_posts = progress_posts
        self.log_lines = log_lines
        self.dropped_logs = dropped_logs


class APIError(ProgressClientError):
    """The service refused a request; `status_code`, `code` and `field` say why."""

    def __init__(self, status_code: int, code: str, message: str,
                 field: str | None = None) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.field = field


class JobFinishedError(APIError):
    """The job has already finished (someone else finished it); it takes no more posts."""


class StaleAttemptError(APIError):
    """The job was requeued: this worker's attempt was superseded, so it must stop."""


class Cancelled(_Picklable):
    """A cancel was requested for the job. Raised by `checkpoint()`; the job's block swallows it."""

    def __init__(self, job_id: str | None, reason: str | None = None) -> None:
        super().__init__(f"job {job_id} was cancelled" + (f": {reason}" if reason else ""))
        self.job_id = job_id
        self.reason = reason

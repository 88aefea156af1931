"""Worker SDK: report a job's progress from Python, sync or async, with the same shape.

    with ProgressClient("http://127.0.0.1:8000") as pc:
        with pc.job(kind="video", title="intro.mp4", stages=["fetch", "encode"]) as job:
            job.stage("fetch")
            for i, chunk in enumerate(chunks):
                job.progress(current=i + 1, total=len(chunks))
                job.checkpoint()  # raises Cancelled on a cancel request; blocks while paused

Choices that may look odd but are deliberate:

* Every worker post carries `seq` (increasing per job attempt) and `attempt`. A post
  retried after a lost answer is then stored once, and a worker whose attempt was
  superseded (the job was requeued) is refused instead of writing into the new one.
  A handle that created its job counts from 1; one that attaches to an existing job
  starts from the clock (`clock_seq()`), so it is ahead of any earlier worker.
* Every post goes through one ordered outbox. Progress is throttled, never dropped: a
  value that comes too soon waits there (newer values replace it) and goes out at the
  next allowed moment, from the caller or from the background heartbeat. Stage
  changes, log lines and the finish are never merged away, so the stored order is the
  order of the calls.
* Reporting must never end the work it reports on. When the service is unreachable
  (connection refused or reset, a timeout, 5xx, 408, 429), posts stay in the outbox
  and the call returns at once; the background retries with backoff and flushes the
  outbox in order when the service is back. A post keeps the `seq` of its first
  attempt, so a re-send whose first answer was lost is stored once. The outbox is
  bounded: progress is merged (only the newest value counts), log lines beyond
  `max_buffered_logs` drop the oldest (counted, and one warning line says so).
  Only `finish` waits, up to `finish_timeout`; then it raises NotRecorded.
* A block swallows the `Cancelled` of its own job: the cancel was obeyed and the job
  ended `cancelled`, which `job.status` shows. Every other exception propagates.
* Worker posts authenticate with the job's worker token when there is one; everything
  else with the client's token (`Authorization: Bearer`).
* `events()` reads a stream and resumes it by itself (Last-Event-ID, the stream's
  `retry:` delay). The wire is parsed by httpx-sse, a maintained parser that splits
  lines on CR, LF and CRLF only, not by one of our own; its one surprise, an event
  without data for a blank line once an id was seen, is dropped here.

The package, sans-I/O as h11 and httpx's auth flows are: `errors`, `protocol`
(constants, values, request bodies, answers, retry policy), `flow` (the actions a flow
asks of its driver: send, sleep, hold the send lock, rest, wake), `calls` (the client's
requests as flows), `outbox`, `state` and `core` (the job handle: its state, and each of
its calls as a flow deciding outbox, pacing, seq, retries and what answers mean) and
`events` (a reading's cursor and reconnect policy) do no I/O. `sync` with `sync_job` and
`aio` with `aio_job` are the thin drivers: they perform a flow's actions, nothing else.
"""

from __future__ import annotations

from .aio import AsyncProgressClient
from .aio_job import AsyncJob
from .core import OUTAGE_RETRY_CAP_S
from .errors import (
    APIError,
    Cancelled,
    JobFinishedError,
    NotRecorded,
    ProgressClientError,
    ServiceUnavailable,
    StaleAttemptError,
)
from .events import Event
from .protocol import (
    ABANDONED,
    DEFAULT_RETRY_S,
    DEFAULT_URL,
    LONG_POLL_S,
    MAX_ERROR_CHARS,
    MAX_RECONNECT_S,
    STREAM_READ_TIMEOUT_S,
    TERMINAL,
    TOKEN_ENV,
    URL_ENV,
    WORKER_POSTS,
    Control,
    CreatedJob,
    StageSpec,
    clock_seq,
    log,
    resolve_token,
    resolve_url,
)
from .sync import ProgressClient
from .sync_job import Job

__all__ = [
    "ABANDONED", "DEFAULT_RETRY_S", "DEFAULT_URL", "LONG_POLL_S", "MAX_ERROR_CHARS",
    "MAX_RECONNECT_S", "OUTAGE_RETRY_CAP_S", "STREAM_READ_TIMEOUT_S", "TERMINAL", "TOKEN_ENV",
    "URL_ENV", "WORKER_POSTS", "APIError", "AsyncJob", "AsyncProgressClient", "Cancelled",
    "Control", "CreatedJob", "Event", "Job", "JobFinishedError", "NotRecorded",
    "ProgressClient", "ProgressClientError", "ServiceUnavailable", "StageSpec",
    "StaleAttemptError", "clock_seq", "log", "resolve_token", "resolve_url",
]

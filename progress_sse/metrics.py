"""The service's Prometheus series, in one registry per app (see create_app).

A registry of its own, not prometheus_client's global one: two apps in one process
(tests, an embedding program) keep separate counts, and nothing here is module state.

Two kinds of series:
- observed as things happen: request durations (the request log's end), commit
  latency and batch size (the store, where a batch's commit lands);
- read at scrape time from the hub and the store (`_Scraped`): counts they keep as
  plain ints, so the hot paths pay nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import Scope

if TYPE_CHECKING:
    from .app_context import Context

# the route label of a request answered before any route matched it (no such path, or
# refused by the security layer): one value, so raw paths never become labels
UNMATCHED = "unmatched"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# a method label is one of these or "other": a client names the method, and each name
# would otherwise be a series kept for the process's life
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# seconds: a worker post answers in well under a millisecond to a few (group commit)
REQUEST_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
COMMIT_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)
# writes per group commit, up to the store's MAX_BATCH (512)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def route_of(scope: Scope) -> str:
    """The request's route as a path template (`/api/jobs/{job_id}/progress`), never
    the raw path: labels stay as few as the routes."""
    route = scope.get("route")  # set by Starlette's router (a Route's or a Mount's)
    template = getattr(route, "path_format", None)
    return template if isinstance(template, str) and template else UNMATCHED


class Metrics:
    """One app's registry and the series observed as things happen."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "progress_sse_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (a stream's: to its"
            " start, the stream itself is not timed), by route template, method and status.",
            ["route", "method", "status"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self.commit_seconds = Histogram(
            "progress_sse_commit_seconds",
            "Time from sending a group commit to the writer to its confirmation.",
            buckets=COMMIT_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "progress_sse_commit_batch_size",
            "Writes carried by each group commit that stored something.",
            buckets=BATCH_BUCKETS, registry=self.registry)

        # each label set's child, looked up once: with `labels()` (its checks, its lock)
        # each time a request paid 1.5-2.5 us here, measured; with this, 0.85-1.0 us
        self._requests: dict[tuple[str, str, int], Any] = {}

    def request_done(self, scope: Scope, status: int, seconds: float) -> None:
        """Called by the request log at each request's end (logs.RequestLogMiddleware)."""
        method = scope["method"]
        key = (route_of(scope), method if method in METHODS else "other", status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.request_seconds.labels(
                key[0], key[1], str(status))
        child.observe(seconds)

    def commit_landed(self, seconds: float, writes: int) -> None:
        """Called by the store when a group commit is confirmed (SQLiteStore._land)."""
        self.commit_seconds.observe(seconds)
        self.batch_size.observe(writes)

    def watch(self, ctx: Context) -> None:
        """Add the series read at scrape time from this app's hub and store."""
        self.registry.register(_Scraped(ctx))

    def render(self) -> bytes:
        """The Prometheus text exposition of every series (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _Scraped(Collector):
    """The counts the hub and the store keep as ints, read when /metrics is asked."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def collect(self) -> Iterable[Metric]:
        hub, store = self.ctx.hub, self.ctx.store
        yield _gauge("progress_sse_head_event_id", "The newest committed event id.",
                     hub.head)
        yield _gauge("progress_sse_open_streams", "SSE streams open now.", hub.streams)
        yield _gauge("progress_sse_live_streams", "Open streams caught up, pushed each"
                     " event as it is published.", hub.live)
        yield _counter("progress_sse_stream_catch_ups", "Times a stream read on from its"
                       " cursor (once when it opens, again each time its reader fell"
                       " behind).", hub.catch_ups)
        yield _counter("progress_sse_events_published", "Committed events published to"
                       " streams and waiting workers since the service started.",
                       hub.published)
        yield _counter("progress_sse_snapshot_reads", "Snapshots read for streams that"
                       " start fresh (shared by the streams of one filter that open"
                       " meanwhile).", self.ctx.snapshots.reads)
        yield _gauge("progress_sse_watched_jobs", "Jobs with workers' long polls waiting"
                     " on them.", hub.watched)
        yield _counter("progress_sse_write_batches", "Group commits by the store's"
                       " writer.", store.batches)
        yield _counter("progress_sse_writes", "Write requests handled by the store's"
                       " writer.", store.writes)
        yield _counter("progress_sse_writes_redone", "Writes done again one at a time"
                       " because their batch failed (one was refused).", store.redone)
        yield _counter("progress_sse_write_timeouts", "Writes answered 503 because the"
                       " store did not confirm them within the write timeout.",
                       store.timeouts)
        notes = self.ctx.notifications
        if notes is not None:
            d = notes.deliverer
            yield _counter("progress_sse_notifications_delivered", "Notifications (webhooks,"
                           " mail) this instance delivered.", d.delivered)
            yield _counter("progress_sse_notifications_failed", "Notifications this instance"
                           " gave up on (retried for WEBHOOK_MAX_AGE).", d.failed)
            yield _gauge("progress_sse_notifications_pending", "Notifications waiting in the"
                         " outbox (every instance's; read every second).", d.pending)
        pruner = store.retention
        yield _gauge("progress_sse_retention_horizon", "Every event after this id is kept;"
                     " a resume from before it gets a reset snapshot (as pruning last saw"
                     " it).", pruner.retained.horizon)
        yield _gauge("progress_sse_oldest_event_id", "The oldest event kept (0: none), as"
                     " pruning last saw it.", pruner.retained.oldest or 0)
        yield _counter("progress_sse_events_pruned", "Events deleted for their age or by"
                       " count by this instance.", pruner.expired)
        yield _counter("progress_sse_events_compacted", "Progress events of finished jobs"
                       " deleted by compaction by this instance.", pruner.compacted)
        yield _counter("progress_sse_jobs_pruned", "Finished jobs deleted with their"
                       " events by this instance.", pruner.dropped)
        yield _gauge("progress_sse_store_writable", "1 unless the store knows that writes"
                     " cannot succeed now (writer not answering, last commit"
                     " failed); /healthz also probes for a lock.",
                     int(store.trouble() is None))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    """`name` without `_total`: the exposition adds it to the sample."""
    return CounterMetricFamily(name, documentation, value=value)

"""A job's outbox: its posts not yet recorded, in the order of the calls; no I/O here.

Bounded while the service is unreachable: plain progress merges (only the newest value
counts), and log lines beyond the bound drop the oldest unsent one, counted in one
warning line that stands where the first of them stood.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from .errors import NotRecorded, _count
from .protocol import _merge


@dataclass
class _Post:
    """One worker post waiting in the outbox, in the order of the calls."""

    what: str
    body: dict[str, Any]
    merge: bool = False  # plain progress: a newer value replaces it until it is first sent
    seq: int | None = None  # given at the first attempt and kept, so a re-send is stored once


class _Outbox:
    """Posts not yet recorded, oldest first; the head is the next to send."""

    def __init__(self, max_logs: int) -> None:
        self._posts: deque[_Post] = deque()
        self._max_logs = max_logs
        self._logs = 0  # log lines waiting (the drop marker not counted)
        self._marker: _Post | None = None  # the unsent "N log lines dropped" line
        self._marker_count = 0
        self.dropped = 0  # log lines dropped because the outbox was full

    def __len__(self) -> int:
        return len(self._posts)

    @property
    def head(self) -> _Post:
        return self._posts[0]

    def add(self, what: str, body: dict[str, Any], *, merge: bool = False) -> None:
        """Add a post; plain progress merges into an unsent progress tail."""
        tail = self._posts[-1] if self._posts else None
        if merge and tail is not None and tail.merge and tail.seq is None:
            tail.body = _merge(tail.body, body)
            return
        self._posts.append(_Post(what, dict(body), merge))
        if what == "log":
            self._logs += 1
            if self._logs > self._max_logs:
                self._drop_oldest_log()

    def sent(self, post: _Post) -> None:
        """Take a post out: recorded, or refused for good."""
        if self._posts and self._posts[0] is post:
            self._posts.popleft()
        if post.what == "log" and post is not self._marker:
            self._logs -= 1
        if post is self._marker:
            self._marker = None

    def unrecorded(self, job_id: str | None, waited: float) -> NotRecorded:
        """What the job's record lacks when the finish gives up."""
        finish = next((p for p in self._posts if p.what == "finish"), None)
        return NotRecorded(
            job_id, status=None if finish is None else str(finish.body.get("status")),
            progress_posts=sum(p.what == "progress" for p in self._posts),
            log_lines=sum(p.what == "log" and p is not self._marker for p in self._posts),
            dropped_logs=self.dropped, waited=waited)

    def _drop_oldest_log(self) -> None:
        """The oldest unsent log line gives way, and is counted."""
        i = next((n for n, post in enumerate(self._posts) if post.what == "log"
                  and post.seq is None and post is not self._marker), None)
        if i is None:
            return
        self._logs -= 1
        self.dropped += 1
        if self._marker is not None and self._marker.seq is None:
            self._marker_count += 1
            del self._posts[i]
            if 0 < i < len(self._posts):
                a, b = self._posts[i - 1], self._posts[i]
                if a.merge and b.merge and a.seq is None and b.seq is None:
                    a.body = _merge(a.body, b.body)
                    del self._posts[i]
        else:
            self._marker, self._marker_count = _Post("log", {"level": "warning"}), 1
            self._posts[i] = self._marker
        self._marker.body["message"] = (
            f"{_count(self._marker_count, 'log line')} dropped while the service was "
            "unreachable (the worker's buffer was full)")

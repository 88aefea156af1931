"""Open SSE streams per user: one client cannot hold every connection the service has."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from .errors import TooManyStreams

RETRY_STREAMS_S = 5


class StreamQuota:
    """Open SSE streams per subject, for one app: a 429 beyond the limit (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: Counter[str] = Counter()

    def acquire(self, subject: str) -> Callable[[], None]:
        """Take a slot for `subject`; the returned callable gives it back (once)."""
        if not self.limit:
            return _no_slot  # nothing to count: no closure kept by every open stream
        if self.open[subject] >= self.limit:
            raise TooManyStreams(
                f"at most {self.limit} open streams per user; close one (a dashboard needs "
                "one stream: /api/events takes job= filters)",
                headers={"Retry-After": str(RETRY_STREAMS_S)})
        self.open[subject] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open[subject] -= 1
                if self.open[subject] <= 0:
                    del self.open[subject]

        return release


def _no_slot() -> None:
    """A slot of an unlimited quota: nothing to give back."""

"""The one place that reaches into another package's private state: live SSE chunks
written straight to uvicorn's httptools connection.

Why: a publish is pushed to every subscribed stream at once, from the hub, without a
task per stream. uvicorn's public `send` is a coroutine that checks the request cycle's
state, frames the chunk and writes it; awaiting it means a task per stream per publish.
Measured in `make bench` (1,000 subscribers): this path costs 1.1-1.2x the raw floor of
CPU per delivered event; through a catch-up task per push it is several times that.
So for a chunked response under uvicorn's httptools protocol, `ChunkWriter.write` does
what that `send` does with a body chunk, without waiting: check the cycle's state,
write the framed chunk to the transport.

The bounds of the trust:
- `SUPPORTED` is the uvicorn range setup.cfg admits; CI runs the suite on both ends.
- `check()` runs at start-up: outside the range, or when uvicorn's cycle no longer sets
  the attributes read here, it says why and the service uses the public `send` alone
  (each push then goes through the stream's catch-up task: slower, equally lossless).
- `chunk_writer(send)` is given the `send` a stream will use; it answers a writer only
  when that is uvicorn's own httptools send (no middleware wrapping it) and its
  response is chunked and started. Anything else: None, and the public `send`.
Nothing else in progress_sse reads or writes uvicorn's (or any package's) private
attributes.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from starlette.types import Send

# the uvicorn versions whose httptools request cycle this module has been checked
# against: the same range as setup.cfg's install_requires
SUPPORTED = ((0, 30), (0, 55))
# what a push reads and writes, set by RequestResponseCycle.__init__ and FlowControl's
_CYCLE_ATTRS = frozenset({"transport", "flow", "chunked_encoding", "response_started",
                          "response_complete", "disconnected"})
_FLOW_ATTRS = frozenset({"write_paused"})
_CYCLE = ("uvicorn.protocols.http.httptools_impl", "RequestResponseCycle")


def _version(text: str) -> tuple[int, int]:
    major, minor = [*text.split("."), "0"][:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check(version: str | None = None) -> str | None:
    """None when direct writes can be used with the installed uvicorn (or, for a test
    of the range, one said to be `version`); else why not."""
    if version is None:
        try:
            version = importlib.metadata.version("uvicorn")
        except importlib.metadata.PackageNotFoundError:
            return "uvicorn is not installed"
    low, high = SUPPORTED
    if not low <= _version(version) < high:
        return (f"uvicorn {version} is outside the range checked for direct writes "
                f"({'.'.join(map(str, low))} to before {'.'.join(map(str, high))})")
    try:
        from uvicorn.protocols.http import flow_control, httptools_impl
    except ImportError as exc:  # httptools missing: uvicorn serves with h11
        return f"uvicorn's httptools protocol is not available ({exc})"
    cycle_sets = set(httptools_impl.RequestResponseCycle.__init__.__code__.co_names)
    flow_sets = set(flow_control.FlowControl.__init__.__code__.co_names)
    missing = (_CYCLE_ATTRS - cycle_sets) | (_FLOW_ATTRS - flow_sets)
    if missing:
        return f"uvicorn {version}'s request cycle no longer sets {sorted(missing)}"
    return None


class ChunkWriter:
    """Writes body chunks of one started, chunked response as uvicorn's send would."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle

    def write(self, chunk: bytes) -> bool:
        """Write a framed chunk now; False, having written nothing, if it would wait."""
        cycle = self._cycle
        if cycle.disconnected or cycle.response_complete:
            return True  # as uvicorn's send: nothing to write to; the stream sees it end
        if cycle.flow.write_paused:
            return False
        cycle.transport.write(chunk)
        return True

    @property
    def paused(self) -> bool:
        """Whether the connection is not taking more now (its reader is not reading)."""
        return bool(self._cycle.flow.write_paused)


def chunk_writer(send: Send, enabled: bool) -> ChunkWriter | None:
    """A writer for the response behind `send` if it is uvicorn's own httptools send
    of a started, chunked response (and `enabled`: check() passed); else None."""
    if not enabled:
        return None
    owner: Any = getattr(send, "__self__", None)
    if (type(owner).__module__, type(owner).__name__) != _CYCLE:
        return None
    try:
        usable = (owner.chunked_encoding is True and owner.response_started is True
                  and isinstance(owner.flow.write_paused, bool)
                  and isinstance(owner.disconnected, bool)
                  and isinstance(owner.response_complete, bool)
                  and callable(owner.transport.write))
    except AttributeError:
        return None
    return ChunkWriter(owner) if usable else None

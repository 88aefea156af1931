"""How a request may arrive: a cap on its head, deadlines for its head and its body.

uvicorn's httptools protocol takes a header of any size, gathering it by repeated
concatenation (one 128 MiB header held every other request up to 11 s here, and the
process at 300 MiB: bench/attack_headers.py), and closes no connection that keeps a
request half-sent (slowloris).
`limited_protocol` wraps uvicorn's own protocol class, given to it as `Config(http=...)`,
in an asyncio protocol that follows the requests on the connection with httptools'
public parser (a second parse of each read, with no header or body callbacks, so it
copies nothing) and refuses the connection before uvicorn is fed the bytes that break
a limit. Nothing of uvicorn's is patched or read: the wrapper forwards the asyncio
protocol calls and holds the real transport.

Limits, each for every request on a kept-alive connection:

* the head (request line and headers) at most `max_header_bytes`: 431 and close;
* the head complete within `header_timeout_s` of its first byte (of the connection
  opening, for its first request): 408 and close;
* the body complete within `body_timeout_s` of the end of its head: close.

An answer is written only while no earlier request on the connection went to uvicorn,
whose answer to it could still be in progress; otherwise the connection is closed
without one. A response takes as long as it takes (streams are not cut); an idle
kept-alive connection is uvicorn's `timeout_keep_alive`'s. A read the parser cannot
follow (bad HTTP) ends the tracking: uvicorn answers it, under httptools with a 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import httptools
import structlog
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from .errors import error_body

log = structlog.get_logger("progress_sse.limits")

# where the connection is: between requests, in a head, in a body, not followed, refused
IDLE, HEAD, BODY, OFF, DONE = range(5)
LINGER_S = 1.0  # after an answer, the rest of the request is read and dropped this long
MAX_SEGMENTS = 16  # head ends looked for in one large read (see _feed_pieces)
_HEAD_END = b"\r\n\r\n"  # llhttp (strict) ends every head so
_HTTP1 = ("auto", "httptools", "h11")


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float


def answer(status: int, code: str, message: str) -> bytes:
    """A whole HTTP answer in the service's error shape, closing the connection."""
    phrases = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
    body = error_body(code, message)
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"x-content-type-options: nosniff\r\nconnection: close\r\n\r\n%s"
            % (status, phrases[status], len(body), body))


def limited_protocol(http: object, limits: Limits) -> type[asyncio.Protocol] | None:
    """uvicorn's HTTP/1.1 protocol named by `http` ("auto", "httptools", "h11"), wrapped
    to enforce `limits`; None for any other (an HTTP/2 protocol is not HTTP/1.1 framed)."""
    if not isinstance(http, str) or http not in _HTTP1:
        return None
    inner: type[asyncio.Protocol] = import_from_string(HTTP_PROTOCOLS[http])

    class Limited(LimitedProtocol):
        inner_class = inner
        cap = limits.max_header_bytes
        header_timeout_s = limits.header_timeout_s
        body_timeout_s = limits.body_timeout_s
        too_large = answer(431, "headers_too_large",
                           f"the request line and headers take more than "
                           f"{limits.max_header_bytes} bytes")
        too_slow = answer(408, "request_timeout",
                          f"the request's headers did not arrive within "
                          f"{limits.header_timeout_s:g} s")

    Limited.__name__ = Limited.__qualname__ = f"Limited{inner.__name__}"
    return Limited


class LimitedProtocol(asyncio.Protocol):
    """uvicorn's protocol for one connection, fed only what arrives within the limits.

    Per request the cost is one more parse of its bytes by httptools and three
    callbacks (about 1 us for a worker's post); a timer only for a request whose head
    or body spans reads, at most one per connection, re-armed when it fires."""

    inner_class: ClassVar[Callable[..., asyncio.Protocol]]
    cap: ClassVar[int]
    header_timeout_s: ClassVar[float]
    body_timeout_s: ClassVar[float]
    too_large: ClassVar[bytes]
    too_slow: ClassVar[bytes]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # whatever uvicorn builds its protocol with (config, server_state, app_state,
        # _loop in 0.30-0.54) goes to its protocol as it is
        self._inner = self.inner_class(*args, **kwargs)
        self._inner_data = self._inner.data_received
        self._loop: asyncio.AbstractEventLoop = (kwargs.get("_loop")
                                                 or asyncio.get_running_loop())
        self._parser = httptools.HttpRequestParser(self)
        # as uvicorn's own parser, so that both see the same requests after a
        # `Connection: close` one (the data after it is ignored, not an error)
        self._parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self._transport: asyncio.Transport | None = None
        self._state = HEAD  # its first request's head is due from the start
        self._began = False  # a request's first byte came (an answer is due, not a bare close)
        self._dispatched = 0  # heads fed whole to uvicorn: it may be answering one of them
        self._head_start = 0  # where the head in progress began, from this read's start
        self._tail = b""  # the last bytes of a read that ended in a head: its end may straddle
        self._piece = (0, 0)  # the part of the read being parsed
        self._over = False  # a head ended over the cap in the piece just parsed
        self._over_by = 0
        self._deadline = 0.0  # 0: to be set at the end of this read
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # asyncio.Protocol, forwarded
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (not always an asyncio.Transport instance: uvloop's are not)
        self._transport = cast(asyncio.Transport, transport)
        self._inner.connection_made(transport)
        self._deadline = self._loop.time() + self.header_timeout_s
        self._arm()

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state >= OFF:
            if state == OFF:
                self._inner_data(data)
            return  # refused: what is left of the request is dropped
        n = len(data)
        held = -self._head_start if state == HEAD else 0
        try:
            if held + n <= self.cap:  # no head within this read can be over the cap
                self._piece = (0, n)
                self._parser.feed_data(data)
            else:
                self._feed_pieces(data, held)
        except httptools.HttpParserUpgrade:
            pass  # the parser goes on after it, as uvicorn's: the rest of the read is dropped
        except httptools.HttpParserError:
            self._stop_tracking()
            self._inner_data(data)
            return
        if self._over:
            self._refuse_head(self._over_by)
            return
        state = self._state
        if state == HEAD:
            head = n - self._head_start
            if head > self.cap:
                self._refuse_head(head)
                return
            self._head_start = -head
            self._tail = data[-3:] if n >= 3 else (self._tail + data)[-3:]
        if self._deadline == 0.0 and (state == HEAD or state == BODY):
            self._deadline = self._loop.time() + (
                self.header_timeout_s if state == HEAD else self.body_timeout_s)
            if self._timer is None or self._deadline < self._timer_at:
                self._arm()
        self._inner_data(data)

    def eof_received(self) -> bool | None:
        if self._state == DONE:
            return None  # the transport closes
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = DONE
        self._disarm()
        del self._parser  # it holds this protocol: no cycle left for the collector
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # httptools' callbacks (no others are defined, so the parser copies no bytes)
    def on_message_begin(self) -> None:
        if self._state == IDLE:
            self._deadline = 0.0
        self._state = HEAD
        self._began = True
        self._head_start = self._piece[0]

    def on_headers_complete(self) -> None:
        head = self._piece[1] - self._head_start
        if head > self.cap:  # refused after this piece: uvicorn never sees it
            self._over, self._over_by = True, head
            return
        self._state = BODY
        self._deadline = 0.0
        self._dispatched += 1

    def on_message_complete(self) -> None:
        self._state = IDLE

    def _feed_pieces(self, data: bytes, held: int) -> None:
        """Parse a read that could take a head over the cap in pieces, each up to the end
        of a head, if any: a head that ends in a piece ends at the piece's end, so its
        length is known. A head counts from the start of the piece it began in (exact for
        a request without a body before it in the read). After MAX_SEGMENTS pieces (a
        body full of blank lines) the rest is parsed whole and counted from its start."""
        view = memoryview(data)
        n = len(data)
        start, end = 0, -1
        if held:  # a head's end may straddle this read and the last one
            found = (self._tail + data[:3]).find(_HEAD_END)
            if found >= 0:
                end = found + 4 - len(self._tail)
        for _ in range(MAX_SEGMENTS):
            if end < 0:
                end = data.find(_HEAD_END, start)
                end = n if end < 0 else end + 4
            self._piece = (start, end)
            self._parser.feed_data(view[start:end])
            if self._over or end == n:
                return
            start, end = end, -1
        self._piece = (start, n)
        self._parser.feed_data(view[start:])

    # timers and refusals
    def _arm(self) -> None:
        self._disarm()
        self._timer_at = self._deadline
        self._timer = self._loop.call_at(self._deadline, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        state = self._state
        if state != HEAD and state != BODY:
            return  # the request it was armed for arrived (or none is due)
        if self._deadline > self._timer_at:
            self._arm()  # a later phase's deadline
            return
        assert self._transport is not None
        if not self._transport.is_reading():
            # uvicorn holds the request back (pipelined behind an answer in progress,
            # or a body the app has not read yet): the client is not the one late
            self._deadline = self._loop.time() + (
                self.header_timeout_s if state == HEAD else self.body_timeout_s)
            self._arm()
            return
        if state == BODY:
            self._refuse("body_timeout", None, timeout_s=self.body_timeout_s)
        else:
            self._refuse("header_timeout", self.too_slow if self._began else None,
                         timeout_s=self.header_timeout_s, began=self._began)

    def _refuse_head(self, head: int) -> None:
        self._refuse("headers_too_large", self.too_large, head_bytes=head, cap=self.cap)

    def _refuse(self, reason: str, reply: bytes | None, **fields: Any) -> None:
        """Close the connection: with `reply` first if no earlier request on it went to
        uvicorn (its answer could be in progress), then a moment of reading and dropping
        the rest, since closing with unread data resets the connection, and a client
        would lose the answer."""
        self._state = DONE
        self._disarm()
        transport = self._transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        log.info("http.refused", reason=reason, requests=self._dispatched,
                 client=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else None, **fields)
        if reply is None or self._dispatched:
            transport.close()
            return
        transport.write(reply)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._timer = self._loop.call_later(LINGER_S, transport.close)

    def _stop_tracking(self) -> None:
        self._state = OFF
        self._disarm()

"""Request limits (progress_sse.limits) against a real uvicorn, over raw sockets: the cap
on a request's head (431), the deadlines for its head (408) and its body, per request on
a kept-alive connection, and streams left alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from progress_sse.settings import Settings

from .helpers import Service, settings_from_env, start_service

CAP = 32 * 1024  # the default
PROTOCOLS = pytest.mark.parametrize("http", ["httptools", "h11"])

Start = Callable[..., Awaitable[Service]]
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def start(db_path: str) -> AsyncIterator[Start]:
    """Start the service with these settings (long deadlines unless given) under `http`."""
    services: list[Service] = []

    async def start(http: str = "httptools", **fields: float) -> Service:
        fields = {"header_timeout_s": 30.0, "body_timeout_s": 30.0, **fields}
        svc = await start_service(Settings(db=db_path, **fields), http=http)  # type: ignore[arg-type]
        services.append(svc)
        return svc

    yield start
    for svc in services:
        await svc.stop()


async def connect(svc: Service) -> Conn:
    return await asyncio.open_connection("127.0.0.1", svc.settings.port)


def head(path: str = "/healthz", size: int | None = None, method: str = "GET",
         extra: bytes = b"") -> bytes:
    """A request's head, padded by a header to exactly `size` bytes if given."""
    start = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s" % (method.encode(), path.encode(), extra)
    if size is None:
        return start + b"\r\n"
    pad = size - len(start) - len(b"X-Pad: \r\n\r\n")
    assert pad > 0
    return start + b"X-Pad: " + b"p" * pad + b"\r\n\r\n"


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    """One answer with a Content-Length body: status, headers, body."""
    raw = await reader.readuntil(b"\r\n\r\n")
    status, *lines = raw[:-4].split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines)
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return int(status.split()[1]), headers, body


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Whatever the server still writes, up to its close (a reset counts as closed)."""
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def dribble(writer: asyncio.StreamWriter, first: bytes, byte: bytes = b"x",
                  every: float = 0.05) -> None:
    """Slowloris: `first`, then one byte at a time, until the server closes."""
    try:
        writer.write(first)
        while True:
            await asyncio.sleep(every)
            writer.write(byte)
            await writer.drain()
    except ConnectionError:
        pass


async def send_pieces(writer: asyncio.StreamWriter, first: bytes, total: int,
                      sent: list[int]) -> None:
    """`first`, then one header value of `total` bytes in 64 KiB pieces (until refused)."""
    try:
        writer.write(first)
        piece = b"a" * 65536
        for _ in range(total // len(piece)):
            writer.write(piece)
            await writer.drain()
            sent[0] += len(piece)
        writer.write(b"\r\n\r\n")
        await writer.drain()
    except ConnectionError:
        pass


@PROTOCOLS
async def test_huge_header_gets_431_while_others_are_served(start: Start, http: str) -> None:
    """A header of 4 MiB sent in pieces: 431 in the service's error shape and the
    connection closed, soon; another client is answered at once meanwhile."""
    svc = await start(http)
    reader, writer = await connect(svc)
    sent = [0]
    sender = asyncio.create_task(
        send_pieces(writer, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Huge: ", 4 << 20,
                    sent))
    try:
        async with asyncio.timeout(10):
            while sent[0] < 2 * CAP and not sender.done():
                await asyncio.sleep(0.001)
            async with httpx.AsyncClient(base_url=svc.url, timeout=5) as client:
                began = time.monotonic()
                r = await client.get("/healthz")
                assert r.status_code == 200
                assert time.monotonic() - began < 1.0
            status, headers, body = await answer(reader)
            assert status == 431
            assert headers[b"connection"] == b"close"
            assert headers[b"content-type"] == b"application/json"
            assert body.startswith(b'{"error":{"code":"headers_too_large","message":')
            assert await until_closed(reader) == b""
    finally:
        sender.cancel()
        writer.close()


@PROTOCOLS
@pytest.mark.parametrize("pieces", ["whole", "1000-byte pieces", "split in its end"])
async def test_head_of_exactly_the_cap_is_served_one_byte_more_is_not(
        start: Start, http: str, pieces: str) -> None:
    """The request line and headers are counted exactly, however they arrive: a head of
    MAX_HEADER_BYTES is served, one of a byte more gets 431."""
    svc = await start(http)

    async def send(request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        reader, writer = await connect(svc)
        try:
            if pieces == "whole":
                parts = [request]
            elif pieces == "split in its end":
                parts = [request[:-2], request[-2:]]
            else:
                parts = [request[i:i + 1000] for i in range(0, len(request), 1000)]
            for part in parts:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0)
            return await answer(reader)
        finally:
            writer.close()

    async with asyncio.timeout(10):
        status, _, body = await send(head(size=CAP))
        assert status == 200, body
        status, _, body = await send(head(size=CAP + 1))
        assert status == 431


async def test_each_pipelined_head_is_counted_alone(start: Start) -> None:
    """Two heads of the cap's size pipelined in one write are both served (each counted
    from its own start), and one over it refuses its connection."""
    svc = await start()
    reader, writer = await connect(svc)
    try:
        async with asyncio.timeout(10):
            writer.write(head(size=CAP) + head(size=CAP))
            for _ in range(2):
                status, _, _ = await answer(reader)
                assert status == 200
    finally:
        writer.close()


@PROTOCOLS
async def test_a_later_request_on_a_kept_alive_connection_is_limited_too(
        start: Start, http: str) -> None:
    """After a request answered on the connection, an oversized next one is refused too:
    the connection closes, without an answer (one could land inside an answer in
    progress). The same when both were written at once: the big one is not answered."""
    svc = await start(http)
    reader, writer = await connect(svc)
    sent = [0]
    try:
        async with asyncio.timeout(10):
            writer.write(head())
            status, _, _ = await answer(reader)
            assert status == 200
            await send_pieces(writer, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Huge: ",
                              1 << 20, sent)
            assert await until_closed(reader) == b""
    finally:
        writer.close()

    reader, writer = await connect(svc)
    try:
        async with asyncio.timeout(10):
            writer.write(head() + head(size=4 * CAP))
            rest = await until_closed(reader)
            assert rest.count(b"HTTP/1.1 ") <= 1  # the first one's, if it came in time
    finally:
        writer.close()


async def test_an_unsupported_upgrade_does_not_end_the_limits(start: Start) -> None:
    """uvicorn serves a request asking for an upgrade it does not support as a plain one
    and reads the connection on as HTTP: its next requests are still limited."""
    svc = await start()
    reader, writer = await connect(svc)
    try:
        async with asyncio.timeout(10):
            writer.write(head(extra=b"Connection: upgrade\r\nUpgrade: nonsense\r\n"))
            status, _, _ = await answer(reader)
            assert status == 200
            writer.write(head(size=4 * CAP))
            assert await until_closed(reader) == b""
    finally:
        writer.close()


@PROTOCOLS
async def test_slow_head_is_cut_at_the_header_deadline(start: Start, http: str) -> None:
    """Slowloris: a head that keeps coming a byte at a time is answered 408 and closed at
    the deadline, counted from its first byte; a connection that sends nothing is closed
    (without an answer), and so is a slow head after an answered request."""
    svc = await start(http, header_timeout_s=0.5)
    silent_reader, silent_writer = await connect(svc)
    reader, writer = await connect(svc)
    began = time.monotonic()
    slow = asyncio.create_task(
        dribble(writer, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "))
    try:
        async with asyncio.timeout(5):
            status, headers, body = await answer(reader)
            assert status == 408 and headers[b"connection"] == b"close"
            assert body.startswith(b'{"error":{"code":"request_timeout","message":')
            assert await until_closed(reader) == b""
            assert time.monotonic() - began >= 0.45
            assert await until_closed(silent_reader) == b""
    finally:
        slow.cancel()
        writer.close()
        silent_writer.close()

    reader, writer = await connect(svc)
    try:
        async with asyncio.timeout(5):
            writer.write(head())
            status, _, _ = await answer(reader)
            assert status == 200
            slow = asyncio.create_task(dribble(writer, b"GET /healthz HTTP/1.1\r\n"))
            assert await until_closed(reader) == b""
    finally:
        slow.cancel()
        writer.close()


@PROTOCOLS
async def test_slow_body_is_cut_at_the_body_deadline(start: Start, http: str) -> None:
    """A body that keeps coming a byte at a time is cut at the body deadline, counted
    from the end of its head; the service goes on serving."""
    svc = await start(http, header_timeout_s=0.3, body_timeout_s=0.6)
    reader, writer = await connect(svc)
    began = time.monotonic()
    slow = asyncio.create_task(dribble(
        writer, head("/api/jobs", method="POST",
                     extra=b"Content-Type: application/json\r\nContent-Length: 1000\r\n")
        + b'{"kind": "', byte=b"a"))
    try:
        async with asyncio.timeout(5):
            assert await until_closed(reader) == b""
            assert time.monotonic() - began >= 0.55
        async with httpx.AsyncClient(base_url=svc.url, timeout=5) as client:
            r = await client.post("/api/jobs", json={"kind": "after"})
            assert r.status_code == 201
    finally:
        slow.cancel()
        writer.close()


@PROTOCOLS
async def test_open_stream_outlives_the_deadlines(start: Start, http: str) -> None:
    """The deadlines are for a request to arrive, not for its answer: a stream stays open
    and delivers long after both, while a slow head sent with it is cut."""
    svc = await start(http, header_timeout_s=0.2, body_timeout_s=0.2, keepalive_s=0.1)
    reader, writer = await connect(svc)
    slow_reader, slow_writer = await connect(svc)
    slow = asyncio.create_task(dribble(slow_writer, b"GET /healthz HTTP/1.1\r\n"))
    try:
        async with asyncio.timeout(10):
            writer.write(head("/api/events", extra=b"Accept: text/event-stream\r\n"))
            raw = await reader.readuntil(b"\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 200 ")
            began, seen = time.monotonic(), b""
            while time.monotonic() - began < 1.0 or seen.count(b": keep-alive") < 5:
                chunk = await reader.read(65536)
                assert chunk, "the stream was closed"
                seen += chunk
            assert (await until_closed(slow_reader)).startswith(b"HTTP/1.1 408 ")
            async with httpx.AsyncClient(base_url=svc.url, timeout=5) as client:
                r = await client.post("/api/jobs", json={"kind": "late"})
                assert r.status_code == 201
            seen = b""
            while b"event: created" not in seen:
                chunk = await reader.read(65536)
                assert chunk, "the stream was closed"
                seen += chunk
    finally:
        slow.cancel()
        writer.close()
        slow_writer.close()


def test_limits_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from progress_sse.errors import ConfigError

    assert settings_from_env(monkeypatch, {"PROGRESS_SSE_MAX_HEADER_BYTES": "65536",
                                           "PROGRESS_SSE_HEADER_TIMEOUT_S": "5",
                                           "PROGRESS_SSE_BODY_TIMEOUT_S": "60"}
                             ).max_header_bytes == 65536
    for name, value in (("MAX_HEADER_BYTES", "100"), ("HEADER_TIMEOUT_S", "0"),
                        ("BODY_TIMEOUT_S", "-1"), ("BODY_TIMEOUT_S", "nan")):
        with monkeypatch.context() as env, pytest.raises(ConfigError):
            settings_from_env(env, {f"PROGRESS_SSE_{name}": value})

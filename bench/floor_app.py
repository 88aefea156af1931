"""The floor for fan-out: what one delivery costs with nothing but asyncio and a socket.

A raw asyncio protocol, no HTTP framework: `GET` any path opens an SSE stream whose
task waits on a shared wake-up and writes each event's ready-made frame to its
transport; `POST` any path publishes one ~1 KiB event. This is the least a server
with one task per stream can spend per delivered event (the wake-up and the write
syscall), so `make bench` reports the service's figure beside it.

Run: python -m bench.floor_app PORT
"""

from __future__ import annotations

import asyncio
import sys

FRAME_BODY = b'{"type":"progress","job":{' + b'"pad":"' + b"x" * 900 + b'"}}'


class Floor:
    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.head = 0
        self.frame = b""

    def publish(self) -> int:
        self.head += 1
        self.frame = b"id: %d\nevent: progress\ndata: %s\n\n" % (self.head, FRAME_BODY)
        wake, self.wake = self.wake, asyncio.Event()
        wake.set()
        return self.head

    async def stream(self, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"cache-control: no-store\r\n\r\nretry: 1000\n\n")
        while not transport.is_closing():
            await self.wake.wait()
            transport.write(self.frame)


class Conn(asyncio.Protocol):
    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.buf = b""
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buf = rest[length:]
            if head.startswith(b"GET"):
                self.task = asyncio.get_running_loop().create_task(
                    self.floor.stream(self.transport))
            else:
                body = b'{"event_id":%d}' % self.floor.publish()
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\n\r\n%s" % (len(body), body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()


async def main(port: int) -> None:
    floor = Floor()
    server = await asyncio.get_running_loop().create_server(
        lambda: Conn(floor), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main(int(sys.argv[1])))

"""One huge header against a running service, and what everyone else sees meanwhile.

Clients poll GET /healthz on kept-alive connections, each 100 times a second, a
latency counted from when its request was due: first alone (the baseline), then
while one connection sends a single header of SIZE bytes (128 MiB by default). Prints
what the attacking connection got back, the p99 latency of the others before and
during the attack, and, given the server's pid, its resident memory (the peak sampled).

Run: python -m bench.attack_headers http://127.0.0.1:8000 [--pid PID] [--size BYTES]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path
from urllib.parse import urlsplit

PIECE = 1 << 20
EVERY_S = 0.01  # each client's pace: 100 requests/s


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan")


async def poll(host: str, port: int, every: float, until: asyncio.Event,
               out: list[float]) -> None:
    """GET /healthz every `every` seconds on one kept-alive connection. A latency counts
    from when its request was due, not sent: a server that stalls delays every request
    due meanwhile, not only the one in flight (no coordinated omission)."""
    reader, writer = await asyncio.open_connection(host, port)
    request = b"GET /healthz HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode()
    due = time.perf_counter()
    try:
        while not until.is_set():
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            now = time.perf_counter()
            while due <= now:  # each request due by now: answered now at the earliest
                out.append(now - due)
                due += every
    finally:
        writer.close()


async def measure(host: str, port: int, clients: int, seconds: float,
                  during: asyncio.Task[str] | None = None) -> list[float]:
    """Latencies of `clients` pollers for `seconds`, or until `during` is done if later."""
    stop, out = asyncio.Event(), list[float]()
    pollers = [asyncio.create_task(poll(host, port, EVERY_S, stop, out))
               for _ in range(clients)]
    await asyncio.sleep(seconds)
    if during is not None:
        await asyncio.wait([during])
    stop.set()
    await asyncio.gather(*pollers)
    return out


async def attack(host: str, port: int, size: int) -> str:
    """Send one header of `size` bytes; what came back, and when."""
    reader, writer = await asyncio.open_connection(host, port)
    began, sent = time.perf_counter(), 0

    async def send() -> None:
        nonlocal sent
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: %s\r\nX-Attack: " % host.encode())
        piece = b"a" * PIECE
        with contextlib.suppress(ConnectionError):
            while sent < size:
                writer.write(piece)
                await writer.drain()
                sent += PIECE
            writer.write(b"\r\n\r\n")
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        status = (await reader.readline()).decode().strip() or "(closed, no answer)"
    except ConnectionError as exc:
        status = f"(connection error: {exc})"
    answered = time.perf_counter() - began
    with contextlib.suppress(ConnectionError):
        await reader.read()  # up to the end of the server's writing (or its close)
    ended = time.perf_counter() - began
    sender.cancel()
    writer.close()
    return (f"{status!r} after {answered:.3f} s, with {sent >> 20} of {size >> 20} MiB sent; "
            f"the server's end of the connection after {ended:.3f} s")


async def main(url: str, pid: int | None, size: int, clients: int, seconds: float) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    peak = [rss_kib(pid) if pid else 0]

    async def sample() -> None:
        while pid:
            peak[0] = max(peak[0], rss_kib(pid))
            await asyncio.sleep(0.05)

    rss_before = peak[0]
    baseline = await measure(host, port, clients, seconds)
    sampler = asyncio.create_task(sample())
    hit = asyncio.create_task(attack(host, port, size))
    during = await measure(host, port, clients, seconds, during=hit)
    sampler.cancel()
    print(f"attack: one {size >> 20} MiB header: {hit.result()}")
    print(f"GET /healthz, {clients} clients: p99 baseline {p99(baseline) * 1e3:.1f} ms "
          f"({len(baseline)} requests due), p99 during {p99(during) * 1e3:.1f} ms "
          f"({len(during)} requests due), max during {max(during) * 1e3:.1f} ms")
    if pid:
        print(f"server RSS: {rss_before / 1024:.0f} MiB before, peak {peak[0] / 1024:.0f} MiB "
              f"during, {rss_kib(pid) / 1024:.0f} MiB after")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="the running service, e.g. http://127.0.0.1:8000")
    ap.add_argument("--pid", type=int, help="the server's pid, to report its memory")
    ap.add_argument("--size", type=int, default=128 << 20, help="header bytes (128 MiB)")
    ap.add_argument("--clients", type=int, default=8, help="polling clients (8)")
    ap.add_argument("--seconds", type=float, default=3.0,
                    help="each measurement, at least (3; during lasts the attack, if longer)")
    args = ap.parse_args()
    asyncio.run(main(args.url, args.pid, args.size, args.clients, args.seconds))

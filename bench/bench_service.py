"""`make bench`: the service against baselines measured in the same run, on this machine.

Figures, each with its baseline where one makes sense:
  1. durable progress posts/s (many concurrent workers) vs a bare Starlette POST endpoint;
  2. fan-out at 50 events/s to 100 and 1,000 subscribers: p50/p99 delivery latency and
     server CPU per delivered event, vs a hand-rolled queue-per-subscriber broadcaster
     and vs the floor (a raw asyncio server: one task per socket, a wake-up and a write
     per event, nothing else: bench/floor_app.py), and vs a bound: a bare Starlette POST
     and a bare SQLite commit (bench/commit_floor.py) at the same pace plus each delivery
     at the cheaper of ours and the floor's marginal cost;
  3. memory per idle stream with 1,000 open;
  4. resume replay rate for a client 100,000 events behind;
  5. SIGTERM to exit with 1,000 open streams;
  6. cancel to a long-polling worker's wake-up.
Load comes from raw keep-alive sockets in this process, so the client costs little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK = os.sysconf("SC_CLK_TCK")
ID_RE = re.compile(rb"(?m)^id: (\d+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, args: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.p = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server {args} did not start")

    def cpu_s(self) -> float:
        """CPU seconds of the server and its child processes."""
        pids = [str(self.p.pid)]
        children = Path(f"/proc/{self.p.pid}/task/{self.p.pid}/children")
        if children.exists():
            pids += children.read_text().split()
        total = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / CLK

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> float:
        t = time.monotonic()
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            return float("inf")
        return time.monotonic() - t


def service(db: str, *extra: str) -> Proc:
    port = free_port()
    return Proc([sys.executable, "-m", "progress_sse", "serve", "--port", str(port), "--db", db,
                 "--log-level", "warning", *extra], port,
                env={"PROGRESS_SSE_LOG_FORMAT": "json"})


def floor() -> Proc:
    port = free_port()
    return Proc([sys.executable, "-m", "bench.floor_app", str(port)], port)


def baseline() -> Proc:
    port = free_port()
    return Proc([sys.executable, "-m", "uvicorn", "bench.baseline_app:create_app", "--factory",
                 "--port", str(port), "--log-level", "warning", "--no-access-log"], port)


# ---------------------------------------------------------------- raw HTTP


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, method: str, path: str, body: bytes = b"",
                      ctype: str = "application/json") -> tuple[int, bytes]:
        self.w.write(f"{method} {path} HTTP/1.1\r\nHost: b\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.r.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        m = re.search(rb"(?i)content-length: (\d+)", head)
        data = await self.r.readexactly(int(m.group(1))) if m else b""
        return status, data

    def close(self) -> None:
        self.w.close()


async def post_load(port: int, paths: list[str], seconds: float) -> tuple[float, int]:
    """Each path gets its own keep-alive connection posting as fast as answers come."""
    count = errors = 0
    stop = time.monotonic() + seconds

    async def one(path: str) -> None:
        nonlocal count, errors
        c = await Conn.open(port)
        i = 0
        while time.monotonic() < stop:
            i += 1
            status, _ = await c.request("POST", path,
                                        b'{"progress": %.3f}' % min(100.0, i / 1000))
            if status == 200:
                count += 1
            else:
                errors += 1
        c.close()

    t0 = time.monotonic()
    await asyncio.gather(*(one(p) for p in paths))
    return count / (time.monotonic() - t0), errors


async def create_jobs(port: int, n: int) -> list[str]:
    c = await Conn.open(port)
    ids = []
    for i in range(n):
        status, body = await c.request("POST", "/api/jobs",
                                       json.dumps({"kind": "bench", "title": f"b{i}"}).encode())
        assert status == 201, body
        ids.append(json.loads(body)["job"]["id"])
    c.close()
    return ids


# ---------------------------------------------------------------- streams


class Subscriber:
    """A raw SSE reader that notes when each event id arrives."""

    def __init__(self) -> None:
        self.arrivals: dict[int, float] = {}
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def run(self, port: int, path: str, last_id: int | None = None) -> None:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        extra = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: b\r\nAccept: text/event-stream\r\n"
                          f"{extra}\r\n".encode())
        buf = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            now = time.monotonic()
            buf += chunk
            cut = buf.rfind(b"\n\n")
            if cut < 0:
                continue
            done, buf = buf[:cut], buf[cut + 2:]
            if b"snapshot" in done or b"retry" in done:
                self.ready.set()
            for m in ID_RE.finditer(done):
                self.arrivals[int(m.group(1))] = now
            self.ready.set()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.task:
            self.task.cancel()


async def open_subscribers(port: int, path: str, n: int) -> list[Subscriber]:
    subs = []
    for _ in range(n):
        s = Subscriber()
        s.task = asyncio.create_task(s.run(port, path))
        subs.append(s)
    async with asyncio.timeout(60):
        for s in subs:
            await s.ready.wait()
    return subs


async def paced_posts(c: Conn, path: str, rate: float, seconds: float
                      ) -> list[tuple[bytes, float]]:
    """Post at `rate` per second, one at a time; each answer's body and when it was sent."""
    out = []
    t_start = time.monotonic()
    k = 0
    while time.monotonic() - t_start < seconds:
        k += 1
        t = time.monotonic()
        _, body = await c.request("POST", path, b'{"progress": %d}' % min(k, 100))
        out.append((body, t))
        await asyncio.sleep(max(0.0, t_start + k / rate - time.monotonic()))
    return out


async def post_cost(proc: Proc, path: str, rate: float, seconds: float) -> float:
    """Server CPU per post at `rate`, nobody subscribed: what a post costs at that pace."""
    c = await Conn.open(proc.port)
    cpu0 = proc.cpu_s()
    n = len(await paced_posts(c, path, rate, seconds))
    cpu = proc.cpu_s() - cpu0
    c.close()
    return cpu / n * 1e6


async def fanout(proc: Proc, n_subs: int, publish_path: str, stream_path: str,
                 rate: float, seconds: float) -> dict[str, float]:
    subs = await open_subscribers(proc.port, stream_path, n_subs)
    await asyncio.sleep(0.5)
    c = await Conn.open(proc.port)
    cpu0 = proc.cpu_s()
    sent = {json.loads(body)["event_id"]: t
            for body, t in await paced_posts(c, publish_path, rate, seconds)}
    last = max(sent)
    async with asyncio.timeout(30):
        while not all(last in s.arrivals for s in subs):
            await asyncio.sleep(0.01)
    cpu = proc.cpu_s() - cpu0
    lat = sorted(s.arrivals[i] - t for s in subs for i, t in sent.items() if i in s.arrivals)
    delivered = len(lat)
    for s in subs:
        s.close()
    c.close()
    return {"p50_ms": lat[len(lat) // 2] * 1000, "p99_ms": lat[int(len(lat) * 0.99)] * 1000,
            "cpu_us_per_event": cpu / delivered * 1e6, "delivered": delivered,
            "expected": len(sent) * n_subs}


async def idle_memory(proc: Proc, n: int) -> float:
    await asyncio.sleep(0.5)
    before = proc.rss_kib()
    subs = await open_subscribers(proc.port, "/api/events", n)
    await asyncio.sleep(1.0)
    after = proc.rss_kib()
    for s in subs:
        s.close()
    return (after - before) / n


async def replay(proc: Proc, behind: int) -> float:
    """Events/s to a client resuming from id 0; it only counts frames, so it keeps up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    t0 = time.monotonic()
    writer.write(b"GET /api/events HTTP/1.1\r\nHost: b\r\nLast-Event-ID: 0\r\n\r\n")
    seen, tail = 0, b""
    async with asyncio.timeout(120):
        while seen < behind:
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            seen += (tail + chunk).count(b"\nevent: ")  # a frame split across reads counts once
            tail = chunk[-7:]
    took = time.monotonic() - t0
    writer.close()
    return seen / took


async def shutdown_with_streams(db: str, n: int) -> float:
    proc = service(db)
    subs = await open_subscribers(proc.port, "/api/events", n)
    took = await asyncio.to_thread(proc.stop)
    for s in subs:
        s.close()
    return took


async def cancel_wake(proc: Proc, rounds: int) -> list[float]:
    ids = await create_jobs(proc.port, rounds)
    worker, viewer = await Conn.open(proc.port), await Conn.open(proc.port)
    out = []
    for job in ids:
        await worker.request("POST", f"/api/jobs/{job}/progress", b'{"progress": 1}')
        poll = asyncio.create_task(worker.request("GET", f"/api/jobs/{job}/control?wait=10"))
        await asyncio.sleep(0.02)  # the poll is parked on the server
        t = time.monotonic()
        await viewer.request("POST", f"/api/jobs/{job}/cancel", b"{}")
        _, body = await poll
        out.append(time.monotonic() - t)
        assert json.loads(body)["control"]["cancel_requested"], body
    return sorted(out)


async def fill(proc: Proc, events: int) -> None:
    ids = await create_jobs(proc.port, 32)
    per = (events - 32) // 32 + 1
    head = 0

    async def one(job: str) -> None:
        nonlocal head
        c = await Conn.open(proc.port)
        for i in range(per):
            _, body = await c.request("POST", f"/api/jobs/{job}/progress",
                                      b'{"progress": %.4f}' % (i * 100 / per))
            head = max(head, json.loads(body)["event_id"])
        c.close()

    await asyncio.gather(*(one(j) for j in ids))


async def main(quick: bool, only: str | None) -> None:
    secs = 3.0 if quick else 8.0
    tmp = tempfile.mkdtemp(prefix="progress-sse-bench-")
    print(f"progress-sse bench  (python {sys.version.split()[0]}, {os.cpu_count()} cores)\n")

    # 1. durable posts vs bare endpoint, alternated to share the machine's noise
    rates: dict[str, list[float]] = {"bare": [], "ours": []}
    base = baseline()
    ours = service(f"{tmp}/posts.db")
    jobs = await create_jobs(ours.port, 64)
    for _ in range(2 if quick else 3):
        r, err = await post_load(base.port, ["/post"] * 64, secs / 2)
        rates["bare"].append(r)
        r, err2 = await post_load(ours.port, [f"/api/jobs/{j}/progress" for j in jobs], secs / 2)
        rates["ours"].append(r)
        assert err == err2 == 0, (err, err2)
    ours.stop()
    bare, mine = statistics.median(rates["bare"]), statistics.median(rates["ours"])
    print("1. progress posts/s, 64 concurrent workers (median of rounds)")
    print(f"   bare Starlette POST      {bare:9.0f}/s")
    print(f"   durable progress post    {mine:9.0f}/s   ratio {mine / bare:.2f}  (goal >= 0.60)\n")
    if only == "posts":
        base.stop()
        return

    # 2. fan-out
    print("2. fan-out at 50 events/s")
    ours = service(f"{tmp}/fan1.db")
    [job] = await create_jobs(ours.port, 1)
    one = await fanout(ours, 1, f"/api/jobs/{job}/progress", "/api/events", 50, secs)
    ours.stop()
    publish_us = one["cpu_us_per_event"]  # the post, its commit, one delivery
    print(f"   one subscriber: {publish_us:.0f} us of server CPU per published event "
          "(the durable post itself, its commit, one delivery)")
    # the least a durable service on this stack could spend: a Starlette POST that stores
    # nothing and a commit with nothing around it, at the same pace, then each delivery
    # at the cheapest marginal cost measured here
    bare_post_us = await post_cost(base, "/post", 50, secs)
    low = floor()
    floor_one_us = (await fanout(low, 1, "/publish", "/stream", 50, secs))["cpu_us_per_event"]
    low.stop()
    commit = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bench.commit_floor", "50", str(secs)],
        cwd=ROOT, capture_output=True, text=True, check=True)
    commit_us = float(commit.stdout.split()[-1])
    print(f"   at the same pace: a bare Starlette POST {bare_post_us:.0f} us; a bare SQLite "
          f"commit of one event {commit_us:.0f} us; the floor's publish and one delivery "
          f"{floor_one_us:.0f} us")
    for n in (100, 1000):
        ours = service(f"{tmp}/fan{n}.db")
        [job] = await create_jobs(ours.port, 1)
        f = await fanout(ours, n, f"/api/jobs/{job}/progress", "/api/events", 50, secs)
        ours.stop()
        b = await fanout(base, n, "/naive", "/naive", 50, secs)
        low = floor()
        z = await fanout(low, n, "/publish", "/stream", 50, secs)
        low.stop()
        print(f"   {n:5d} subs  ours:  p50 {f['p50_ms']:6.2f} ms  p99 {f['p99_ms']:7.2f} ms  "
              f"CPU {f['cpu_us_per_event']:5.2f} us/event  ({f['delivered']}/{f['expected']})"
              "  (goal <= 10 us/event)")
        marginal = (f["cpu_us_per_event"] * n - publish_us) / (n - 1)
        print(f"   {n:5d} subs  ours, each delivery beyond the first: {marginal:5.2f} us")
        print(f"   {n:5d} subs  naive: p50 {b['p50_ms']:6.2f} ms  p99 {b['p99_ms']:7.2f} ms  "
              f"CPU {b['cpu_us_per_event']:5.2f} us/event  -> ours/naive CPU "
              f"{f['cpu_us_per_event'] / b['cpu_us_per_event']:.2f}")
        print(f"   {n:5d} subs  floor: p50 {z['p50_ms']:6.2f} ms  p99 {z['p99_ms']:7.2f} ms  "
              f"CPU {z['cpu_us_per_event']:5.2f} us/event  -> ours/floor CPU "
              f"{f['cpu_us_per_event'] / z['cpu_us_per_event']:.2f}")
        floor_each = (z["cpu_us_per_event"] * n - floor_one_us) / (n - 1)
        each = min(floor_each, marginal)
        bound = (bare_post_us + commit_us + n * each) / n
        print(f"   {n:5d} subs  bound: the bare POST and commit + {n} deliveries at "
              f"{each:.2f} us (the cheaper of ours and the floor's {floor_each:.2f}) = "
              f"{bound:5.2f} us/event")
    base.stop()

    # 3. idle memory
    ours = service(f"{tmp}/idle.db")
    per = await idle_memory(ours, 1000)
    print(f"\n3. memory per idle stream, 1,000 open: {per:.1f} KiB  (goal <= 20 KiB)")

    # 6. cancel wake-up (same server)
    waits = await cancel_wake(ours, 30 if quick else 100)
    ours.stop()
    print(f"6. cancel -> long-polling worker woken: p50 {waits[len(waits) // 2] * 1000:.1f} ms, "
          f"max {waits[-1] * 1000:.1f} ms  (goal <= 50 ms)")

    # 4. replay
    behind = 20_000 if quick else 100_000
    ours = service(f"{tmp}/replay.db")
    t = time.monotonic()
    await fill(ours, behind)
    fill_rate = behind / (time.monotonic() - t)
    rate = await replay(ours, behind)
    ours.stop()
    print(f"4. resume replay, {behind:,} events behind: {rate:,.0f} events/s  (goal >= 100k/s)"
          f"   [filling them: {fill_rate:,.0f} posts/s]")

    # 5. shutdown
    took = await shutdown_with_streams(f"{tmp}/shutdown.db", 1000)
    print(f"5. SIGTERM -> exit with 1,000 open streams: {took:.2f} s  (goal well under 2 s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["posts"], help="figure 1 alone")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args.quick, args.only))

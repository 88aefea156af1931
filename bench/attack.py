"""`make attack`: the attack figures of the issue, re-run against a real service process.

Each figure starts its own service (`python -m progress_sse serve` in a temp dir, on a
free port, JWT mode with a 40-character secret, logging at warning so that request
lines cost nothing) and drives one attack at it from this process:

  1. storm      resuming readers behind a 16-event tail while another user opens and
                closes ~50 streams/s: events lost and repeated per reader, against the
                stored log (GET /api/jobs/{id}/events JSON pages).
  2. longpolls  2 x 20,000 junk long polls (8 KB junk ids, junk credentials): the
                server's RSS before, after the first and after the second round (flat:
                the second round does not grow it), and the watched-jobs gauge.
  3. unread     30 SSE requests that never read, replaying a log of ~35-46 KB events:
                RSS growth against the bound chosen (each stream holds at most one
                chunk of stream_buffer_bytes, 256 KiB, or one bigger event, waiting,
                and one in its connection's buffer), and others' GET /api/jobs/{id}.
  4. header     one 128 MiB header (bench/attack_headers.py): what the attacker gets,
                and the p99 of others' GET /healthz before and during.
  5. openclose  one user with 500 jobs opens and drops 1,000 streams in 2 s, then
                5,000 as fast as it can: others' p50/p99/max meanwhile, snapshot reads
                per open, and how long until the server's CPU time stops growing.
  6. writer     the store's writer stalled (another process holds the database's write
                lock): time until /healthz says 503 and why, how long a post takes (503
                at PROGRESS_SSE_WRITE_TIMEOUT_S, 5 s), then the lock let go and time
                until /healthz is 200 again.

Latencies count from when a request was due (each sampler runs at a fixed pace), so a
stalled server is charged for every request due meanwhile. RSS is the server process's
VmRSS. Each figure prints one line as it ends; the table at
the end repeats them, with "ok" when the measurement meets the issue's claim by the
criterion named in its function's docstring.

Run: python bench/attack.py [--only NAME] [--quick]   (--quick: shorter rounds)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this tree's progress_sse and bench, not an installed one

from bench import attack_headers  # noqa: E402
from progress_sse.auth import mint_token  # noqa: E402

SECRET = "attack-bench-secret-0123456789abcdefghij"  # 40 characters
CLK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20


# ---------------------------------------------------------------- the service and tools


class Server:
    """The service as a process of its own, on a free port, with its database in `home`."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        home.mkdir(parents=True)
        self.db = home / "progress.db"
        self.log_path = home / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PROGRESS_SSE_JWT_SECRET": SECRET,
               "PROGRESS_SSE_LOG_FORMAT": "json", "PROGRESS_SSE_LOG_LEVEL": "warning",
               **(env or {})}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "progress_sse", "serve", "--port", str(self.port),
                 "--db", str(self.db)], cwd=ROOT, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("the server did not become healthy")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mib(self) -> float:
        return attack_headers.rss_kib(self.pid) / 1024

    def cpu_s(self) -> float:
        """CPU seconds (user + system) of the server process itself."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bearer(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, sub, 'read create', 600)}"}


def client(srv: Server, sub: str, connections: int = 100) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=srv.url, timeout=30, headers=bearer(sub),
                             limits=httpx.Limits(max_connections=connections))


async def create_job(c: httpx.AsyncClient, **fields: Any) -> tuple[str, str]:
    """A new job's id and worker token."""
    r = await c.post("/api/jobs", json={"kind": "bench", **fields})
    r.raise_for_status()
    return r.json()["job"]["id"], r.json()["worker_token"]


async def metric(c: httpx.AsyncClient, name: str) -> float:
    for line in (await c.get("/metrics")).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


class Pacer:
    """Hands out turns at `rate` per second (shared by several loops); None: at once."""

    def __init__(self, rate: float | None) -> None:
        self.rate, self.start, self.turns = rate, time.perf_counter(), 0

    async def turn(self) -> None:
        due = self.start + self.turns / self.rate if self.rate else 0.0
        self.turns += 1
        await asyncio.sleep(max(0.0, due - time.perf_counter()))


async def sample_latency(c: httpx.AsyncClient, path: str, stop: asyncio.Event,
                         every: float = 0.02) -> list[float]:
    """GET `path` every `every` seconds until `stop`; each latency counted from when its
    request was due (as attack_headers.poll does), non-200 answers counted as infinite."""
    out: list[float] = []
    due = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        ok = (await c.get(path)).status_code == 200
        now = time.perf_counter()
        while due <= now:
            out.append(now - due if ok else float("inf"))
            due += every
    return out


def spread(samples: list[float]) -> str:
    if not samples:
        return "no samples"
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    return (f"p50 {p50 * 1e3:.1f} ms, p99 {attack_headers.p99(ordered) * 1e3:.1f} ms, "
            f"max {ordered[-1] * 1e3:.1f} ms ({len(ordered)} requests due)")


@dataclass
class Figure:
    number: int
    name: str
    claim: str
    measured: str = "(not run)"
    ok: bool | None = None


# ---------------------------------------------------------------- 1. the stream storm


async def resuming_reader(c: httpx.AsyncClient, path: str, params: dict[str, str],
                          start: int, final: dict[str, int], posted: list[int],
                          rng: random.Random, deadline: float) -> dict[str, Any]:
    """Read for ~3 s, hang up, pause 0.5-1.5 s (30-90 events at 60/s: behind the 16-event
    tail), resume with Last-Event-ID as EventSource does; until the job's last event.
    `posted` holds the newest event id the worker was answered: how far behind it is."""
    seen: list[int] = []
    last, resumes, restarts, errors, behind = start, 0, 0, 0, 0
    while time.monotonic() < deadline and not ("id" in final and last >= final["id"]):
        behind += posted[0] - last > 16  # more than the tail holds: read from the store
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
        try:
            async with asyncio.timeout(rng.uniform(2.0, 4.0)), \
                    aconnect_sse(c, "GET", path, params=params, headers=headers) as src:
                if src.response.status_code == 204:  # the job's end was seen
                    break
                if src.response.status_code != 200:
                    errors += 1
                async for ev in src.aiter_sse():
                    if ev.event == "snapshot":
                        restarts += 1  # a resume that started over instead
                    elif ev.data and ev.id:
                        seen.append(int(ev.id))
                        last = int(ev.id)
                        if "id" in final and last >= final["id"]:
                            break
        except TimeoutError:
            pass  # the hang-up
        except httpx.HTTPError:
            errors += 1
        resumes += 1
        await asyncio.sleep(rng.uniform(0.5, 1.5))
    return {"seen": seen, "resumes": resumes, "restarts": restarts, "errors": errors,
            "behind": behind}


async def open_and_close(c: httpx.AsyncClient, pacer: Pacer, stop: asyncio.Event,
                         counts: Counter[str]) -> None:
    """Open /api/events, take its snapshot, close; at the pacer's rate until `stop`."""
    while not stop.is_set():
        await pacer.turn()
        try:
            async with asyncio.timeout(10), aconnect_sse(c, "GET", "/api/events") as src:
                counts[str(src.response.status_code)] += 1
                if src.response.status_code == 200:
                    async for ev in src.aiter_sse():
                        if ev.event == "snapshot":
                            break
        except (TimeoutError, httpx.HTTPError):
            counts["error"] += 1


async def fig_storm(fig: Figure, home: Path, quick: bool) -> None:
    """ok: every reader reached the job's last event, with none lost and none repeated."""
    seconds = 10.0 if quick else 40.0
    srv = Server(home, {"PROGRESS_SSE_TAIL_SIZE": "16"})
    try:
        async with client(srv, "alice") as alice, client(srv, "bob") as bob:
            job_id, _ = await create_job(alice, title="A's job")
            for i in range(20):  # B's snapshots have something to read
                await create_job(bob, title=f"B {i}", meta={"note": "n" * 500})
            start = (await alice.get("/healthz")).json()["head"]
            final: dict[str, int] = {}
            posted = [start]
            stop, counts = asyncio.Event(), Counter[str]()
            storm_pacer = Pacer(50.0)
            stormers = [asyncio.create_task(open_and_close(bob, storm_pacer, stop, counts))
                        for _ in range(10)]
            kinds = {"job stream": (f"/api/jobs/{job_id}/events", {}),
                     "events?job": ("/api/events", {"job": job_id}),
                     "events": ("/api/events", {})}
            rng = random.Random(1)
            deadline = time.monotonic() + seconds + 60
            readers = {(kind, n): asyncio.create_task(resuming_reader(
                alice, path, params, start, final, posted, random.Random(rng.random()),
                deadline))
                for kind, (path, params) in kinds.items() for n in range(2)}
            posting, seq = Pacer(60.0), 0
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                await posting.turn()
                r = await alice.post(f"/api/jobs/{job_id}/progress",
                                     json={"progress": min(99.0, seq / 30), "seq": seq})
                r.raise_for_status()
                posted[0] = r.json()["event_id"]
                seq += 1
            r = await alice.post(f"/api/jobs/{job_id}/finish", json={"status": "succeeded"})
            final["id"] = r.json()["job"]["final_event_id"]
            results = {key: await task for key, task in readers.items()}
            storm_s = time.perf_counter() - storm_pacer.start
            stop.set()
            await asyncio.gather(*stormers)
            stored, after = [], start  # the stored log, as JSON pages
            while page := (await alice.get(f"/api/jobs/{job_id}/events",
                                           params={"after": after, "limit": 1000})
                           ).json()["events"]:
                stored += [e["id"] for e in page]
                after = page[-1]["id"]
    finally:
        srv.stop()
    # A has this one job, so each of A's streams may see exactly its stored log
    lost_all = dups_all = 0
    details = []
    for (kind, n), res in results.items():
        seen = res["seen"]
        lost = len(set(stored) - set(seen))
        dups = len(seen) - len(set(seen))
        lost_all, dups_all = lost_all + lost, dups_all + dups
        order = "" if seen == sorted(seen) else ", OUT OF ORDER"
        end = "" if seen and seen[-1] == stored[-1] else ", DID NOT REACH THE END"
        extra = "".join(f", {res[k]} {k}" for k in ("restarts", "errors") if res[k])
        details.append(f"{kind}#{n}: lost {lost}, dup {dups}, {len(seen)} events read, "
                       f"{res['resumes']} connections ({res['behind']} opened more than 16 "
                       f"events behind){order}{end}{extra}")
    fig.ok = lost_all == 0 and dups_all == 0 and all("DID NOT" not in d and "ORDER" not in d
                                                     for d in details)
    fig.measured = (f"lost {lost_all}, duplicates {dups_all} over 6 readers; {len(stored)} "
                    f"events stored in {seconds:.0f} s; B opened {counts['200']} streams "
                    f"({counts['200'] / storm_s:.0f}/s), 429 {counts['429']}, "
                    f"errors {counts['error']}")
    print(f"1. storm: {fig.measured}\n   " + "\n   ".join(details))


# ---------------------------------------------------------------- 2. junk long polls


async def junk_polls(port: int, job_id: str, first: int, count: int,
                     concurrency: int = 50) -> tuple[Counter[int], float]:
    """`count` GET /api/jobs/{id}/control?wait=1 on `concurrency` kept-alive sockets, in
    turn: 8 KB junk id with a junk worker token, a junk bearer, or nothing; a real job id
    with a junk worker token. The answers' statuses and the seconds taken."""
    credentials = ["X-Worker-Token: junk\r\n", "Authorization: Bearer junk.junk.junk\r\n",
                   "", "X-Worker-Token: junk\r\n"]
    statuses: Counter[int] = Counter()
    todo = iter(range(first, first + count))

    async def connection() -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for i in todo:
            target = job_id if i % 4 == 3 else f"{i:08d}" + "x" * 8000
            request = (f"GET /api/jobs/{target}/control?wait=1 HTTP/1.1\r\n"
                       f"Host: 127.0.0.1\r\n{credentials[i % 4]}\r\n").encode()
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = conn
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                statuses[0] += 1  # 0: the connection closed instead of an answer
                writer.close()
                conn = None
                continue
            lines = head.lower().split(b"\r\n")
            statuses[int(lines[0].split()[1])] += 1
            length = next((int(x.split(b":")[1]) for x in lines
                           if x.startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            if b"connection: close" in lines:
                writer.close()
                conn = None
        if conn is not None:
            conn[1].close()

    began = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return statuses, time.perf_counter() - began


async def fig_longpolls(fig: Figure, home: Path, quick: bool) -> None:
    """ok: the second round grows RSS by less than 2 MiB and no wake-up is left."""
    n = 5_000 if quick else 20_000
    srv = Server(home)
    try:
        async with client(srv, "alice") as alice:
            job_id, _ = await create_job(alice)
            before = srv.rss_mib()
            first, took1 = await junk_polls(srv.port, job_id, 0, n)
            after1 = srv.rss_mib()
            second, took2 = await junk_polls(srv.port, job_id, n, n)
            after2 = srv.rss_mib()
            watched = await metric(alice, "progress_sse_watched_jobs")
    finally:
        srv.stop()
    answers = ", ".join(f"{s or 'closed'}: {k}" for s, k in sorted((first + second).items()))
    fig.ok = after2 - after1 < 2 and watched == 0
    fig.measured = (f"RSS {before:.1f} MiB before, {after1:.1f} after {n:,}, {after2:.1f} "
                    f"after {2 * n:,} ({after2 - after1:+.1f} MiB in round 2, "
                    f"{(after2 - after1) * MIB / n:.0f} bytes a request); "
                    f"watched_jobs {watched:.0f}")
    print(f"2. longpolls: {fig.measured}; answers {answers}; "
          f"{n / took1:.0f} and {n / took2:.0f} requests/s")


# ---------------------------------------------------------------- 3. streams that never read


async def open_unread(port: int, token: str) -> asyncio.StreamWriter:
    """An SSE request from the first event on, whose client never reads a byte."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n"
                 "Accept: text/event-stream\r\nLast-Event-ID: 1\r\n\r\n".encode())
    await writer.drain()
    return writer


async def fig_unread(fig: Figure, home: Path, quick: bool) -> None:
    """ok: each stream beyond the first adds at most the bound chosen (with 10% for the
    allocator), 2 x (stream_buffer_bytes + the largest event) + 20 KiB: one chunk
    waiting for its connection to drain, one in the connection's buffer, and what an
    idle stream costs (bench_service.py measures that: under 20 KiB); and others' p99
    stays below 1 s. The first stream is counted apart: it also pays what any replay
    costs once (SQLite's page cache, the readers)."""
    streams, buffer_bytes, idle_stream = 30, 256 << 10, 20 << 10
    srv = Server(home, {"PROGRESS_SSE_TAIL_SIZE": "16"})
    writers: list[asyncio.StreamWriter] = []

    async def hold(count: int) -> None:
        """Open streams up to `count`, wait until they are open and stalled."""
        while len(writers) < count:
            writers.append(await open_unread(srv.port, token))
        while (await alice.get("/healthz")).json()["streams"] < count:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # their replays run into their full buffers

    try:
        async with client(srv, "alice") as alice:
            job_id, _ = await create_job(alice, meta={"blob": "m" * 16000})
            for i in range(400):
                r = await alice.post(f"/api/jobs/{job_id}/progress", json={
                    "progress": i / 5, "message": "x" * 2000,
                    "data": {"blob": "d" * 16000, "i": i}})
                r.raise_for_status()
            with contextlib.closing(sqlite3.connect(f"file:{srv.db}?mode=ro", uri=True)) as db:
                total, largest, count = db.execute(
                    "SELECT sum(length(body)), max(length(body)), count(*) FROM events"
                ).fetchone()
            path = f"/api/jobs/{job_id}"
            stop = asyncio.Event()
            base = asyncio.create_task(sample_latency(alice, path, stop))
            await asyncio.sleep(3)
            stop.set()
            baseline = await base
            token = alice.headers["Authorization"]
            before = srv.rss_mib()
            await hold(1)
            one = srv.rss_mib()
            stop = asyncio.Event()
            during_task = asyncio.create_task(sample_latency(alice, path, stop))
            await hold(streams)
            peak = srv.rss_mib()
            for _ in range(60):  # 3 s more
                peak = max(peak, srv.rss_mib())
                await asyncio.sleep(0.05)
            stop.set()
            during = await during_task
            after = srv.rss_mib()
    finally:
        for w in writers:
            w.close()
        srv.stop()
    bound = (2 * (buffer_bytes + largest) + idle_stream) / MIB
    each = (peak - one) / (streams - 1)
    fig.ok = each <= 1.1 * bound and attack_headers.p99(during) < 1.0
    fig.measured = (f"RSS {before:.1f} MiB before, {one:.1f} with 1 stream, {after:.1f} with "
                    f"{streams} (peak {peak:.1f}): {each:.2f} MiB per stream after the first, "
                    f"bound {bound:.2f}; others' p99 {attack_headers.p99(during) * 1e3:.0f} ms")
    print(f"3. unread: {fig.measured}\n   log {count} events, {total / MIB:.1f} MiB, "
          f"{total / count / 1e3:.0f} KB each on average (largest {largest / 1e3:.0f} KB); "
          f"GET /api/jobs/{{id}} before: {spread(baseline)}; while the streams open and "
          f"stay unread: {spread(during)}")


# ---------------------------------------------------------------- 4. a 128 MiB header


async def fig_header(fig: Figure, home: Path, quick: bool) -> None:
    """ok: refused with 431, and others' p99 during is within 2x (+10 ms) of before.
    The pieces of bench/attack_headers.py: 8 clients poll GET /healthz 100 times a
    second, alone and then while one connection sends the header."""
    size, clients, seconds = 128 << 20, 8, (1.0 if quick else 3.0)
    srv = Server(home)
    peak = [srv.rss_mib()]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], srv.rss_mib())
            await asyncio.sleep(0.05)

    try:
        before = srv.rss_mib()
        baseline = await attack_headers.measure("127.0.0.1", srv.port, clients, seconds)
        sampler = asyncio.create_task(sample())
        hit = asyncio.create_task(attack_headers.attack("127.0.0.1", srv.port, size))
        during = await attack_headers.measure("127.0.0.1", srv.port, clients, seconds,
                                              during=hit)
        sampler.cancel()
        after = srv.rss_mib()
    finally:
        srv.stop()
    p99_before, p99_during = attack_headers.p99(baseline), attack_headers.p99(during)
    fig.ok = "431" in hit.result() and p99_during <= 2 * p99_before + 0.010
    fig.measured = (f"{hit.result().split(' after ')[0]}; others' p99 "
                    f"{p99_before * 1e3:.1f} ms before, {p99_during * 1e3:.1f} ms during")
    print(f"4. header: {hit.result()}\n   GET /healthz, {clients} clients: before "
          f"{spread(baseline)}; during {spread(during)}\n   RSS {before:.1f} MiB "
          f"before, peak {peak[0]:.1f} during, {after:.1f} after")


# ---------------------------------------------------------------- 5. open-and-close storm


async def open_and_drop(port: int, request: bytes, pacer: Pacer, count: int,
                        opened: list[int]) -> None:
    """Open a stream and hang up at once, while the `count` opens last."""
    while opened[0] < count:
        opened[0] += 1
        await pacer.turn()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def until_idle(srv: Server, since: float) -> tuple[float, float]:
    """Seconds from `since` until the server's CPU time grows by at most 20 ms over half
    a second (then it is idle), and the CPU seconds spent from `since` to then."""
    cpu0 = srv.cpu_s()
    window: list[tuple[float, float]] = []
    while time.perf_counter() - since < 60:
        window.append((time.perf_counter(), srv.cpu_s()))
        while window[-1][0] - window[0][0] > 0.5:
            window.pop(0)
        if window[-1][0] - window[0][0] >= 0.45 and window[-1][1] - window[0][1] <= 0.02:
            return window[0][0] - since, window[0][1] - cpu0
        await asyncio.sleep(0.05)
    return float("inf"), srv.cpu_s() - cpu0


async def fig_openclose(fig: Figure, home: Path, quick: bool) -> None:
    """ok: others' p99 below 1 s in both rounds."""
    rounds = [(1_000, 500.0), (1_000 if quick else 5_000, None)]  # (opens, per second)
    srv = Server(home)
    lines, short = [], []
    worst = 0.0
    try:
        async with client(srv, "bob") as bob, client(srv, "alice") as alice:
            for start in range(0, 500, 25):
                await asyncio.gather(*(create_job(bob, title=f"job {i}",
                                                  meta={"note": "n" * 300})
                                       for i in range(start, start + 25)))
            job_id, _ = await create_job(alice)
            request = (f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                       f"{bob.headers['Authorization']}\r\n\r\n").encode()
            for count, rate in rounds:
                reads0 = await metric(alice, "progress_sse_snapshot_reads_total")
                started0 = await metric(alice, "progress_sse_stream_catch_ups_total")
                stop, opened, pacer = asyncio.Event(), [0], Pacer(rate)
                other = asyncio.create_task(sample_latency(alice, f"/api/jobs/{job_id}", stop))
                await asyncio.gather(*(open_and_drop(srv.port, request, pacer, count, opened)
                                       for _ in range(40)))
                ended = time.perf_counter()
                stop.set()
                latencies = await other
                idle_s, cpu_after = await until_idle(srv, ended)
                reads = await metric(alice, "progress_sse_snapshot_reads_total") - reads0
                # a stream's first catch-up runs as it starts: the opens that got that far
                started = await metric(alice, "progress_sse_stream_catch_ups_total") - started0
                p99 = attack_headers.p99(latencies)
                worst = max(worst, p99)
                lines.append(f"{count:,} opens in {ended - pacer.start:.1f} s: others' "
                             f"{spread(latencies)}; idle {idle_s:.1f} s after the last "
                             f"({cpu_after:.2f} s CPU meanwhile); {started:.0f} streams "
                             f"started, {reads:.0f} snapshot reads")
                short.append(f"{count:,} opens: p99 {p99 * 1e3:.0f} ms, idle {idle_s:.1f} s "
                             f"after, {reads:.0f} snapshot reads")
            streams = (await alice.get("/healthz")).json()["streams"]
    finally:
        srv.stop()
    fig.ok = worst < 1.0
    fig.measured = "others' " + "; ".join(short)
    print(f"5. openclose: others' p99 at worst {worst * 1e3:.0f} ms\n   "
          + "\n   ".join(lines) + f"\n   streams open at the end: {streams}")


# ---------------------------------------------------------------- 6. a stalled writer


async def timed(call: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    began = time.perf_counter()
    r = await call
    return r, time.perf_counter() - began


async def fig_writer(fig: Figure, home: Path, quick: bool) -> None:
    """ok: /healthz says 503 within the write deadline (5 s) plus the idle probe's
    interval (0.25 s) and a second of slack, the post answers 503 at the deadline (within
    a second more), and /healthz is 200 again once the lock is let go."""
    deadline = 5.0
    srv = Server(home)
    try:
        async with client(srv, "alice") as alice:
            job_id, _ = await create_job(alice)
            path = f"/api/jobs/{job_id}/progress"
            (await alice.post(path, json={"progress": 1, "seq": 1})).raise_for_status()
            other = sqlite3.connect(srv.db, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            stopped = time.perf_counter()
            try:
                while True:  # /healthz until it says so, each answer timed
                    health, took = await timed(alice.get("/healthz"))
                    if health.status_code != 200 or time.perf_counter() - stopped > 30:
                        break
                    await asyncio.sleep(0.05)
                to_503 = time.perf_counter() - stopped
                post, post_s = await timed(alice.post(path, json={"progress": 2, "seq": 2}))
                again, again_s = await timed(alice.get("/healthz"))
            finally:
                other.execute("ROLLBACK")
                other.close()
            resumed = time.perf_counter()
            while (back := await alice.get("/healthz")).status_code != 200 \
                    and time.perf_counter() - resumed < 30:
                await asyncio.sleep(0.05)
            back_s = time.perf_counter() - resumed
    finally:
        srv.stop()
    post_error = post.json().get("error", {}).get("message", post.text[:80])
    fig.ok = (health.status_code == 503 and to_503 <= deadline + 0.25 + 1.0
              and post.status_code == 503 and deadline - 0.1 <= post_s <= deadline + 1.0
              and back.status_code == 200)
    fig.measured = (f"/healthz {health.status_code} {to_503:.2f} s after the lock; post "
                    f"{post.status_code} in {post_s:.2f} s; {back.status_code} "
                    f"{back_s:.2f} s after it went")
    print(f"6. writer: {fig.measured}\n   /healthz: {health.status_code} "
          f"{health.text} (that answer took {took:.2f} s)\n   post: {post.status_code} "
          f"{post_error!r}\n   /healthz with the post timed out: {again.status_code} in "
          f"{again_s * 1e3:.0f} ms {again.text}\n   after the lock: {back.status_code} "
          f"{back.text}")


# ---------------------------------------------------------------- main


FIGURES: list[tuple[str, str, Callable[[Figure, Path, bool], Awaitable[None]]]] = [
    ("storm", "events lost by resuming readers during a stream storm: 0", fig_storm),
    ("longpolls", "memory after 20,000 junk long-polls: flat", fig_longpolls),
    ("unread", "RSS with 30 non-reading streams on a big job: bounded", fig_unread),
    ("header", "a 128 MiB header: refused, with others' p99 unchanged", fig_header),
    ("openclose", "the open-and-close storm: others' p99 below 1 s", fig_openclose),
    ("writer", "/healthz during a stalled writer: 503 within the write deadline",
     fig_writer),
]


async def main(only: str | None, quick: bool) -> None:
    figures = [Figure(i, name, claim) for i, (name, claim, _) in enumerate(FIGURES, 1)]
    with tempfile.TemporaryDirectory(prefix="progress-attack-") as tmp:
        for fig, (name, _, run) in zip(figures, FIGURES, strict=True):
            if only not in (None, name, str(fig.number)):
                continue
            try:
                await run(fig, Path(tmp) / name, quick)
            except Exception as exc:  # one figure's failure should not hide the others
                fig.measured, fig.ok = f"FAILED: {type(exc).__name__}: {exc}", False
                print(f"{fig.number}. {name}: {fig.measured}")
                log = Path(tmp) / name / "server.log"
                if log.exists():
                    print("   server log:", log.read_text()[-1500:])
    print()
    ran = [f for f in figures if f.measured != "(not run)"]
    width = max(len(f.claim) for f in ran)
    print(f"{'#':<2} {'the issue says':<{width}}  {'ok':<3} measured")
    for f in ran:
        mark = {True: "ok", False: "NO", None: "?"}[f.ok]
        print(f"{f.number:<2} {f.claim:<{width}}  {mark:<3} {f.measured}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=[n for n, _, _ in FIGURES] + [str(i) for i in range(1, 7)],
                    help="run one figure (by name or number)")
    ap.add_argument("--quick", action="store_true", help="shorter rounds (storm 10 s)")
    args = ap.parse_args()
    asyncio.run(main(args.only, args.quick))

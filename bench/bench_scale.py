"""`make bench-scale`: the PostgreSQL store, one and two instances, against SQLite, in one run.

Figures (issue 18), each against its baseline measured in the same run:
  1. durable posts/s, 64 concurrent workers: PostgreSQL with one instance and with two,
     against SQLite with one (goal: one PostgreSQL instance >= 0.5x SQLite);
  2. cross-instance delivery at 50 events/s to 100 subscribers split over two instances,
     posts through one of them: p50/p99 of each half (goal: p99 <= 50 ms);
  3. a cancel posted on one instance waking a long-poll on the other, p50/p99, idle and
     with posts going on (goal: p50 <= 50 ms);
  4. resume replay for a client 100,000 events behind, PostgreSQL against SQLite (goal:
     >= 50k events/s). The events are filled through the store's own write path
     (`Store.submit`, many at once: group commits), so the rows are genuine.

Every service instance is a process of its own, and so is the post load (`load` mode of
this script, two processes of 32 workers each), so neither the client nor one Python
process is the limit. Each figure gets a fresh database with a random name on the server
at PROGRESS_SSE_BENCH_POSTGRES (default: postgres@127.0.0.1:5432, as the tests), dropped
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator

from bench.bench_service import (
    Conn,
    Subscriber,
    create_jobs,
    open_subscribers,
    paced_posts,
    replay,
    service,
)

ADMIN = os.environ.get("PROGRESS_SSE_BENCH_POSTGRES",
                       "postgresql://postgres@127.0.0.1:5432/postgres")
LOADERS = 2  # post-load processes
WORKERS = 64  # concurrent posting workers in all


# ---------------------------------------------------------------- databases


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(ADMIN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class Databases:
    """Fresh databases with random names, all dropped at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def new(self) -> str:
        name = f"progress_sse_bench_{secrets.token_hex(6)}"
        await _admin(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return f"{ADMIN.rsplit('/', 1)[0]}/{name}"

    async def drop(self) -> None:
        for name in self.names:
            await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def databases() -> AsyncIterator[Databases]:
    dbs = Databases()
    try:
        yield dbs
    finally:
        await dbs.drop()


# ---------------------------------------------------------------- post load, in processes


async def load_process(targets: list[tuple[int, str]], start: float, stop: float) -> None:
    """`load` mode: each (port, path) a keep-alive connection posting as fast as answers
    come, from wall time `start` to `stop`; prints the posts answered 200 and the others."""
    count = errors = 0
    conns = [await Conn.open(port) for port, _ in targets]
    await asyncio.sleep(max(0.0, start - time.time()))

    async def one(c: Conn, path: str) -> None:
        nonlocal count, errors
        i = 0
        while time.time() < stop:
            i += 1
            try:
                status, _ = await c.request("POST", path,
                                            b'{"progress": %.3f}' % min(100.0, i / 1000))
            except (OSError, asyncio.IncompleteReadError):
                errors += 1
                break
            if time.time() > stop:
                break
            if status == 200:
                count += 1
            else:
                errors += 1
        c.close()

    await asyncio.gather(*(one(c, path) for c, (_, path) in zip(conns, targets, strict=True)))
    print(json.dumps({"count": count, "errors": errors}))


async def start_load(targets: list[tuple[int, str]], seconds: float
                     ) -> tuple[list[asyncio.subprocess.Process], float]:
    """The post load over `targets` (split over LOADERS processes), from 1.5 s from now
    (every process started and connected) for `seconds`; the processes and the start."""
    start = time.time() + 1.5
    procs = []
    for k in range(LOADERS):
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.bench_scale", "load", "--start", str(start),
            "--stop", str(start + seconds),
            *(f"{port}:{path}" for port, path in targets[k::LOADERS]),
            stdout=asyncio.subprocess.PIPE))
    return procs, start


async def load_result(procs: list[asyncio.subprocess.Process]) -> tuple[int, int]:
    """Posts answered 200 and the others, once the load processes end."""
    outs = [json.loads((await p.communicate())[0]) for p in procs]
    return sum(o["count"] for o in outs), sum(o["errors"] for o in outs)


async def post_load(targets: list[tuple[int, str]], seconds: float) -> tuple[float, int]:
    """Posts/s over `targets`, and the errors."""
    procs, _ = await start_load(targets, seconds)
    count, errors = await load_result(procs)
    return count / seconds, errors


def spread(ports: list[int], jobs: list[str]) -> list[tuple[int, str]]:
    """Each job's posts through one instance, the instances taking turns."""
    return [(ports[i % len(ports)], f"/api/jobs/{j}/progress") for i, j in enumerate(jobs)]


# ---------------------------------------------------------------- figures


async def posts(dbs: Databases, tmp: str, secs: float, rounds: int) -> dict[str, float]:
    dsn = await dbs.new()
    lite = service(f"{tmp}/posts.db")
    pa, pb = service(dsn), service(dsn)
    lite_jobs = await create_jobs(lite.port, WORKERS)
    pg_jobs = await create_jobs(pa.port, WORKERS)
    rates: dict[str, list[float]] = {"sqlite": [], "pg1": [], "pg2": []}
    try:
        for _ in range(rounds):  # alternated, to share the machine's noise
            for name, targets in (("sqlite", spread([lite.port], lite_jobs)),
                                  ("pg1", spread([pa.port], pg_jobs)),
                                  ("pg2", spread([pa.port, pb.port], pg_jobs))):
                rate, errors = await post_load(targets, secs)
                assert errors == 0, (name, errors)
                rates[name].append(rate)
    finally:
        for p in (lite, pa, pb):
            p.stop()
    return {k: statistics.median(v) for k, v in rates.items()}


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * q))] * 1000


async def delivery(dbs: Databases, secs: float) -> dict[str, list[float]]:
    """100 subscribers, half on A, half on B; posts through A at 50/s."""
    dsn = await dbs.new()
    a, b = service(dsn), service(dsn)
    try:
        [job] = await create_jobs(a.port, 1)
        subs = {"A (local)": await open_subscribers(a.port, "/api/events", 50),
                "B (cross-instance)": await open_subscribers(b.port, "/api/events", 50)}
        await asyncio.sleep(0.5)
        c = await Conn.open(a.port)
        sent = {json.loads(body)["event_id"]: t
                for body, t in await paced_posts(c, f"/api/jobs/{job}/progress", 50, secs)}
        last = max(sent)
        everyone: list[Subscriber] = [s for group in subs.values() for s in group]
        async with asyncio.timeout(30):
            while not all(last in s.arrivals for s in everyone):
                await asyncio.sleep(0.01)
        out = {name: [s.arrivals[i] - t for s in group for i, t in sent.items()]
               for name, group in subs.items()}
        for s in everyone:
            s.close()
        c.close()
        return out
    finally:
        a.stop()
        b.stop()


async def cancel_across(dbs: Databases, rounds: int, busy: bool) -> list[float]:
    """The worker long-polls B, the viewer cancels through A; with `busy`, 64 workers
    post through both meanwhile."""
    dsn = await dbs.new()
    a, b = service(dsn), service(dsn)
    try:
        ids = await create_jobs(a.port, rounds)
        load: list[asyncio.subprocess.Process] = []
        if busy:
            others = await create_jobs(a.port, WORKERS)
            load, start = await start_load(spread([a.port, b.port], others), rounds * 0.5 + 20)
            await asyncio.sleep(max(0.0, start - time.time()) + 0.5)  # the load is on
        worker, viewer = await Conn.open(b.port), await Conn.open(a.port)
        out = []
        for job in ids:
            await worker.request("POST", f"/api/jobs/{job}/progress", b'{"progress": 1}')
            poll = asyncio.create_task(worker.request("GET", f"/api/jobs/{job}/control?wait=10"))
            await asyncio.sleep(0.05)  # the poll is parked on B
            t = time.monotonic()
            await viewer.request("POST", f"/api/jobs/{job}/cancel", b"{}")
            _, body = await poll
            out.append(time.monotonic() - t)
            assert json.loads(body)["control"]["cancel_requested"], body
        worker.close()
        viewer.close()
        for p in load:
            p.terminate()
            await p.wait()
        return out
    finally:
        a.stop()
        b.stop()


async def fill_store(db: str, events: int) -> float:
    """`events` genuine events through the store's write path (Store.submit, thousands
    at a time: group commits), in this process; posts/s."""
    from progress_sse import worker_rules
    from progress_sse.auth import ANONYMOUS_USER
    from progress_sse.settings import Settings
    from progress_sse.store import Write
    from progress_sse.store.factory import open_store, prepare

    settings = Settings(db=db)
    await asyncio.to_thread(lambda: prepare(db).release())
    store = open_store(settings, on_commit=lambda s, n: None)
    await store.start(lambda evs: None)
    t0 = time.monotonic()
    try:
        ids = [f"j_fill{i:02d}" for i in range(32)]
        for job_id in ids:
            spec = worker_rules.NewJob(id=job_id, owner=ANONYMOUS_USER.subject, kind="bench",
                               title=job_id, queue="default", stages=(), total=None, meta={},
                               heartbeat_timeout_s=3600, token_hash="-")
            await store.submit(Write(job_id, lambda j, now, s=spec: worker_rules.create_job(s, now),
                                     create=True))
        per = (events - len(ids)) // len(ids) + 1

        async def progress(job_id: str, i: int) -> None:
            upd = worker_rules.ProgressUpdate(progress=i * 100 / per)
            await store.submit(Write(
                job_id, lambda j, now: worker_rules.record_progress(j, upd, now)))

        for i in range(per):
            await asyncio.gather(*(progress(j, i) for j in ids))
    finally:
        await store.close()
    return events / (time.monotonic() - t0)


async def replay_rate(db: str, behind: int) -> tuple[float, float]:
    """(replay events/s, fill posts/s) for a client `behind` events behind on `db`."""
    fill_rate = await fill_store(db, behind)
    proc = service(db)
    try:
        return await replay(proc, behind), fill_rate
    finally:
        proc.stop()


# ---------------------------------------------------------------- the run


def ms(values: list[float]) -> str:
    return f"p50 {percentile(values, 0.5):6.1f} ms  p99 {percentile(values, 0.99):6.1f} ms"


async def main(quick: bool, only: str | None) -> None:
    from progress_sse.logs import configure_logging

    configure_logging("console", "warning")  # the stores this process opens to fill
    secs = 3.0 if quick else 6.0
    tmp = tempfile.mkdtemp(prefix="progress-sse-bench-scale-")
    print(f"progress-sse bench-scale  (python {sys.version.split()[0]}, {os.cpu_count()} cores;"
          f" PostgreSQL at {ADMIN.rsplit('@', 1)[-1].rsplit('/', 1)[0]})\n")
    async with databases() as dbs:
        if only in (None, "posts"):
            r = await posts(dbs, tmp, secs, 2 if quick else 3)
            print(f"1. durable progress posts/s, {WORKERS} concurrent workers in {LOADERS} "
                  "client processes (median of rounds)")
            print(f"   SQLite, one instance          {r['sqlite']:7.0f}/s")
            print(f"   PostgreSQL, one instance      {r['pg1']:7.0f}/s   ratio "
                  f"{r['pg1'] / r['sqlite']:.2f}  (goal >= 0.50)")
            print(f"   PostgreSQL, two instances     {r['pg2']:7.0f}/s   ratio "
                  f"{r['pg2'] / r['sqlite']:.2f}; two/one {r['pg2'] / r['pg1']:.2f}\n")
        if only in (None, "delivery"):
            d = await delivery(dbs, secs)
            print("2. delivery at 50 events/s to 100 subscribers, 50 on each instance, posts"
                  " through A")
            for name, lat in d.items():
                print(f"   {name:20s} {ms(lat)}  ({len(lat)} deliveries)"
                      + ("  (goal p99 <= 50 ms)" if "cross" in name else ""))
            print()
        if only in (None, "cancel"):
            print("3. cancel posted on A -> long-poll on B woken")
            rounds = 30 if quick else 100
            for busy in (False, True):
                w = await cancel_across(dbs, rounds, busy)
                label = f"with {WORKERS} workers posting" if busy else "idle"
                print(f"   {label:28s} {ms(w)}  max {max(w) * 1000:6.1f} ms"
                      "  (goal p50 <= 50 ms)")
            print()
        if only in (None, "replay"):
            behind = 20_000 if quick else 100_000
            pg_rate, pg_fill = await replay_rate(await dbs.new(), behind)
            lite_rate, lite_fill = await replay_rate(f"{tmp}/replay.db", behind)
            print(f"4. resume replay, {behind:,} events behind")
            print(f"   SQLite       {lite_rate:9,.0f} events/s   [filled at {lite_fill:,.0f}"
                  " writes/s through Store.submit]")
            print(f"   PostgreSQL   {pg_rate:9,.0f} events/s   ratio {pg_rate / lite_rate:.2f}"
                  f"  (goal >= 50k/s)   [filled at {pg_fill:,.0f} writes/s]")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode")
    run = sub.add_parser("run", help="the benchmark (the default)")
    run.add_argument("--quick", action="store_true")
    run.add_argument("--only", choices=["posts", "delivery", "cancel", "replay"])
    load = sub.add_parser("load", help="a post-load process (used by the benchmark)")
    load.add_argument("--start", type=float, required=True)
    load.add_argument("--stop", type=float, required=True)
    load.add_argument("targets", nargs="+", help="PORT:PATH")
    args = parser.parse_args(sys.argv[1:] if sys.argv[1:2] in (["run"], ["load"])
                             else ["run", *sys.argv[1:]])
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.mode == "load":
        asyncio.run(load_process([(int(t.split(":", 1)[0]), t.split(":", 1)[1])
                                  for t in args.targets], args.start, args.stop))
    else:
        asyncio.run(main(args.quick, args.only))

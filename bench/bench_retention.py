"""`make bench` (after bench_service.py): retention's cost and its space, on SQLite.

  1. posts/s while the service prunes 1M old events, against posts/s on the same
     database without pruning, measured in the same run (goal >= 0.8x): two copies of
     one file of 1M events marked 40 days old, one served with the default 30-day
     retention (it prunes them as it starts), one with retention off;
  2. a soak: steady posts (jobs created, posted to, finished) with a short retention,
     the SQLite file and its WAL printed over time: their size levels off once
     retention deletes as fast as posts add.

`python -m bench.bench_retention --only ratio|soak [--soak-s 150]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_service import Conn, Proc, create_jobs, post_load, service
from progress_sse.logs import configure_logging
from progress_sse.migrations import migrate_sqlite

OLD_EVENTS = 1_000_000
OLD_JOBS = 1_000
WORKERS = 64
DAY_S = 86400.0


def old_database(path: str, events: int) -> None:
    """A file holding `events` events of finished jobs, all written 40 days ago."""
    migrate_sqlite(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    old = time.time() - 40 * DAY_S
    per_job = events // OLD_JOBS
    body = json.dumps({"type": "progress", "job": {"progress": 50, "message": "m" * 120}})
    conn.execute("BEGIN")
    for j in range(OLD_JOBS):
        job_id = f"old-{j}"
        doc = json.dumps({"job": {"id": job_id}, "private": {}})
        conn.execute("INSERT INTO jobs (id, owner, kind, queue, status, created_at,"
                     " updated_at, finished_at, last_post_at, heartbeat_timeout_s, stalled,"
                     " token_hash, doc) VALUES (?, '', 'old', '', 'succeeded', ?, ?, ?, ?,"
                     " 60, 0, '', ?)", (job_id, old, old, old, old, doc))
        first = j * per_job + 1
        conn.executemany("INSERT INTO events VALUES (?, ?, '', 'old', 'progress', 1, NULL, ?)",
                         ((i, job_id, body) for i in range(first, first + per_job)))
    conn.execute("DELETE FROM retention_marks")
    conn.execute("INSERT INTO retention_marks VALUES (?, ?)", (events, old))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def pruned(proc: Proc) -> int:
    """Events pruned so far, from /metrics."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{proc.port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("progress_sse_events_pruned_total "):
            return int(float(line.split()[1]))
    raise RuntimeError("no progress_sse_events_pruned_total in /metrics")


async def ratio(tmp: str, secs: float, rounds: int) -> None:
    print(f"1. posts/s while pruning {OLD_EVENTS:,} old events, {WORKERS} workers")
    started = time.monotonic()
    template = f"{tmp}/old.db"
    old_database(template, OLD_EVENTS)
    print(f"   (a file of {OLD_EVENTS:,} events 40 days old: "
          f"{sizes_mib(template)[0]:.0f} MiB, made in "
          f"{time.monotonic() - started:.0f} s)")
    rates: dict[str, list[float]] = {"keep": [], "prune": []}
    for r in range(rounds):
        # both copies made, and on disk, before either is measured: the write-back of a
        # fresh copy would compete with the service's commits
        for kind in ("keep", "prune"):
            shutil.copyfile(template, f"{tmp}/{kind}{r}.db")
        os.sync()
        # in turns, first one then the other, to share the machine's noise
        for kind in (("keep", "prune") if r % 2 == 0 else ("prune", "keep")):
            db = f"{tmp}/{kind}{r}.db"
            extra = ["--retention-days", "0"] if kind == "keep" else []
            proc = service(db, *extra)
            jobs = await create_jobs(proc.port, WORKERS)
            before = pruned(proc)
            rate, errors = await post_load(
                proc.port, [f"/api/jobs/{j}/progress" for j in jobs], secs)
            during = pruned(proc) - before
            proc.stop()
            assert errors == 0, errors
            rates[kind].append(rate)
            if kind == "prune":
                assert during > 0, "nothing was pruned during the measurement"
                pruned_in, left = during, old_left(db)
            os.remove(db)
        keep, prune = rates["keep"][-1], rates["prune"][-1]
        print(f"   round {r + 1}: without pruning {keep:6.0f}/s, pruning {prune:6.0f}/s"
              f" ({prune / keep:.2f}x); {pruned_in:,} events pruned in the {secs:.0f} s,"
              f" {left:,} old ones still left at its end")
    keep, prune = statistics.median(rates["keep"]), statistics.median(rates["prune"])
    print(f"   median: without pruning {keep:7.0f} posts/s, while pruning {prune:7.0f}"
          f" posts/s: ratio {prune / keep:.2f}  (goal >= 0.80)")
    print()


def sizes_mib(db: str) -> tuple[float, float]:
    """The SQLite file's size and its WAL's."""
    wal = Path(db + "-wal")
    return (os.path.getsize(db) / 2**20,
            wal.stat().st_size / 2**20 if wal.exists() else 0.0)


def old_left(db: str) -> int:
    """Old events still in the file."""
    conn = sqlite3.connect(db)
    try:
        (n,) = conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'old'").fetchone()
    finally:
        conn.close()
    return int(n)


async def steady_posts(port: int, rate: float, stop: float, workers: int = 8) -> int:
    """Jobs created, posted to 50 times and finished, by `workers`, `rate` posts/s in all."""
    done = 0

    async def worker(k: int) -> None:
        nonlocal done
        c = await Conn.open(port)
        t0 = time.monotonic()
        n = 0
        while time.monotonic() < stop:
            status, body = await c.request("POST", "/api/jobs",
                                           json.dumps({"kind": "soak", "title": "s"}).encode())
            assert status == 201, body
            job = json.loads(body)["job"]["id"]
            for i in range(50):
                status, _ = await c.request(
                    "POST", f"/api/jobs/{job}/progress",
                    b'{"progress": %d, "message": "step %d of 50"}' % (i * 2, i))
                n += 1
                await asyncio.sleep(max(0.0, t0 + n * workers / rate - time.monotonic()))
            await c.request("POST", f"/api/jobs/{job}/finish", b'{"status": "succeeded"}')
            done += 52
        c.close()

    await asyncio.gather(*(worker(k) for k in range(workers)))
    return done


async def soak(tmp: str, seconds: float, rate: float, keep_s: float) -> None:
    print(f"2. soak: {rate:.0f} posts/s for {seconds:.0f} s, retention {keep_s:.0f} s"
          " (file and WAL sizes in MiB)")
    db = f"{tmp}/soak.db"
    proc = service(db, "--retention-days", repr(keep_s / DAY_S), "--retention-every", "2")
    stop = time.monotonic() + seconds
    posting = asyncio.create_task(steady_posts(proc.port, rate, stop))
    sizes: list[tuple[float, float, float]] = []
    t0 = time.monotonic()
    while not posting.done():
        await asyncio.sleep(min(10.0, max(0.1, stop - time.monotonic())))
        size, wsize = sizes_mib(db)
        sizes.append((time.monotonic() - t0, size, wsize))
        print(f"   {sizes[-1][0]:5.0f} s  file {size:7.1f}  wal {wsize:6.1f}  "
              f"total {size + wsize:7.1f}")
    posts = await posting
    proc.stop()
    late = [s + w for t, s, w in sizes if t >= keep_s * 2]
    if len(late) >= 2:
        print(f"   {posts:,} writes; after {keep_s * 2:.0f} s the total stays within "
              f"{min(late):.1f}-{max(late):.1f} MiB (growth over that span "
              f"{late[-1] - late[0]:+.1f} MiB)\n")


async def main(only: str | None, secs: float, rounds: int, soak_s: float) -> None:
    configure_logging("console", "warning")
    tmp = tempfile.mkdtemp(prefix="progress-sse-bench-retention-")
    print(f"progress-sse retention bench  (python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores)\n")
    try:
        if only in (None, "ratio"):
            await ratio(tmp, secs, rounds)
        if only in (None, "soak"):
            await soak(tmp, soak_s, rate=400.0, keep_s=30.0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["ratio", "soak"])
    parser.add_argument("--seconds", type=float, default=8.0, help="each posts measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--soak-s", type=float, default=150.0)
    args = parser.parse_args()
    asyncio.run(main(args.only, args.seconds, args.rounds, args.soak_s))

"""What a bare SQLite commit costs at a pace: one event row and one job row, the
service's own statements and settings, in a process of its own, nothing else.

`make bench` prints it beside the durable post at the same pace: at 50 commits/s most
of a commit's CPU is cold caches, which no batching can share.

Run: python -m bench.commit_floor RATE SECONDS  (prints microseconds of CPU per commit)
"""

from __future__ import annotations

import sys
import tempfile
import time

from progress_sse.migrations import migrate_sqlite
from progress_sse.store.writer import _commit, _open

DOC = '{"job":{"pad":"' + "x" * 700 + '"},"private":{}}'  # about a job row's size


def main(rate: float, seconds: float) -> float:
    with tempfile.TemporaryDirectory(prefix="progress-sse-commit-") as tmp:
        return _paced_commits(f"{tmp}/c.db", rate, seconds)


def _paced_commits(path: str, rate: float, seconds: float) -> float:
    migrate_sqlite(path)
    conn = _open(path, "NORMAL")
    conn.execute("INSERT INTO jobs VALUES ('j', 'o', 'k', 'q', 'running', 0, 0, NULL, NULL,"
                 " 60, 0, 't', ?)", (DOC,))
    n = int(rate * seconds)
    cpu0, t0 = time.process_time(), time.monotonic()
    for i in range(1, n + 1):
        _commit(conn, [(i, "j", "o", "k", "progress", 1, None, DOC)], [],
                [(float(i), float(i), 0, "t", DOC, "j")], [])
        time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    cpu = time.process_time() - cpu0
    conn.close()
    return cpu / n * 1e6


if __name__ == "__main__":
    print(f"{main(float(sys.argv[1]), float(sys.argv[2])):.1f}")

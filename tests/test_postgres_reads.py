"""PostgreSQL's log reads, paged as a lagging stream pages them (streams.py): bounded in
rows and bytes per read, and together exactly the stored log, whatever the filter."""

from __future__ import annotations

from progress_sse import worker_rules
from progress_sse.store import Event, Filter, Write
from progress_sse.store.postgres import PostgresStore
from progress_sse.store.postgres_schema import migrate

from .pg import module_fixture, query

module_database = module_fixture()


async def fill(store: PostgresStore, owners: dict[str, str], posts: int) -> None:
    for job_id, owner in owners.items():
        spec = worker_rules.NewJob(id=job_id, owner=owner, kind="reads", title=job_id,
                           queue="default", stages=(), total=None, meta={},
                           heartbeat_timeout_s=3600, token_hash="-")
        await store.submit(Write(job_id, lambda j, now, s=spec: worker_rules.create_job(s, now),
                                 create=True))
    for i in range(posts):
        for job_id in owners:
            # bodies of varied length: the byte bound cuts pages at varied places
            line = worker_rules.LogLine(level="info", message="m" * (i * 37 % 900), seq=None,
                                attempt=None)
            await store.submit(Write(
                job_id, lambda j, now, ln=line: worker_rules.record_log(j, ln, now)))


async def replay(store: PostgresStore, flt: Filter, head: int, limit: int, max_bytes: int
                 ) -> list[Event]:
    out: list[Event] = []
    cursor = 0
    while cursor < head:
        page = await store.events_after(cursor, head, flt, limit, max_bytes)
        assert page.upto > cursor, "no progress"
        assert len(page.events) <= limit
        sizes = [len(e.body) for e in page.events]
        assert not max_bytes or sum(sizes[:-1]) < max_bytes, "read past the byte bound"
        assert all(cursor < e.id <= page.upto for e in page.events)
        out += page.events
        cursor = page.upto
    return out


async def test_paged_reads_are_the_log_whatever_the_filter(pg_dsn: str) -> None:
    await migrate(pg_dsn)
    store = PostgresStore(pg_dsn)
    await store.start(lambda events: None)
    try:
        owners = {"j_a": "alice", "j_b": "bob", "j_c": "alice", "j_rare": "carol"}
        await fill(store, {k: v for k, v in owners.items() if k != "j_rare"}, 400)
        await fill(store, {"j_rare": "carol"}, 3)  # a few events after many others
        _, head = await store.bounds()
        for flt, where in ((Filter(owner="alice"), "owner = 'alice'"),
                           (Filter(owner="carol", job_ids=frozenset({"j_rare"})),
                            "job_id = 'j_rare'"),
                           (Filter(), "true")):
            stored = [r[0] for r in await query(
                pg_dsn, f"SELECT id FROM events WHERE {where} ORDER BY id")]
            for limit, max_bytes in ((50, 4096), (1000, 256 << 10), (7, 0)):
                got = await replay(store, flt, head, limit, max_bytes)
                assert [e.id for e in got] == stored, (flt, limit, max_bytes)
    finally:
        await store.close()

"""Progress rules (pure, property-tested) and estimates end to end over HTTP."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from hypothesis import given, settings
from hypothesis import strategies as st

from progress_sse import jobs, worker_rules
from progress_sse.errors import InvalidInput
from progress_sse.settings import Settings

from .helpers import create_job, start_service

STORES = ("sqlite", "postgres")  # every test asking for `db` runs on both (conftest.py)
STAGES = (jobs.Stage("validate", "Validate", 5), jobs.Stage("metadata", "Metadata", 10),
          jobs.Stage("transcript", "Transcript", 20), jobs.Stage("analysis", "Analysis", 15),
          jobs.Stage("summary", "Summary", 40), jobs.Stage("quality", "Quality", 10))


def new_job(stages: tuple[jobs.Stage, ...] = STAGES) -> jobs.Job:
    spec = worker_rules.NewJob("j", "o", "k", "t", "q", stages, None, {}, 60, "h")
    return worker_rules.create_job(spec, 0.0)[0]


def test_stage_weights_make_the_overall_percentage() -> None:
    """Overall = finished stages' weight + the current stage's fraction of its own weight."""
    assert worker_rules.overall_progress(STAGES, "validate", 0.0) == 0
    assert worker_rules.overall_progress(STAGES, "transcript", 0.5) == 5 + 10 + 10
    assert worker_rules.overall_progress(STAGES, "summary", 0.25) == 50 + 10
    assert worker_rules.overall_progress(STAGES, "quality", 1.0) == 100
    with pytest.raises(InvalidInput):
        worker_rules.overall_progress(STAGES, "nope", 0.5)


def test_finish_succeeded_sets_100() -> None:
    """Succeeding sets 100% whatever the worker last said."""
    job, _ = worker_rules.record_progress(
        new_job(), worker_rules.ProgressUpdate(stage="metadata"), 1.0)
    job, drafts = worker_rules.finish(job, worker_rules.Finish(status="succeeded"), 2.0)
    assert (job.progress, drafts[-1].type) == (100.0, "finished")


updates = st.builds(
    worker_rules.ProgressUpdate,
    progress=st.none() | st.floats(0, 100),
    current=st.none() | st.floats(0, 50),
    total=st.none() | st.floats(50, 100),
    stage=st.none() | st.sampled_from([s.key for s in STAGES]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(updates, max_size=40), st.booleans())
def test_percentage_stays_in_range_and_never_decreases(
        seq: list[worker_rules.ProgressUpdate], staged: bool) -> None:
    """For any sequence of posts the percentage is in [0, 100] and never goes down."""
    job = new_job(STAGES if staged else ())
    last = 0.0
    for i, upd in enumerate(seq):
        if staged and upd.stage is None and job.stage is None:
            upd = worker_rules.ProgressUpdate(progress=upd.progress, current=upd.current,
                                      total=upd.total, stage="validate")
        job, drafts = worker_rules.record_progress(job, upd, float(i))
        assert 0.0 <= job.progress <= 100.0
        assert job.progress >= last
        if drafts[-1].fields["held"]:
            assert job.progress == last  # a held value leaves the percentage where it was
        last = job.progress


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(len(STAGES))), st.floats(0, 100)),
                min_size=1, max_size=30))
def test_eta_is_never_negative(posts: list[tuple[int, float]]) -> None:
    """Whatever is posted, the estimate is unknown or a non-negative number of seconds."""
    job = new_job()
    for i, (stage, pct) in enumerate(posts):
        upd = worker_rules.ProgressUpdate(progress=pct, stage=STAGES[stage].key)
        job, _ = worker_rules.record_progress(job, upd, float(i))
        job = worker_rules.with_estimate(job, float(i) + 0.5, [])
        assert job.eta_s is None or job.eta_s >= 0


async def test_staged_job_over_http_gets_percentages_and_an_eta(settings: Settings) -> None:
    """A stage-weighted job shows the weighted percentage and an ETA once a rate is known."""
    svc = await start_service(settings.model_copy(update={"estimate_every_s": 0}))
    try:
        async with httpx.AsyncClient(base_url=svc.url) as client:
            final = await _drive_staged_job(client)
    finally:
        await svc.stop()
    assert final["eta_s"] > 0


async def _drive_staged_job(client: httpx.AsyncClient) -> dict[str, Any]:
    job = await create_job(client, kind="video", stages=[
        {"key": s.key, "label": s.label, "weight": s.weight} for s in STAGES])
    url = f"/api/jobs/{job['id']}/progress"
    r = await client.post(url, json={"stage": "validate", "progress": 0})
    assert r.json()["job"]["eta_s"] is None  # nothing to go on yet
    seen = []
    for i, pct in enumerate((20, 40, 60, 80, 100)):
        await asyncio.sleep(0.02)
        r = await client.post(url, json={"stage": "validate", "progress": pct,
                                         "message": f"step {i}"})
        seen.append(r.json()["job"]["progress"])
    assert seen == [1.0, 2.0, 3.0, 4.0, 5.0]
    r = await client.post(url, json={"stage": "transcript", "current": 3, "total": 12})
    body = r.json()["job"]
    assert body["progress"] == 15 + 20 * 0.25
    assert body["eta_s"] is not None and body["eta_s"] > 0
    assert body["finish_estimate"] > body["updated_at"]
    assert body["elapsed_s"] > 0
    return body  # type: ignore[no-any-return]


async def test_queued_job_position_moves_when_a_job_ahead_starts(
        client: httpx.AsyncClient) -> None:
    """Queued jobs know their place in their queue and viewers hear when it moves."""
    first = await create_job(client, queue="render")
    second = await create_job(client, queue="render")
    other = await create_job(client, queue="mail")
    assert (first["queue_position"], second["queue_position"]) == (1, 2)
    assert other["queue_position"] == 1
    async with aconnect_sse(client, "GET", f"/api/jobs/{second['id']}/events",
                            headers={"Accept": "text/event-stream"}) as src:
        events = src.aiter_sse()
        snap = await anext(events)
        assert json.loads(snap.data)["jobs"][0]["queue_position"] == 2
        await client.post(f"/api/jobs/{first['id']}/progress", json={"progress": 1})
        async with asyncio.timeout(5):
            moved = await anext(events)
    data = json.loads(moved.data)
    assert (moved.event, data["queue_position"], data["job"]["queue_position"]) == (
        "status", 1, 1)
    r = await client.get(f"/api/jobs/{other['id']}")
    assert r.json()["job"]["queue_position"] == 1  # another queue did not move
    started = (await client.get(f"/api/jobs/{first['id']}")).json()["job"]
    assert started["queue_position"] is None


def test_far_back_places_are_announced_when_halved() -> None:
    """Moving from place 40 announces at 20 and 10, then every place from 5."""
    job = new_job().evolve(status="queued")
    job, _ = worker_rules.with_queue_position(job, 40, None, 0.0)
    announced = []
    for place in range(39, 0, -1):
        job, drafts = worker_rules.with_queue_position(job, place, None, 0.0)
        assert job.queue_position == place
        if drafts:
            announced.append(drafts[0].fields["queue_position"])
    assert announced == [20, 10, 5, 4, 3, 2, 1]

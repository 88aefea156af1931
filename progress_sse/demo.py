"""`progress-sse demo`: simulated workers running realistic jobs through the async SDK.

Each worker picks a scenario (a video to transcode, a PDF to OCR, an export, an
import), walks its stages with jittered step times, logs now and then, fails with a
plausible error at the configured rate, and calls `checkpoint()` between steps, so
cancel and pause from the dashboard work on demo jobs exactly as on real ones.
`--speed` divides every duration (tests run the same code quickly).

The workers live through a restart of the service: the SDK keeps their posts while
it is away and flushes them when it is back, so a job under way carries on and ends
as it would have. A job that cannot be started (or finished) meanwhile is reported
in one line, and the worker tries again after a pause instead of ending the demo.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from .client import AsyncJob, AsyncProgressClient, ProgressClientError


@dataclass(frozen=True)
class Step:
    key: str
    label: str
    weight: float
    steps: int
    step_s: float  # mean seconds per step at speed 1
    note: str  # the progress message; {i} and {n} are the step and the step count


@dataclass(frozen=True)
class Scenario:
    kind: str
    title: str  # {n} becomes a number
    stages: tuple[Step, ...]
    logs: tuple[str, ...]
    failures: tuple[str, ...]


SCENARIOS = (
    Scenario("video", "intro-{n}.mp4", (
        Step("download", "Download", 1, 8, 0.5, "{i}/{n} MB chunks"),
        Step("transcode", "Transcode", 6, 24, 0.8, "segment {i}/{n} at 1080p"),
        Step("thumbnails", "Thumbnails", 1, 6, 0.4, "thumbnail {i}/{n}"),
        Step("upload", "Upload", 2, 10, 0.5, "part {i}/{n} uploaded"),
    ), ("encoder running at 2.3x realtime", "audio track normalised to -16 LUFS",
        "keyframe interval set to 2s"),
        ("ffmpeg exited with status 1: invalid data found when processing input",
         "upload failed: 403 Forbidden from storage")),
    Scenario("pdf", "invoice-batch-{n}.pdf", (
        Step("fetch", "Fetch", 1, 4, 0.5, "downloading ({i}/{n})"),
        Step("ocr", "OCR pages", 5, 30, 0.5, "page {i} of {n}"),
        Step("index", "Index", 2, 8, 0.4, "indexed {i}/{n} sections"),
    ), ("page 12 rotated 90 degrees before OCR", "low confidence on page 7 (0.61)"),
        ("OCR engine timed out on page 17", "PDF is encrypted; no password given")),
    Scenario("export", "orders-2024-{n}.csv", (
        Step("query", "Query", 2, 5, 0.8, "scanning partition {i}/{n}"),
        Step("render", "Write rows", 5, 20, 0.6, "{i}0 000 rows written"),
        Step("compress", "Compress", 1, 5, 0.4, "gzip block {i}/{n}"),
    ), ("using read replica db-2", "query plan uses index orders_created_at_idx"),
        ("canceling statement due to statement timeout", "disk quota exceeded on /exports")),
    Scenario("import", "contacts-{n}.xlsx", (
        Step("parse", "Parse", 2, 10, 0.4, "sheet rows {i}00/{n}00"),
        Step("validate", "Validate", 3, 15, 0.4, "validated batch {i}/{n}"),
        Step("write", "Write", 4, 20, 0.5, "upserted batch {i}/{n}"),
    ), ("skipped 3 duplicate e-mail addresses", "mapped column 'Tel.' to phone"),
        ("row 4182: invalid date '31/02/2024'", "unique constraint violated: contacts_email_key")),
)


RETRY_S = 2.0  # a worker's pause after the service refused or could not be reached


class SimulatedFailure(Exception):
    """The error a demo job fails with on purpose."""


@dataclass(frozen=True)
class DemoOptions:
    url: str | None
    token: str | None
    jobs: int = 4
    once: bool = False
    speed: float = 1.0
    fail_rate: float = 0.15
    seed: int | None = None


class Demo:
    """A few concurrent workers, each running one job after another (or one, with `once`)."""

    def __init__(self, opts: DemoOptions, pc: AsyncProgressClient, out: TextIO) -> None:
        self.opts = opts
        self.pc = pc
        self.out = out

    def say(self, text: str) -> None:
        self.out.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.out.flush()

    async def run(self) -> None:
        base = self.opts.seed if self.opts.seed is not None else random.randrange(2**32)
        async with asyncio.TaskGroup() as group:
            for n in range(self.opts.jobs):
                group.create_task(self.worker(random.Random(base + n)))

    async def worker(self, rng: random.Random) -> None:
        while True:
            try:
                await self.run_job(rng.choice(SCENARIOS), rng)
            except ProgressClientError as exc:
                self.say(f"worker: {exc}; trying again in {RETRY_S:g}s")
                await asyncio.sleep(RETRY_S)
                continue
            if self.opts.once:
                return
            await asyncio.sleep(rng.uniform(0.5, 3.0) / self.opts.speed)

    async def run_job(self, sc: Scenario, rng: random.Random) -> None:
        steps = [(si, i) for si, st in enumerate(sc.stages) for i in range(1, st.steps + 1)]
        fail_at = rng.choice(steps) if rng.random() < self.opts.fail_rate else None
        title = sc.title.format(n=rng.randint(1, 999))
        stages = [{"key": st.key, "label": st.label, "weight": st.weight} for st in sc.stages]
        started = time.monotonic()
        job = self.pc.job(kind=sc.kind, title=title, stages=stages, meta={"demo": True})
        try:
            async with job:
                self.say(f"{job.id} started    {sc.kind:<6} {title}")
                await self.walk(job, sc, rng, fail_at)
                job.result = {"output": f"s3://demo/{sc.kind}/{title}"}
        except SimulatedFailure:
            pass
        note = f": {job.state.get('error')}" if job.status == "failed" else ""
        self.say(f"{job.id} {job.status:<10} {sc.kind:<6} {title} "
                 f"after {time.monotonic() - started:.1f}s{note}")

    async def walk(self, job: AsyncJob, sc: Scenario, rng: random.Random,
                   fail_at: tuple[int, int] | None) -> None:
        for si, st in enumerate(sc.stages):
            await job.stage(st.key)
            for i in range(1, st.steps + 1):
                await job.checkpoint()
                await asyncio.sleep(st.step_s * rng.uniform(0.6, 1.4) / self.opts.speed)
                if fail_at == (si, i):
                    raise SimulatedFailure(rng.choice(sc.failures))
                await job.progress(current=i, total=st.steps,
                                   message=st.note.format(i=i, n=st.steps))
                if rng.random() < 0.06:
                    await job.log(rng.choice(sc.logs))


async def run_demo(opts: DemoOptions, out: TextIO = sys.stdout) -> int:
    """Run the demo; 0 when it ends (after one round with `once`), 5 on a service error."""
    async with AsyncProgressClient(opts.url, token=opts.token) as pc:
        try:
            await pc.request("GET", "/healthz")
        except ProgressClientError as exc:
            print(f"progress-sse demo: the service at {pc.url} does not answer ({exc}); "
                  "start it with `make run`", file=sys.stderr)
            return 5
        demo = Demo(opts, pc, out)
        demo.say(f"{opts.jobs} demo workers on {pc.url} - open {pc.url}/ to watch, "
                 "Ctrl-C to stop")
        try:
            await demo.run()
        except ExceptionGroup as group:
            errors = group.subgroup(ProgressClientError)
            if errors is None or errors is not group:
                raise
            for err in _leaves(errors):
                print(f"progress-sse demo: {err}", file=sys.stderr)
            return 5
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out

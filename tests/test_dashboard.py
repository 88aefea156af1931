"""The dashboard in real headless Chromium against a real server and SQLite file.

Skipped without the playwright package or Chromium, unless PROGRESS_SSE_REQUIRE_BROWSER=1
(CI), which makes that a failure. Screenshots go to test-output/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from progress_sse.settings import Settings

from .browser import OUTPUT, chromium, new_page, problems, require_browser
from .conftest import db_events
from .helpers import ProcessService, Service, create_job, free_port, stored_log, wait_for

require_browser()

from playwright.async_api import expect  # noqa: E402 - only once we know it is installed

pytestmark = pytest.mark.browser

STAGES = [{"key": "fetch", "label": "Fetch", "weight": 1},
          {"key": "encode", "label": "Encode", "weight": 3}]
CLOCK = re.compile(r"^(\d+:)?\d\d:\d\d$")
TIMEOUT = 8000  # ms, for every expectation on the page

expect.set_options(timeout=TIMEOUT)


@pytest.fixture
def settings(db_path: str) -> Settings:
    # quick stall detection, for the stalled card in the screenshot
    return Settings(db=db_path, keepalive_s=15.0, stall_check_s=0.2)


@pytest.fixture
async def browser(service: Service) -> AsyncIterator[Any]:
    """Chromium, closed before the service stops (so no stream is left open)."""
    async with chromium() as b:
        yield b


class Worker:
    """A worker driving one job over HTTP, as a real one would."""

    def __init__(self, client: httpx.AsyncClient, job_id: str) -> None:
        self.client = client
        self.id = job_id

    async def post(self, what: str, **fields: Any) -> dict[str, Any]:
        r = await self.client.post(f"/api/jobs/{self.id}/{what}", json=fields)
        assert r.status_code in (200, 202), r.text
        body: dict[str, Any] = r.json()
        return body

    async def progress(self, **fields: Any) -> dict[str, Any]:
        return await self.post("progress", **fields)

    async def log(self, message: str, level: str = "info") -> dict[str, Any]:
        return await self.post("log", message=message, level=level)

    async def finish(self, status: str, **fields: Any) -> dict[str, Any]:
        return await self.post("finish", status=status, **fields)


async def start_job(client: httpx.AsyncClient, **fields: Any) -> Worker:
    job = await create_job(client, **fields)
    return Worker(client, job["id"])


def card(page: Any, job_id: str) -> Any:
    return page.locator(f'article.job[data-job-id="{job_id}"]')


async def open_stream_count(client: httpx.AsyncClient) -> int:
    text = (await client.get("/metrics")).text
    found = re.search(r"^progress_sse_open_streams (\d+)$", text, re.M)
    assert found, text
    return int(found.group(1))


# ---------------------------------------------------------------- live updates


async def test_job_appears_and_updates_live(service: Service, client: httpx.AsyncClient,
                                            browser: Any) -> None:
    """A job driven over HTTP appears, and its bar, stages, items and times follow live."""
    page = await new_page(browser, service.url)
    await page.goto(service.url + "/")
    empty = page.locator("#empty")
    await expect(empty).to_be_visible()
    curl = f"curl -d kind=demo -d title=hello {service.url}/api/jobs"
    await expect(page.locator("#empty-create")).to_have_text(curl)
    # the line the empty state suggests works as written: a form-encoded create
    r = await client.post("/api/jobs", data={"kind": "demo", "title": "hello"})
    assert r.status_code == 201, r.text
    await expect(card(page, r.json()["job"]["id"])).to_be_visible()
    await expect(empty).to_be_hidden()

    w = await start_job(client, kind="video", title="intro.mp4", stages=STAGES,
                        meta={"unit": "chunk"})
    c = card(page, w.id)
    bar = c.get_by_role("progressbar")
    await expect(c.locator(".status-badge")).to_have_text("Queued")
    await expect(bar).to_have_attribute("aria-valuemin", "0")
    await expect(bar).to_have_attribute("aria-valuemax", "100")

    answer = await w.progress(stage="fetch", progress=50, message="fetching")
    await expect(c.locator(".status-badge")).to_have_text("Running")
    await expect(bar).to_have_attribute("aria-valuenow", "12.5")
    await expect(c.locator('.stage[aria-current="step"] .label')).to_have_text("Fetch")
    await expect(c.locator(".message")).to_have_text("fetching")
    await expect_remaining(c, answer["job"]["eta_s"])

    for i in range(1, 4):
        answer = await w.progress(stage="encode", current=i, total=12,
                                  message=f"encoding chunk {i}")
    await expect(bar).to_have_attribute("aria-valuenow", "43.8")  # 25 + 75 * 3/12
    await expect(c.locator(".f-percent dd")).to_have_text("43%")
    await expect(c.locator(".f-items dd")).to_have_text("chunk 3/12")
    await expect(c.locator('.stage[data-state="done"] .label')).to_have_text(["Fetch"])
    await expect(c.locator('.stage[aria-current="step"] .label')).to_have_text("Encode")
    await expect(c.locator(".f-elapsed dd")).to_have_text(CLOCK)
    await expect_remaining(c, answer["job"]["eta_s"])
    # the bar's width is animated, not jumped
    transition = await c.locator(".fill").evaluate("e => getComputedStyle(e).transitionProperty")
    assert "width" in transition

    # a lower percentage is held by the server; the bar stays where it was
    await w.progress(stage="encode", current=2, total=12, message="retrying chunk 2")
    await expect(c.locator(".message")).to_have_text("retrying chunk 2")
    await expect(bar).to_have_attribute("aria-valuenow", "43.8")

    await w.finish("succeeded", result={"url": "https://cdn.example/intro.mp4"})
    done = page.locator("#recent").locator(f'[data-job-id="{w.id}"]')
    await expect(done.locator(".status-badge")).to_have_text("Succeeded")
    await expect(done.locator('.stage[data-state="done"]')).to_have_count(2)
    await expect(bar).to_have_attribute("aria-valuenow", "100")
    await expect(done.locator(".f-remaining")).to_be_hidden()

    formats = await page.evaluate(
        "import('/format.js').then(m => [m.duration(65), m.duration(3725), m.duration(null)])")
    assert formats == ["01:05", "1:02:05", "—"]
    assert await problems(page) == []


async def expect_remaining(c: Any, eta_s: float | None) -> None:
    """Remaining time as a clock when the server has an estimate, else a dash for unknown."""
    dd = c.locator(".f-remaining dd")
    if eta_s is None:
        await expect(dd).to_have_attribute("data-unknown", "true")
        await expect(dd.locator('[aria-hidden="true"]')).to_have_text("—")
        await expect(dd).to_have_attribute("title", "unknown")
    else:
        await expect(dd).to_have_attribute("data-unknown", "false")
        await expect(dd).to_have_text(CLOCK)


# ---------------------------------------------------------------- restart


async def test_reconnects_after_restart_without_loss(tmp_path: Path) -> None:
    """Across a server restart the page reconnects, resumes, and has each event exactly once."""
    db = str(tmp_path / "restart.db")
    svc = ProcessService(db=db, port=free_port())
    await asyncio.to_thread(svc.start)
    try:
        async with chromium() as browser, httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            await create_job(client, kind="warmup", title="before the page opened")
            page = await new_page(browser, svc.url)
            await page.goto(svc.url + "/")
            conn = page.locator("#connection")
            await expect(conn).to_have_attribute("data-state", "live")
            w = await start_job(client, kind="video", title="restart.mp4", stages=STAGES)
            c = card(page, w.id)
            await c.locator(".act-details").click()
            for i in range(1, 6):
                await w.progress(stage="fetch", progress=i * 20)
                await w.log(f"fetched part {i}")
            await expect(c.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "25")

            svc.signal(signal.SIGTERM)
            # uvicorn re-raises the signal once it has shut down gracefully
            assert await asyncio.to_thread(svc.wait) in (0, -signal.SIGTERM)
            await expect(conn).to_have_attribute("data-state", "reconnecting")
            await expect(conn).to_contain_text("Reconnecting")
            await asyncio.to_thread(svc.start)

            for i in range(1, 5):
                await w.progress(stage="encode", progress=i * 25, message=f"encode {i}/4")
                await w.log(f"encoded part {i}", level="warning" if i == 2 else "info")
            await w.finish("succeeded")
            await expect(c).to_have_attribute("data-status", "succeeded")
            await expect(conn).to_have_attribute("data-state", "live")

            first_snapshot = (await page.evaluate("window.__progressSse.snapshotIds"))[0]
            stored = [e["id"] for e in db_events(db, after=first_snapshot)]
            await wait_for(lambda: page.evaluate("window.__progressSse.lastId == "
                                                 f"{stored[-1]}"), what="the last event")
            seen = await page.evaluate("window.__progressSse.seenIds")
            assert seen == stored  # nothing lost, nothing twice, in order
            assert await page.evaluate("window.__progressSse.snapshotIds") == [first_snapshot]

            # the log lines shown are the stored ones
            logs = [e["id"] for e in await stored_log(client, w.id) if e["type"] == "log"]
            shown = await c.locator(".log-line").evaluate_all(
                "els => els.map(e => Number(e.dataset.eventId))")
            assert shown == logs and len(logs) == 9
            assert await problems(page) == []
    finally:
        await asyncio.to_thread(svc.stop)


# ---------------------------------------------------------------- control


async def test_cancel_reaches_the_worker(service: Service, client: httpx.AsyncClient,
                                         browser: Any) -> None:
    """Cancel shows at once, reaches the worker on its next post, and ends as cancelled."""
    page = await new_page(browser, service.url)
    await page.add_init_script(NOTIFICATION_STUB)
    await page.goto(service.url + "/")
    notify = page.locator("#notify")
    await notify.click()  # opt in to notifications
    await expect(notify).to_have_attribute("aria-pressed", "true")
    await expect(notify).to_have_text("Notifying")
    w = await start_job(client, kind="pdf", title="report.pdf")
    await w.progress(progress=10, message="page 1 of 10")
    c = card(page, w.id)
    await expect(c).to_have_attribute("data-status", "running")

    await c.get_by_role("button", name="Cancel report.pdf").click()
    await expect(c.locator(".status-badge")).to_have_text("Cancelling…")
    await expect(c.locator(".act-cancel")).to_have_attribute("aria-disabled", "true")

    async def told_to_cancel() -> bool:
        answer = await w.progress(progress=20, message="page 2 of 10")
        return bool(answer["control"]["cancel_requested"])

    await wait_for(told_to_cancel, what="the worker to learn of the cancel")
    await expect(c).to_have_attribute("data-status", "cancelling")
    await w.finish("cancelled")
    done = page.locator("#recent").locator(f'[data-job-id="{w.id}"]')
    await expect(done).to_have_attribute("data-status", "cancelled")
    await expect(done.locator(".status-badge")).to_have_text("Cancelled")
    await expect(done.locator(".act-cancel")).to_be_hidden()
    await expect(done.locator(".act-pause")).to_be_hidden()
    await expect(page.locator("#notify")).to_have_attribute("aria-pressed", "true")
    shown = await page.evaluate("window.__notifications")
    assert shown == [{"title": "report.pdf was cancelled", "tag": w.id}]
    assert await problems(page) == []


# headless Chromium shows no notifications: record what the page asks for
NOTIFICATION_STUB = """
window.__notifications = [];
window.Notification = class {
  static permission = 'default';
  static async requestPermission() { return (window.Notification.permission = 'granted'); }
  constructor(title, options) { window.__notifications.push({title, tag: options.tag}); }
  close() {}
};
"""


async def test_refused_request_is_shown_in_words(service: Service, client: httpx.AsyncClient,
                                                 browser: Any) -> None:
    """When the server refuses a pause (the job finished meanwhile), the card says why."""
    page = await new_page(browser, service.url)
    await page.goto(service.url + "/")
    w = await start_job(client, kind="export", title="users.csv")
    await w.progress(progress=90)
    c = card(page, w.id)
    await expect(c).to_have_attribute("data-status", "running")

    async def finish_first(route: Any) -> None:
        # the worker finishes just before the page's request arrives: a real 409
        await w.finish("succeeded")
        await route.continue_()

    await page.route("**/api/jobs/*/pause", finish_first)
    await c.get_by_role("button", name="Pause users.csv").click()
    error = c.locator(".action-error")
    await expect(error).to_have_text(f"Could not pause: job {w.id} is already succeeded.")
    await expect(error).to_have_attribute("role", "alert")
    await expect(c).to_have_attribute("data-status", "succeeded")


# ---------------------------------------------------------------- one job by link


async def test_job_view_stops_streaming_when_finished(service: Service,
                                                      client: httpx.AsyncClient,
                                                      browser: Any) -> None:
    """/?job=ID shows one job with its log and result, and stops once the job has finished."""
    w = await start_job(client, kind="import", title="customers.csv")
    await w.progress(progress=30)
    for i in range(3):
        await w.log(f"imported batch {i + 1}")
    other = await start_job(client, kind="import", title="someone else's job")

    page = await new_page(browser, service.url)
    streams: list[str] = []
    page.on("request", lambda r: streams.append(r.url) if "/api/events" in r.url else None)
    await page.goto(f"{service.url}/?job={w.id}")
    c = card(page, w.id)
    await expect(c.locator(".details")).to_be_visible()
    await expect(c.locator(".log-line .log-message")).to_have_text(
        ["imported batch 1", "imported batch 2", "imported batch 3"])
    await expect(card(page, other.id)).to_have_count(0)
    await expect(page.locator("#job-nav")).to_be_visible()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    await w.log("almost there", level="warning")  # appended live
    await expect(c.locator(".log-line")).to_have_count(4)
    await w.finish("failed", error="disk full on the database server")
    await expect(c).to_have_attribute("data-status", "failed")
    await expect(c.locator(".message")).to_have_text("disk full on the database server")
    await expect(c.locator(".message")).to_have_class(re.compile("is-error"))
    await expect(page.locator("#connection")).to_have_attribute("data-state", "closed")
    await wait_for(lambda: _no_streams(client), what="the page's stream to close")
    assert await page.evaluate("window.__progressSse.readyState") is None

    # a finished job opened by link: one snapshot, then nothing stays open or reconnects
    streams.clear()
    await page.reload()
    await expect(c).to_have_attribute("data-status", "failed")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "closed")
    await expect(page.locator("#connection")).to_have_text(re.compile("no more updates"))
    await wait_for(lambda: _no_streams(client), what="the page's stream to close")
    assert len(streams) == 1, streams
    assert await problems(page) == []


async def _no_streams(client: httpx.AsyncClient) -> bool:
    return await open_stream_count(client) == 0


# ---------------------------------------------------------------- fallback


async def test_polls_without_event_source(service: Service, client: httpx.AsyncClient,
                                          browser: Any) -> None:
    """Where EventSource is missing, the page polls GET /api/jobs and says so."""
    page = await new_page(browser, service.url)
    await page.add_init_script("delete window.EventSource")
    await page.goto(service.url + "/")
    conn = page.locator("#connection")
    await expect(conn).to_have_attribute("data-state", "polling")
    await expect(conn).to_contain_text("refreshing every 3 s")
    w = await start_job(client, kind="demo", title="polled")
    await w.progress(progress=55)
    await expect(card(page, w.id).get_by_role("progressbar")).to_have_attribute(
        "aria-valuenow", "55")


async def test_falls_back_to_polling_when_the_stream_is_refused(
        service: Service, client: httpx.AsyncClient, browser: Any) -> None:
    """A stream refused for good (a proxy's 502) means polling, then the stream again."""
    page = await new_page(browser, service.url)

    async def bad_gateway(route: Any) -> None:
        await route.fulfill(status=502, body="bad gateway")

    await page.route("**/api/events*", bad_gateway)
    w = await start_job(client, kind="demo", title="through a bad proxy")
    await page.goto(service.url + "/")
    conn = page.locator("#connection")
    await expect(conn).to_have_attribute("data-state", "polling")
    await expect(conn).to_contain_text("Live stream unavailable; refreshing every 3 s")
    await expect(card(page, w.id)).to_be_visible()

    await page.unroute("**/api/events*", bad_gateway)
    await expect(conn).to_have_attribute("data-state", "live")  # reopened after a poll
    await w.progress(progress=30)
    await expect(card(page, w.id).get_by_role("progressbar")).to_have_attribute(
        "aria-valuenow", "30")
    assert len(await page.evaluate("window.__progressSse.seenIds")) == 1


# ---------------------------------------------------------------- the look


CONTRAST = """
(selectors) => {
  const rgb = s => { const p = s.match(/[\\d.]+/g).map(Number);
                     return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1}; };
  const lin = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
  const lum = c => 0.2126 * lin(c.r) + 0.7152 * lin(c.g) + 0.0722 * lin(c.b);
  const back = el => { for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor); if (c.a > 0.5) return c; }
    return rgb(getComputedStyle(document.documentElement).backgroundColor); };
  const low = [];
  for (const sel of selectors) for (const el of document.querySelectorAll(sel)) {
    if (!el.checkVisibility()) continue;
    const a = lum(rgb(getComputedStyle(el).color)), b = lum(back(el));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) low.push(`${sel} "${el.textContent.trim().slice(0, 20)}" ${ratio.toFixed(2)}`);
  }
  return low;
}
"""
TEXT = [".badge", ".kind", ".job-title a", ".message", ".stage", ".fact dt", ".fact dd",
        ".stalled-note", ".conn-text", ".group h2", "button:not([aria-disabled])", "label",
        ".none"]


async def test_screenshots_of_every_state(service: Service, client: httpx.AsyncClient,
                                          browser: Any) -> None:
    """Jobs in every state, drawn in light, dark and phone width (saved in test-output/)."""
    video = await make_jobs_in_every_state(client)
    OUTPUT.mkdir(exist_ok=True)
    desktop = {"width": 1280, "height": 900}
    shots: list[tuple[str, dict[str, Any]]] = [
        ("dashboard.png", {"viewport": desktop}),
        ("dashboard-dark.png", {"viewport": desktop, "color_scheme": "dark"}),
        ("dashboard-phone.png", {"viewport": {"width": 390, "height": 844},
                                 "device_scale_factor": 2, "is_mobile": True,
                                 "has_touch": True}),
    ]
    for name, options in shots:
        page = await new_page(browser, service.url, reduced_motion="reduce", **options)
        await page.goto(service.url + "/")
        for status in ("queued", "running", "paused", "cancelling", "succeeded", "failed",
                       "cancelled"):
            await expect(page.locator(f'article.job[data-status="{status}"]').first).to_be_visible()
        await expect(page.locator('article.job[data-stalled="true"]')).to_have_count(1)
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        low = await page.evaluate(CONTRAST, TEXT)
        assert low == [], f"{name}: low contrast {low}"
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= options["viewport"]["width"], f"{name}: scrolls sideways ({width}px)"
        await page.screenshot(path=str(OUTPUT / name), full_page=True)
        assert await problems(page) == []
        await page.context.close()

    # one job by link, expanded, with its log
    page = await new_page(browser, service.url, viewport={"width": 1000, "height": 700})
    await page.goto(f"{service.url}/?job={video}")
    await expect(card(page, video).locator(".log-line")).to_have_count(4)
    await page.screenshot(path=str(OUTPUT / "dashboard-job.png"), full_page=True)
    await page.context.close()

    # filters, and the controls by keyboard alone
    page = await new_page(browser, service.url)
    await page.goto(service.url + "/")
    await expect(page.locator("article.job")).to_have_count(9)
    await page.locator("#filter-status").select_option("failed")
    await expect(page.locator("article.job:visible")).to_have_count(1)
    await expect(page.locator("#filter-summary")).to_have_text("Showing 1 of 9 jobs.")
    assert "status=failed" in page.url
    await page.locator("#filter-status").select_option("")
    await page.locator("#filter-kind").select_option("export")
    await expect(page.locator("article.job:visible")).to_have_count(3)
    await page.locator("#filter-kind").select_option("")

    queued = page.locator('article.job[data-status="queued"]').first
    title = await queued.locator(".job-link").text_content()
    for _ in range(60):
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement.getAttribute('aria-label')") \
                == f"Pause {title}":
            break
    else:
        raise AssertionError("the Pause button is not reachable by keyboard")
    await page.keyboard.press("Enter")
    paused = page.locator(f'article.job:has(.job-link:text-is("{title}"))')
    await expect(paused).to_have_attribute("data-status", "paused")
    await expect(paused.get_by_role("button", name=f"Resume {title}")).to_be_focused()


async def make_jobs_in_every_state(client: httpx.AsyncClient) -> str:
    """Nine jobs, one or more in each state; answers the id of the running video job."""
    stages = [{"key": "fetch", "label": "Fetch", "weight": 1},
              {"key": "transcode", "label": "Transcode", "weight": 6},
              {"key": "upload", "label": "Upload", "weight": 1}]
    done = await start_job(client, kind="thumbnails", title="Thumbnails for album 12")
    await done.progress(current=48, total=48, message="48 of 48 images")
    await done.finish("succeeded", result={"images": 48, "bytes": 5242880})
    failed = await start_job(client, kind="export", title="Invoice batch 7")
    await failed.progress(progress=35, message="writing invoices")
    await failed.finish("failed", error="S3 answered 403 Forbidden for invoices/7.zip")
    cancelled = await start_job(client, kind="backup", title="Old backup")
    r = await client.post(f"/api/jobs/{cancelled.id}/cancel", json={"reason": "not needed"})
    assert r.status_code == 200, r.text

    stalled = await start_job(client, kind="import", title="customers.csv",
                              heartbeat_timeout_s=1)
    await stalled.progress(progress=62, message="row 6,200 of 10,000")
    video = await start_job(client, kind="video", title="intro-final-v3.mp4", stages=stages,
                            meta={"unit": "chunk"})
    await video.log("source: s3://media/raw/intro-final-v3.mov (2.1 GB)")
    await video.progress(stage="fetch", progress=100)
    await video.log("profile 1080p/h264, 12 chunks of 30 s")
    await video.log("chunk 3 needed two attempts (encoder restarted)", level="warning")
    await video.log("chunk 4 done in 41 s")
    await video.progress(stage="transcode", current=5, total=12,
                         message="transcoding chunk 5 of 12 (1080p)")
    paused = await start_job(client, kind="pdf", title="Annual report 2025.pdf")
    await paused.progress(progress=40, message="page 48 of 120")
    r = await client.post(f"/api/jobs/{paused.id}/pause", json={})
    assert r.status_code == 202, r.text
    await paused.progress(paused=True, message="paused at page 48")
    stopping = await start_job(client, kind="export", title="Audit log export")
    await stopping.progress(progress=71, message="March 2026")
    r = await client.post(f"/api/jobs/{stopping.id}/cancel", json={})
    assert r.status_code == 202, r.text
    await start_job(client, kind="export", title="Nightly export")
    await start_job(client, kind="video", title="outro.mp4", stages=stages)

    async def is_stalled() -> bool:
        r = await client.get(f"/api/jobs/{stalled.id}")
        return bool(r.json()["job"]["stalled"])

    await wait_for(is_stalled, timeout=5, what="the silent job to be marked stalled")
    return video.id

"""Headless Chromium for the dashboard tests: skip without it, unless CI requires it."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

REQUIRE = os.environ.get("PROGRESS_SSE_REQUIRE_BROWSER") == "1"
CHROMIUM = os.environ.get("PROGRESS_SSE_CHROMIUM") or shutil.which("chromium") \
    or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"

# Records CSP violations and uncaught errors so a test can assert there were none.
WATCH_SCRIPT = """
window.__problems = [];
document.addEventListener('securitypolicyviolation',
  e => window.__problems.push('csp: ' + e.violatedDirective + ' ' + e.blockedURI));
window.addEventListener('error', e => window.__problems.push('error: ' + e.message));
window.addEventListener('unhandledrejection',
  e => window.__problems.push('rejection: ' + e.reason));
"""

CSP = "default-src 'self'"


def require_browser() -> None:
    """Skip the calling module without playwright or Chromium; fail instead in CI."""
    missing = None
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing = "the playwright package is not installed (pip install playwright)"
    else:
        if not Path(CHROMIUM).is_file():
            missing = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing is None:
        return
    if REQUIRE:
        pytest.fail(f"PROGRESS_SSE_REQUIRE_BROWSER=1 but {missing}", pytrace=False)
    pytest.skip(f"browser tests skipped: {missing}", allow_module_level=True)


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless Chromium for one test."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def new_page(browser: Any, base_url: str, **context_options: Any) -> Any:
    """A page that gets the strict Content-Security-Policy the service will send for the
    dashboard, and records CSP violations and script errors (see `problems`)."""
    context = await browser.new_context(**context_options)
    page = await context.new_page()
    await page.add_init_script(WATCH_SCRIPT)
    base = base_url.rstrip("/")

    async def with_csp(route: Any) -> None:
        response = await route.fetch()
        headers = {**response.headers, "content-security-policy": CSP}
        await route.fulfill(response=response, headers=headers)

    # only the HTML document: the stream and the API are not intercepted
    await page.route(lambda url: url.split("?")[0].rstrip("/") == base, with_csp)
    return page


async def problems(page: Any) -> list[str]:
    found: list[str] = await page.evaluate("window.__problems")
    return found

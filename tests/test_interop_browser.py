"""Real EventSource clients against a real server: Chromium's and Node's (npm `eventsource`,
tests/node/), directly and behind nginx configured with the README's own block.

Each client goes through the same scenarios: a fresh connect, a resume with
`?last_event_id=`, keep-alives, the JSON line separators, the end of a per-job stream
(204), a kill -9 and a SIGTERM restart of the service; and behind nginx (the README's
"Behind nginx" block, ports and file names replaced) both restarts, with the service
held down long enough that the client's retry meets nginx. Without the block's
`error_page` (nginx answers 502) both clients stop for good, which is why it is there.

Needs node with tests/node/node_modules (`make node-deps`), nginx, openssl, playwright
and Chromium. A missing tool skips the tests that need it, unless
PROGRESS_SSE_REQUIRE_BROWSER=1 (CI), which makes that a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from progress_sse.settings import Settings

from . import browser as chromium_support
from .helpers import (
    ROOT,
    ProcessService,
    Service,
    create_job,
    free_port,
    start_service,
    stored_log,
    wait_for,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NODE_DIR = ROOT / "tests" / "node"
READER = NODE_DIR / "sse_reader.mjs"
README = ROOT / "README.md"
TYPES = ["snapshot", "created", "progress", "log", "status", "finished"]
SEPARATORS = "line\u2028separator\u2029paragraph\u0085next line\r\nand CRLF"
DOWN_S = 1.5  # how long the service stays down in the nginx restarts: > the 1 s retry
TIMEOUT = 10.0
# Debian puts nginx in /usr/sbin, which is not on a user's PATH
NGINX = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") or "nginx"


# ---------------------------------------------------------------- what each test needs


def need(*tools: str) -> None:
    """Skip without one of `tools` (node, nginx, openssl, chromium); fail instead in CI."""
    missing: list[str] = []
    for tool in tools:
        if tool == "chromium":
            try:
                import playwright.async_api  # noqa: F401
            except ImportError:
                missing.append("the playwright package (pip install playwright)")
            if not Path(chromium_support.CHROMIUM).is_file():
                missing.append(f"Chromium at {chromium_support.CHROMIUM} (make system-deps)")
        elif shutil.which(NGINX if tool == "nginx" else tool) is None:
            missing.append(f"{tool} (make system-deps)")
        if tool == "node" and not (NODE_DIR / "node_modules" / "eventsource").is_dir():
            missing.append("tests/node/node_modules (make node-deps)")
    if not missing:
        return
    message = "missing " + ", ".join(missing)
    if chromium_support.REQUIRE:
        pytest.fail(f"PROGRESS_SSE_REQUIRE_BROWSER=1 but {message}", pytrace=False)
    pytest.skip(message)


# ---------------------------------------------------------------- the two clients


class Reader(Protocol):
    """One EventSource; `records` are what it saw: open, event, error (see sse_reader.mjs)."""

    name: str

    async def records(self) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


class NodeReader:
    """npm `eventsource` in a node process that prints one JSON line per record."""

    name = "node"

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, ca: Path | None = None) -> NodeReader:
        env = {**os.environ}
        if ca is not None:
            env["NODE_EXTRA_CA_CERTS"] = str(ca)
        proc = await asyncio.create_subprocess_exec(
            "node", str(READER), url, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, limit=1 << 24)
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(json.loads(line))

    async def records(self) -> list[dict[str, Any]]:
        if self._task.done():
            self._task.result()  # a line that is not JSON fails the test here
        return [r for r in self.lines if r["kind"] != "exit"]

    async def close(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self._task


CHROMIUM_READER = """
(url) => {
  window.__log = [];
  const push = r => window.__log.push({...r, t: Date.now()});
  const es = new EventSource(url);
  window.__es = es;
  es.addEventListener('open', () => push({kind: 'open', readyState: es.readyState}));
  es.addEventListener('error', () =>
    push({kind: 'error', readyState: es.readyState, code: null, message: null}));
  for (const type of [...TYPES, 'message'])
    es.addEventListener(type, e =>
      push({kind: 'event', type: e.type, id: e.lastEventId, data: e.data}));
}
""".replace("TYPES", json.dumps(TYPES))


class ChromiumReader:
    """Chromium's own EventSource, opened by a page of the stream's origin."""

    name = "chromium"

    def __init__(self, page: Any) -> None:
        self.page = page

    @classmethod
    async def open(cls, browser: Any, url: str) -> ChromiumReader:
        context = await browser.new_context(ignore_https_errors=True)
        page = await context.new_page()
        origin = re.match(r"https?://[^/]+", url)
        assert origin is not None
        await page.goto(origin.group(0) + "/healthz")  # same origin: no CORS in the way
        await page.evaluate(CHROMIUM_READER, url)
        return cls(page)

    async def records(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self.page.evaluate("window.__log")
        return found

    async def close(self) -> None:
        await self.page.context.close()


Opener = Callable[[str], Awaitable[Reader]]


@pytest.fixture(params=["node", "chromium"])
async def open_reader(request: pytest.FixtureRequest,
                      tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Reader]]]:
    """Opens EventSources of one kind (the test's parameter); all closed at the end."""
    kind: str = request.param
    need(kind)
    readers: list[Reader] = []
    async with contextlib.AsyncExitStack() as stack:
        browser: Any = None
        if kind == "chromium":
            browser = await stack.enter_async_context(chromium_support.chromium())

        async def open_(url: str, ca: Path | None = None) -> Reader:
            reader: Reader
            if browser is not None:
                reader = await ChromiumReader.open(browser, url)
            else:
                reader = await NodeReader.open(url, ca)
            readers.append(reader)
            return reader

        try:
            yield open_
        finally:
            for reader in readers:
                await reader.close()


# ---------------------------------------------------------------- checking what arrived


def events(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "event"]


def kinds(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == kind]


def check_event(record: dict[str, Any]) -> dict[str, Any]:
    """An event is one of the service's types, has an id, and data that is its JSON."""
    assert record["type"] in TYPES, f"an event of type {record['type']!r}: {record}"
    assert record["data"], f"an event without data: {record}"
    data: dict[str, Any] = json.loads(record["data"])
    assert data["id"] == int(record["id"]), record
    assert data["type"] == record["type"], record
    return data


def check_exactly(received: list[dict[str, Any]], stored: list[dict[str, Any]]) -> None:
    """The events are the stored ones, each once, in order, with the same data."""
    got = [(int(r["id"]), r["type"]) for r in received]
    want = [(e["id"], e["type"]) for e in stored]
    assert got == want
    for record, event in zip(received, stored, strict=True):
        assert check_event(record) == event


async def wait_events(reader: Reader, count: int, what: str,
                      timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """Wait until `reader` saw at least `count` events; answers its records."""

    async def enough() -> bool:
        return len(events(await reader.records())) >= count

    await wait_for(enough, timeout=timeout, interval=0.05, what=f"{reader.name}: {what}")
    return await reader.records()


async def post(client: httpx.AsyncClient, job_id: str, what: str, **fields: Any) -> int:
    r = await client.post(f"/api/jobs/{job_id}/{what}", json=fields)
    assert r.status_code == 200, r.text
    event_id: int = r.json()["event_id"]
    return event_id


# ---------------------------------------------------------------- direct, in-process service

STREAM_REQUESTS: list[str] = []


def count_streams(app: ASGIApp) -> ASGIApp:
    """Counts the requests to stream paths (send is passed on untouched)."""

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/events"):
            STREAM_REQUESTS.append(scope["path"])
        await app(scope, receive, send)

    return counted


@pytest.fixture
def settings(db_path: str) -> Settings:
    # keep-alives ten times a second; a quick retry so the end-of-job test waits little
    return Settings(db=db_path, keepalive_s=0.1, retry_ms=200)


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Service]:
    STREAM_REQUESTS.clear()
    svc = await start_service(settings, wrap=count_streams)
    yield svc
    await svc.stop()


async def test_fresh_connect(service: Service, client: httpx.AsyncClient,
                             open_reader: Opener) -> None:
    """A snapshot whose id is the head, then every event once, in order, each with data."""
    job = await create_job(client, title="fresh")
    await post(client, job["id"], "progress", progress=5)
    reader = await open_reader(f"{service.url}/api/events?job={job['id']}")
    records = await wait_events(reader, 1, "the snapshot")
    snapshot = check_event(events(records)[0])
    assert events(records)[0]["type"] == "snapshot"
    head = (await client.get("/api/jobs")).json()["head"]
    assert int(events(records)[0]["id"]) == head == snapshot["id"]
    assert [j["progress"] for j in snapshot["jobs"]] == [5]

    await post(client, job["id"], "progress", progress=20, message="twenty")
    await post(client, job["id"], "log", message="a line")
    await post(client, job["id"], "progress", stage=None, current=3, total=4)
    await post(client, job["id"], "finish", status="succeeded", result={"n": 1})
    records = await wait_events(reader, 5, "four events after the snapshot")
    await asyncio.sleep(0.3)  # nothing more comes (the general stream stays open)
    records = await reader.records()
    check_exactly(events(records)[1:], await stored_log(client, job["id"], after=head))
    assert len(kinds(records, "open")) == 1 and kinds(records, "error") == []


async def test_resume_with_query_parameter(service: Service, client: httpx.AsyncClient,
                                           open_reader: Opener) -> None:
    """`?last_event_id=N` (EventSource cannot set headers): exactly the events after N,
    with no snapshot, then the live ones."""
    job = await create_job(client, title="resume")
    first = await post(client, job["id"], "progress", progress=10)
    for pct in (20, 30, 40):
        await post(client, job["id"], "progress", progress=pct)
    reader = await open_reader(f"{service.url}/api/events?job={job['id']}&last_event_id={first}")
    await wait_events(reader, 3, "the three events after the resume point")
    await post(client, job["id"], "log", message="live")
    records = await wait_events(reader, 4, "the live event")
    check_exactly(events(records), await stored_log(client, job["id"], after=first))
    assert len(kinds(records, "open")) == 1 and kinds(records, "error") == []


async def test_keep_alives_make_no_event(service: Service, client: httpx.AsyncClient,
                                         open_reader: Opener) -> None:
    """A keep-alive every 0.1 s for a second and a half: no event, no reconnect."""
    job = await create_job(client, title="idle")
    url = f"{service.url}/api/events?job={job['id']}"
    reader = await open_reader(url)
    await wait_events(reader, 1, "the snapshot")
    async with httpx.AsyncClient(timeout=5) as raw, raw.stream("GET", url) as r:
        seen = b""
        async with asyncio.timeout(3):
            async for chunk in r.aiter_bytes():
                seen += chunk
                if seen.count(b": keep-alive\n") >= 5:
                    break  # they are on the wire
    await asyncio.sleep(1.5)
    last = await post(client, job["id"], "progress", progress=50)
    records = await wait_events(reader, 2, "the event after the idle time")
    await asyncio.sleep(0.3)
    records = await reader.records()
    assert [(e["type"], int(e["id"])) for e in events(records)][1:] == [("progress", last)]
    assert len(kinds(records, "open")) == 1 and kinds(records, "error") == []


async def test_line_separators_arrive_intact(service: Service, client: httpx.AsyncClient,
                                             open_reader: Opener) -> None:
    """U+2028, U+2029 and U+0085 (and CR LF) in a message and a log line arrive as sent."""
    job = await create_job(client, title="separators\u2028in a title")
    reader = await open_reader(f"{service.url}/api/events?job={job['id']}")
    await wait_events(reader, 1, "the snapshot")
    await post(client, job["id"], "progress", progress=1, message=SEPARATORS)
    await post(client, job["id"], "log", message=SEPARATORS + "\u2028")
    records = await wait_events(reader, 3, "both events")
    progress, log = (check_event(r) for r in events(records)[1:])
    assert progress["job"]["message"] == SEPARATORS
    assert progress["job"]["title"] == "separators\u2028in a title"
    assert log["message"] == SEPARATORS + "\u2028"
    check_exactly(events(records)[1:], await stored_log(client, job["id"], after=1))
    assert len(kinds(records, "open")) == 1 and kinds(records, "error") == []


async def test_per_job_stream_ends_for_good(service: Service, client: httpx.AsyncClient,
                                            open_reader: Opener) -> None:
    """After `finished` the stream ends; the reconnect gets a 204 and the client stops
    (closed, and no further request in ten times its retry delay)."""
    job = await create_job(client, title="ends")
    url = f"{service.url}/api/jobs/{job['id']}/events"
    reader = await open_reader(url)
    await wait_events(reader, 1, "the snapshot")
    await post(client, job["id"], "progress", progress=60)
    final = await post(client, job["id"], "finish", status="failed", error="disk full")

    async def closed() -> bool:
        errors = kinds(await reader.records(), "error")
        return bool(errors) and errors[-1]["readyState"] == 2

    await wait_for(closed, timeout=TIMEOUT, interval=0.05, what="the client to stop")
    records = await reader.records()
    assert [(e["type"], int(e["id"])) for e in events(records)][1:] == [
        ("progress", final - 1), ("finished", final)]
    requests = len(STREAM_REQUESTS)
    await asyncio.sleep(2.0)  # retry is 200 ms: a looping client would be back 10 times
    assert await reader.records() == records
    assert len(kinds(records, "open")) == 1
    assert requests == 2 == len(STREAM_REQUESTS), STREAM_REQUESTS  # the stream, the 204
    if reader.name == "node":
        assert kinds(records, "error")[-1]["code"] == 204


# ---------------------------------------------------------------- restarts


@pytest.fixture
async def proc(tmp_path: Path) -> AsyncIterator[ProcessService]:
    """The service as a process with the default retry delay (1000 ms)."""
    svc = ProcessService(db=str(tmp_path / "p.db"), port=free_port())
    svc.start()
    yield svc
    svc.stop()


async def restart(proc: ProcessService, sig: int, down: float = 0.0) -> tuple[float, float]:
    """Stop the service with `sig`, keep it down `down` seconds, start it again on the same
    port and file; answers the wall-clock times of the signal and of its being healthy."""
    signalled = time.time()
    proc.signal(sig)
    await asyncio.to_thread(proc.wait, 15)
    await asyncio.sleep(max(0.0, signalled + down - time.time()))
    await asyncio.to_thread(proc.start)
    return signalled, time.time()


async def through_restarts(reader: Reader, proc: ProcessService, client: httpx.AsyncClient,
                           job_id: str, after: int, down: float, skip: int = 0,
                           returns: Callable[[], list[int]] | None = None) -> list[str]:
    """SIGTERM then kill -9, with events posted before each and right after the service is
    back; the reader's events (after the first `skip`: a snapshot) must be exactly the
    stored ones after `after`. `returns` gives the statuses nginx answered the stream
    requests with since it was last called (checked: at least one 444 each time)."""
    notes = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        await post(client, job_id, "log", message=f"before {sig.name}")
        count = len(await stored_log(client, job_id, after=after))
        await wait_events(reader, skip + count, f"the events before {sig.name}")
        opens = len(kinds(await reader.records(), "open"))
        signalled, healthy = await restart(proc, sig, down)
        for i in range(3):  # missed: stored while the client is (most likely) away
            await post(client, job_id, "progress", progress=10 * (count + i))
        posted = time.time()
        stored = await stored_log(client, job_id, after=after)

        async def back(opens: int = opens) -> bool:
            return len(kinds(await reader.records(), "open")) > opens

        await wait_for(back, timeout=TIMEOUT, interval=0.05,
                       what=f"{reader.name} to reconnect after {sig.name}")
        records = await wait_events(reader, skip + len(stored),
                                    f"the events missed in {sig.name}")
        check_exactly(events(records)[skip:], stored)
        reopened = kinds(records, "open")[opens]["t"] / 1000
        first_error = next(r["t"] / 1000 for r in kinds(records, "error")
                           if r["t"] / 1000 >= signalled)
        tries = len([r for r in kinds(records, "error") if r["t"] / 1000 >= signalled])
        assert all(r["readyState"] != 2 for r in kinds(records, "error")), records
        notes.append(f"{reader.name} {sig.name}: dropped {first_error - signalled:.2f} s after "
                     f"the signal, service healthy after {healthy - signalled:.2f} s, "
                     f"reopened {reopened - healthy:+.2f} s from healthy "
                     f"({'after' if reopened > posted else 'before'} the 3 posts there), "
                     f"{tries} error(s)")
        if returns is not None:
            statuses = returns()
            assert 444 in statuses, statuses  # a reconnect met the service down
            notes[-1] += f", nginx answered {statuses}"
    return notes


async def test_restarts_resume_exactly(proc: ProcessService, open_reader: Opener) -> None:
    """The client, opened with `?last_event_id=`, reconnects by itself across a SIGTERM
    and a kill -9 restart on the same port and file, and gets exactly the missed events
    (its own Last-Event-ID header wins over the URL's older id)."""
    async with httpx.AsyncClient(base_url=proc.url, timeout=5) as client:
        job = await create_job(client, title="restarts")
        first = await post(client, job["id"], "progress", progress=1)
        await post(client, job["id"], "progress", progress=2)
        reader = await open_reader(f"{proc.url}/api/events?job={job['id']}"
                                   f"&last_event_id={first}")
        notes = await through_restarts(reader, proc, client, job["id"], first, down=0.0)
    assert len(notes) == 2, notes  # both restarts resumed exactly (checked in the loop)
    print("\n" + "\n".join(notes))


# ---------------------------------------------------------------- behind nginx


def readme_nginx_block() -> str:
    """The README's tested nginx block, as documented."""
    doc = README.read_text()
    return doc.split("<!-- tested: nginx")[1].split("```nginx\n")[1].split("```")[0]


def substitute(block: str, listen: int, upstream: int, tmp: Path, cert: Path,
               key: Path) -> str:
    """The block with this test's ports and files: nothing else changes."""
    for old, new in [("listen 443 ssl http2;", f"listen 127.0.0.1:{listen} ssl http2;"),
                     ("/etc/ssl/progress.crt", str(cert)),
                     ("/etc/ssl/progress.key", str(key)),
                     ("/var/log/nginx/progress.log", str(tmp / "progress.log")),
                     ("http://127.0.0.1:8000;", f"http://127.0.0.1:{upstream};")]:
        assert old in block, f"the README's nginx block no longer has {old!r}"
        block = block.replace(old, new)
    return block


def nginx_conf(block: str, tmp: Path) -> str:
    """A whole nginx.conf around a server block, with every file in `tmp`."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "".join(f"    {name}_temp_path {tmp / name};\n"
                    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    body = "".join(f"    {line}\n" if line else "\n" for line in block.splitlines())
    return (f"{user}worker_processes 1;\nerror_log {tmp / 'error.log'} info;\n"
            f"events {{ worker_connections 256; }}\nhttp {{\n"
            f"    access_log {tmp / 'access.log'};\n{temps}{body}}}\n")


def certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1."""
    cert, key = tmp / "progress.crt", tmp / "progress.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


class Nginx:
    """nginx as this test's own process, on a free port, files in its own folder."""

    def __init__(self, tmp: Path, block: str, upstream: int) -> None:
        self.tmp = tmp
        tmp.mkdir(exist_ok=True)
        self.port = free_port()
        self.cert, self.key = certificate(tmp)
        self.conf = tmp / "nginx.conf"
        self.conf.write_text(nginx_conf(
            substitute(block, self.port, upstream, tmp, self.cert, self.key), tmp))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def command(self, *extra: str) -> list[str]:
        return [NGINX, "-c", str(self.conf), "-p", str(self.tmp), "-e",
                str(self.tmp / "error.log"), "-g", f"daemon off; pid {self.tmp / 'nginx.pid'};",
                *extra]

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                assert self.proc.stderr is not None
                raise AssertionError(f"nginx exited: {self.proc.stderr.read().decode()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise AssertionError("nginx did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def stream_statuses(self) -> list[int]:
        """The statuses of stream requests in the README's access log, and forget them."""
        path = self.tmp / "progress.log"
        lines = path.read_text().splitlines() if path.exists() else []
        seen = getattr(self, "_seen", 0)
        self._seen = len(lines)
        found = [re.search(r'"GET (\S+)" (\d{3}) ', line) for line in lines[seen:]]
        return [int(m.group(2)) for m in found if m and m.group(1).endswith("/events")]


def test_readme_nginx_block_passes_nginx_t(tmp_path: Path) -> None:
    """`nginx -t` accepts the README's block on this nginx (Debian 12: 1.22), no warning."""
    need("nginx", "openssl")
    nginx = Nginx(tmp_path / "nginx", readme_nginx_block(), free_port())
    out = subprocess.run(nginx.command("-t"), capture_output=True, text=True)
    version = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip()
    assert out.returncode == 0, f"{version}: {out.stderr}"
    assert "test is successful" in out.stderr
    assert "[warn]" not in out.stderr and "[emerg]" not in out.stderr, out.stderr
    print(f"\n{version}: nginx -t ok")


@pytest.fixture
def nginx_for(tmp_path: Path) -> Iterator[Callable[[str, int], Nginx]]:
    """Starts nginx with a given server block in front of a port; stopped at the end."""
    started: list[Nginx] = []

    def start(block: str, upstream: int) -> Nginx:
        need("nginx", "openssl")
        proxy = Nginx(tmp_path / "nginx", block, upstream)
        proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


async def test_restarts_behind_nginx_resume_exactly(
        proc: ProcessService, open_reader: Opener,
        nginx_for: Callable[[str, int], Nginx]) -> None:
    """Through the README's nginx block, across a SIGTERM and a kill -9 restart, each with
    the service down long enough that the client's retry meets nginx: the reconnect is
    closed (444) instead of answered 502, so the client tries again and resumes exactly."""
    proxy = nginx_for(readme_nginx_block(), proc.port)
    async with httpx.AsyncClient(base_url=proc.url, timeout=5) as client:
        job = await create_job(client, title="behind nginx")
        first = await post(client, job["id"], "progress", progress=1)
        reader = await open_reader(f"{proxy.url}/api/events?job={job['id']}", proxy.cert)
        await wait_events(reader, 1, "the snapshot")
        records = await reader.records()
        assert events(records)[0]["type"] == "snapshot"
        assert int(events(records)[0]["id"]) == first
        if isinstance(reader, ChromiumReader):  # the block's HTTP/2, where 444 resets a stream
            protocol = await reader.page.evaluate(
                "performance.getEntriesByType('navigation')[0].nextHopProtocol")
            assert protocol == "h2"
        proxy.stream_statuses()
        notes = await through_restarts(reader, proc, client, job["id"], first, down=DOWN_S,
                                       skip=1, returns=proxy.stream_statuses)
    print("\n" + "\n".join(notes))


async def test_without_the_error_page_a_restart_loses_them_for_good(
        proc: ProcessService, open_reader: Opener,
        nginx_for: Callable[[str, int], Nginx]) -> None:
    """Why the block has it: without `error_page ... = @stream_down`, nginx answers the
    reconnect during a restart with 502, and the client stops for good."""
    block = "".join(line for line in readme_nginx_block().splitlines(keepends=True)
                    if "error_page" not in line)
    proxy = nginx_for(block, proc.port)
    async with httpx.AsyncClient(base_url=proc.url, timeout=5) as client:
        job = await create_job(client, title="old block")
        reader = await open_reader(f"{proxy.url}/api/events?job={job['id']}", proxy.cert)
        await wait_events(reader, 1, "the snapshot")
        await restart(proc, signal.SIGTERM, down=DOWN_S)

        async def gone() -> bool:
            errors = kinds(await reader.records(), "error")
            return bool(errors) and errors[-1]["readyState"] == 2

        await wait_for(gone, timeout=TIMEOUT, interval=0.05, what="the client to give up")
        await post(client, job["id"], "progress", progress=50)
        await asyncio.sleep(2.5)  # more than two retry delays: it does not come back
        records = await reader.records()
        assert len(events(records)) == 1 and len(kinds(records, "open")) == 1
        assert 502 in proxy.stream_statuses()

"""The README's "Scale out" nginx block, as written: two instances on PostgreSQL behind
one nginx; one is killed -9 while a reader streams through nginx and a worker posts
through it. The reader resumes on the other instance and sees exactly the stored log."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse

from .helpers import ROOT, free_port
from .pg import PgProcess, module_fixture, stored_ids
from .test_interop_browser import Nginx, certificate, need, nginx_conf

module_database = module_fixture()


def readme_scale_block() -> str:
    doc = (ROOT / "README.md").read_text()
    return doc.split("<!-- tested: nginx-scale")[1].split("```nginx\n")[1].split("```")[0]


class ScaleNginx(Nginx):
    """nginx with the README's scale-out block: two upstreams instead of one."""

    def __init__(self, tmp: Path, block: str, upstreams: tuple[int, int]) -> None:
        self.tmp = tmp
        tmp.mkdir(exist_ok=True)
        self.port = free_port()
        self.cert, self.key = certificate(tmp)
        for old, new in [("listen 443 ssl http2;", f"listen 127.0.0.1:{self.port} ssl http2;"),
                         ("/etc/ssl/progress.crt", str(self.cert)),
                         ("/etc/ssl/progress.key", str(self.key)),
                         ("/var/log/nginx/progress.log", str(tmp / "progress.log")),
                         ("server 127.0.0.1:8001 ", f"server 127.0.0.1:{upstreams[0]} "),
                         ("server 127.0.0.1:8002 ", f"server 127.0.0.1:{upstreams[1]} ")]:
            assert old in block, f"the README's scale-out block no longer has {old!r}"
            block = block.replace(old, new)
        self.conf = tmp / "nginx.conf"
        self.conf.write_text(nginx_conf(block, tmp))
        self.proc = None


@pytest.mark.slow
def test_readme_scale_out_block_two_instances_one_killed(pg_dsn: str, tmp_path: Path) -> None:
    need("nginx", "openssl")
    a = PgProcess(pg_dsn, free_port(), tmp_path)
    b = PgProcess(pg_dsn, free_port(), tmp_path)
    a.start()
    b.start()
    nginx = ScaleNginx(tmp_path / "nginx", readme_scale_block(), (a.port, b.port))
    nginx.start()
    try:
        asyncio.run(_through_nginx(pg_dsn, nginx.url, a))
    finally:
        nginx.stop()
        a.stop()
        b.stop()


async def _through_nginx(dsn: str, url: str, a: PgProcess) -> None:
    async with httpx.AsyncClient(base_url=url, verify=False, timeout=10) as http:
        r = await http.post("/api/jobs", json={"kind": "nginx"})
        assert r.status_code == 201, r.text
        job_id = r.json()["job"]["id"]
        seen: list[int] = []
        connects = 0

        async def read() -> None:
            nonlocal connects
            last = 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                connects += 1
                with contextlib.suppress(httpx.TransportError):
                    async with aconnect_sse(http, "GET", f"/api/jobs/{job_id}/events",
                                            headers={"Last-Event-ID": str(last)}) as src:
                        if src.response.status_code == 204:
                            return
                        async for ev in src.aiter_sse():
                            seen.append(int(ev.id))
                            last = int(ev.id)
                            if ev.event == "finished":
                                return
                await asyncio.sleep(0.1)

        reading = asyncio.create_task(read())
        posted = 0
        for i in range(120):
            if i == 40:
                await asyncio.to_thread(a.kill)
            for _ in range(20):  # nginx answers 502 once while it finds A gone
                r = await http.post(f"/api/jobs/{job_id}/log", json={"message": str(i)})
                if r.status_code == 200:
                    posted += 1
                    break
                await asyncio.sleep(0.05)
        r = await http.post(f"/api/jobs/{job_id}/finish", json={"status": "succeeded"})
        assert r.status_code == 200, r.text
        await asyncio.wait_for(reading, 40)
    stored = [i for i, _ in await stored_ids(dsn, [job_id])]
    assert posted == 120 and len(stored) == 122  # created, 120 logs, finished
    assert seen == stored
    assert connects >= 2, "the stream was never cut by the kill"

"""The package as a user installs it: a built wheel, outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from progress_sse import migrations

from .helpers import ROOT, free_port


@pytest.mark.slow
def test_an_installed_wheel_migrates_and_serves_the_dashboard(tmp_path: Path) -> None:
    """A wheel installed elsewhere finds its migrations and its dashboard
    inside itself."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("progress_sse-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site), "PROGRESS_SSE_LOG_FORMAT": "json"}
    where = subprocess.run(
        [sys.executable, "-c", "import progress_sse; print(progress_sse.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(site)), where.stdout  # not the checkout
    db = str(tmp_path / "p.db")
    migrate = subprocess.run([sys.executable, "-m", "progress_sse", "migrate", "--db", db],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    versions = [v for v, _ in migrations.available()]
    assert migrate.returncode == 0 and f"applied {versions}" in migrate.stdout, migrate
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "progress_sse", "serve", "--port", str(port),
                             "--db", db], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert httpx.get(f"http://127.0.0.1:{port}/app.js").status_code == 200
        # a write: the store's writer runs from the installed package too
        created = httpx.post(f"http://127.0.0.1:{port}/api/jobs", json={}, timeout=5)
        assert created.status_code == 201 and created.json()["event_id"] == 1
    finally:
        proc.terminate()
        proc.wait(10)

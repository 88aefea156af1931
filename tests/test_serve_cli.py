"""`progress-sse serve` and `make run` as a new user meets them (issue 16, items 5 and 6):
the URL printed once listening, a busy port refused before anything starts, Ctrl-C
without a traceback, and `make run` installing the service alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .helpers import ROOT, free_port
from .test_cli import cli_env


def serve(db: Path, port: int, log_format: str = "json") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "progress_sse", "serve", "--port", str(port), "--db", str(db)],
        cwd=ROOT, env={**cli_env(), "PROGRESS_SSE_LOG_FORMAT": log_format},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C's default action, whatever the test runner's parent ignores
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def healthy(port: int, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("the service did not become healthy")


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_serve_prints_its_url_and_ends_on_ctrl_c_without_a_traceback(
        tmp_path: Path, log_format: str) -> None:
    """The URL is said once the service listens (a line for a person, a log event in a
    JSON log, which stays all JSON); Ctrl-C (SIGINT) stops it cleanly, exit 0: uvicorn
    raised the signal again after its shutdown, a KeyboardInterrupt traceback at the end
    of every `make run`."""
    port = free_port()
    proc = serve(tmp_path / "p.db", port, log_format)
    try:
        healthy(port)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert proc.returncode == 0
    if log_format == "console":
        assert f"progress-sse: serving http://127.0.0.1:{port} " in err
        return
    lines = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    assert {"event": "service.listening", "url": f"http://127.0.0.1:{port}"}.items() \
        <= next(e for e in lines if e["event"] == "service.listening").items()
    assert any(e["event"] == "service.stopped" for e in lines)


def test_a_busy_port_is_refused_before_the_service_starts(tmp_path: Path) -> None:
    """A port in use: one line saying so and how to pick another, exit 2, and neither
    `service.started` nor a database file (it used to log the start, then fail)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve(tmp_path / "busy.db", port)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2, err
    assert f"cannot listen on 127.0.0.1:{port}: it is in use" in err
    assert f"--port {port + 1}" in err
    assert "service.started" not in err and "Traceback" not in err
    assert not (tmp_path / "busy.db").exists()


def test_make_run_installs_the_service_alone(tmp_path: Path) -> None:
    """On a fresh clone `make run` installs the package without its test and lint
    extras (playwright, schemathesis, mypy, ruff); `make test` installs them."""
    venv = str(tmp_path / "venv")

    def plan(target: str) -> str:
        return subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, text=True,
                              capture_output=True, check=True,
                              env={**os.environ, "MAKEFLAGS": ""}).stdout

    run = plan("run")
    installs = [line for line in run.splitlines() if "pip install" in line]
    assert installs and all("[" not in line for line in installs), run
    assert f"{venv}/bin/progress-sse serve" in run
    assert any("'.[test,lint,postgres,celery,arq]'" in line
               for line in plan("test").splitlines())


def test_a_postgresql_dsn_without_the_driver_is_a_message_not_a_traceback() -> None:
    """`make run` installs the service without asyncpg (the `postgres` extra): a DSN then
    says what to install, with exit 2, before anything is served."""
    code = ("import sys; sys.modules['asyncpg'] = None; from progress_sse.cli import main; "
            "sys.exit(main(['serve', '--db', 'postgresql://postgres@127.0.0.1/none', "
            "'--port', '0']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert done.returncode == 2, done
    assert "pip install 'progress-sse[postgres]'" in done.stderr
    assert "Traceback" not in done.stderr

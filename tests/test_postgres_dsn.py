"""A DSN's password never reaches the output of `progress-sse serve` or `migrate`: the
start-up log, the "serving" line and the messages name the database with the password
as `***` (postgres_schema.redacted)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT, free_port
from .pg import dsn_for, module_fixture
from .test_cli import cli_env
from .test_serve_cli import healthy

module_database = module_fixture()
SECRET = "s3cret-Pa55word"


def with_password(dsn: str) -> str:
    """The DSN with a password (trust auth: the server accepts any)."""
    return dsn.replace("://postgres@", f"://postgres:{SECRET}@", 1)


def run(args: list[str], log_format: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "progress_sse", *args], cwd=ROOT,
        env={**cli_env(), "PROGRESS_SSE_LOG_FORMAT": log_format},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_serve_never_prints_the_password(pg_dsn: str, log_format: str) -> None:
    dsn = with_password(pg_dsn)
    assert SECRET in dsn
    port = free_port()
    proc = run(["serve", "--port", str(port), "--db", dsn, "--log-level", "debug"],
               log_format)
    try:
        healthy(port)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "service.started" in err and "postgres:***@" in err, err  # said, redacted
    assert SECRET not in err + out


def test_migrate_and_a_refused_connection_never_print_the_password(pg_dsn: str) -> None:
    proc = run(["migrate", "--db", with_password(pg_dsn)], "console")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "postgres:***@" in out and SECRET not in out + err
    nobody = with_password(dsn_for("nowhere", free_port()))  # nothing listens there
    proc = run(["serve", "--port", str(free_port()), "--db", nobody], "console")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "postgres:***@" in err, err
    assert SECRET not in out + err


def test_redacted_keeps_what_has_no_password() -> None:
    from progress_sse.store.postgres_schema import redacted

    assert redacted(f"postgresql://u:{SECRET}@h:5/d") == "postgresql://u:***@h:5/d"
    assert redacted("postgresql://u@h/d") == "postgresql://u@h/d"
    assert redacted(str(Path("/tmp/progress.db"))) == "/tmp/progress.db"

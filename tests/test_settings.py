"""One definition of the settings (issue 17): every field of Settings is an environment
variable and a `serve` flag, a flag wins over the variable, the variable over the
default, and a bad value is refused with a message naming where it came from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import httpx
import pytest

from progress_sse.cli import build_parser
from progress_sse.cli.service import settings_of
from progress_sse.errors import ConfigError
from progress_sse.settings import ENV_ONLY, Settings, env_var, flag

from .helpers import ROOT, ProcessService, free_port
from .test_cli import cli_env

SECRET = "s" * 40
TEXT = {"host": "localhost", "auth": "jwt", "cors_origins": "https://a.example",
        "webhook_url": "https://hooks.example/progress", "webhook_origins": "https://a.example",
        "webhook_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "smtp_url": "smtp://user:pass@127.0.0.1:2525", "smtp_from": "progress@example.com",
        "public_url": "https://progress.example"}


def other_value(name: str) -> Any:
    """A valid value of the field that is not its default."""
    field = Settings.model_fields[name]
    kind, default = field.annotation, field.default
    if kind is bool:
        return not default
    if get_origin(kind) is Literal:
        return next(choice for choice in get_args(kind) if choice != default)
    if kind is int:
        return default + 1
    if kind is float:
        return default + 1.5
    return TEXT.get(name, f"x-{name}")


def as_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_every_field_is_a_variable_and_a_serve_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each field set through its variable alone, then through its flag alone, comes out
    as given; only the secrets have no flag (a flag's value shows in ps)."""
    assert ENV_ONLY == {"jwt_secret", "webhook_secret", "smtp_url"}
    for name in Settings.model_fields:
        value = other_value(name) if name != "jwt_secret" else SECRET
        with monkeypatch.context() as env:
            env.setenv(env_var("jwt_secret"), SECRET)  # so that auth=jwt is valid
            if name == "smtp_url":  # mail needs a From address
                env.setenv(env_var("smtp_from"), TEXT["smtp_from"])
            if name in ("webhook_url", "webhook_origins"):  # webhooks need their secret
                env.setenv(env_var("webhook_secret"), TEXT["webhook_secret"])
            env.setenv(env_var(name), as_text(value))
            assert getattr(Settings.load(), name) == value, env_var(name)
        if name in ENV_ONLY:
            continue
        argv = ["serve", flag(name)] if value is True else \
            ["serve", f"--no-{flag(name)[2:]}"] if value is False else \
            ["serve", flag(name), as_text(value)]
        with monkeypatch.context() as env:
            env.setenv(env_var("jwt_secret"), SECRET)
            env.setenv(env_var("webhook_secret"), TEXT["webhook_secret"])
            assert getattr(settings_of(build_parser().parse_args(argv)), name) == value, argv
    help_text = subprocess.run(
        [sys.executable, "-m", "progress_sse", "serve", "--help"], cwd=ROOT, env=cli_env(),
        capture_output=True, text=True, check=True).stdout
    for name in Settings.model_fields:  # each variable is named in the help
        assert env_var(name) in "".join(help_text.split()), name
        assert (f"{flag(name)} " in help_text) == (name not in ENV_ONLY), name


def test_the_spellings_people_use_still_work() -> None:
    """The flags the README and the tests use keep their names."""
    args = build_parser().parse_args(
        ["serve", "--host", "::1", "--port", "9", "--db", "x.db", "--keepalive", "3",
         "--retry-ms", "250", "--log-format", "json", "--log-level", "debug",
         "--synchronous", "FULL", "--write-timeout", "2", "--insecure"])
    s = settings_of(args)
    assert (s.host, s.port, s.db, s.keepalive_s, s.retry_ms, s.log_format, s.log_level,
            s.synchronous, s.write_timeout_s, s.insecure) == \
        ("::1", 9, "x.db", 3.0, 250, "json", "debug", "FULL", 2.0, True)
    assert settings_of(build_parser().parse_args(["migrate", "--db", "m.db"])).db == "m.db"


@pytest.mark.parametrize(("name", "argv", "env_value", "from_env", "from_flag"), [
    ("keepalive_s", ["--keepalive", "2.5"], "7", 7.0, 2.5),
    ("tail_size", ["--tail-size", "64"], "32", 32, 64),
    ("insecure", ["--no-insecure"], "1", True, False),
])
def test_a_flag_wins_over_the_variable_which_wins_over_the_default(
        monkeypatch: pytest.MonkeyPatch, name: str, argv: list[str], env_value: str,
        from_env: Any, from_flag: Any) -> None:
    def value(*flags: str) -> Any:
        return getattr(settings_of(build_parser().parse_args(["serve", *flags])), name)

    assert value() == Settings.model_fields[name].default
    monkeypatch.setenv(env_var(name), env_value)
    assert value() == from_env
    assert value(*argv) == from_flag


def test_the_real_command_takes_flag_over_variable_over_default(tmp_path: Path) -> None:
    """`progress-sse serve` as users run it: --port beats PROGRESS_SSE_PORT, and
    PROGRESS_SSE_RETRY_MS beats the default 1000 in what streams ask clients for."""
    busy = free_port()  # where the variable says; the flag's port is where it must listen
    svc = ProcessService(str(tmp_path / "p.db"), free_port(),
                         env={**cli_env(), "PROGRESS_SSE_PORT": str(busy),
                              "PROGRESS_SSE_RETRY_MS": "250"})
    svc.start()  # with --port: healthy on svc.port, or it raises
    try:
        with httpx.stream("GET", svc.url + "/api/events", timeout=10) as answer:
            first = next(answer.iter_bytes())
        assert b"retry: 250\n" in first, first
    finally:
        svc.signal(15)
        svc.wait()


@pytest.mark.parametrize(("env", "argv", "said"), [
    ({"PROGRESS_SSE_KEEPALIVE_S": "soon"}, [],
     "PROGRESS_SSE_KEEPALIVE_S='soon': input should be a valid number"),
    ({"PROGRESS_SSE_TAIL_SIZE": "8"}, [],
     "PROGRESS_SSE_TAIL_SIZE='8': input should be greater than or equal to 16 (tail_size)"),
    ({"PROGRESS_SSE_LOG_LEVEL": "loud"}, [], "PROGRESS_SSE_LOG_LEVEL='loud': input should be"),
    ({"PROGRESS_SSE_INSECURE": "maybe"}, [], "PROGRESS_SSE_INSECURE='maybe'"),
    ({"PROGRESS_SSE_JWT_SECRET": "short"}, [], "at least 32 bytes"),
    ({}, ["--write-timeout", "0"], "--write-timeout 0.0: input should be greater than 0"),
])
def test_a_bad_value_is_refused_naming_where_it_came_from(
        tmp_path: Path, env: dict[str, str], argv: list[str], said: str) -> None:
    """Exit 2, one line naming the variable (or flag) and what is wrong, no traceback,
    and nothing started: no database file."""
    db = tmp_path / "p.db"
    done = subprocess.run(
        [sys.executable, "-m", "progress_sse", "serve", "--port", str(free_port()),
         "--db", str(db), *argv], cwd=ROOT, env={**cli_env(), **env},
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("progress-sse: ") and said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "short" not in done.stderr.replace(said, "")
    assert not db.exists()


def test_settings_read_no_environment_until_built() -> None:
    """Nothing is read at import: a variable there at import but gone since counts for
    nothing, one set after import counts, and keyword arguments win over it."""
    script = (
        "import os\n"
        "from progress_sse.settings import Settings\n"
        "del os.environ['PROGRESS_SSE_TAIL_SIZE']\n"
        "assert Settings().tail_size == 4096, Settings().tail_size\n"
        "os.environ['PROGRESS_SSE_TAIL_SIZE'] = '99'\n"
        "assert Settings().tail_size == 99 and Settings(tail_size=17).tail_size == 17\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, env={**cli_env(), "PROGRESS_SSE_TAIL_SIZE": "50"})
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("env", "said"), [
    ({"PROGRESS_SSE_SMTP_URL": "http://u:hunter2@mail.example"},
     "PROGRESS_SSE_SMTP_URL: the SMTP URL must start with smtp:// or smtps://, not http:"),
    ({"PROGRESS_SSE_SMTP_URL": "smtp://u:hunter2@mail.example:99999"},
     "PROGRESS_SSE_SMTP_URL: the SMTP URL is not a URL such as"),
    ({"PROGRESS_SSE_SMTP_URL": "smtp://u:hunter2@mail.example?verify=maybe"},
     "the SMTP URL's verify takes yes or no, not 'maybe'"),
    ({"PROGRESS_SSE_SMTP_URL": "smtp://u:hunter2@mail.example"},
     "PROGRESS_SSE_SMTP_URL needs a From address: set PROGRESS_SSE_SMTP_FROM (or --smtp-from)"),
    ({"PROGRESS_SSE_SMTP_URL": "smtp://u:hunter2@mail.example",
      "PROGRESS_SSE_SMTP_FROM": "progress at example"},
     "smtp_from: 'progress at example' is not a mail address such as name@example.com"),
    ({"PROGRESS_SSE_PUBLIC_URL": "progress.example"},
     "public_url: 'progress.example' is not a URL such as https://progress.example.com"),
])
def test_mail_settings_are_checked_at_start(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], said: str) -> None:
    """A bad SMTP URL, or mail with no From address, stops the service with a message
    that never shows the password."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        Settings.load()
    assert said in str(refused.value), refused.value
    assert "hunter2" not in str(refused.value)


def test_good_mail_settings_start() -> None:
    """The usual forms are taken, and the server is parsed once, as configured."""
    settings = Settings.load(smtp_from="Progress <progress@example.com>",
                             public_url="https://progress.example/dash/")
    assert settings.smtp_server is None
    settings = Settings(smtp_url="smtps://bot%40example.com:p%3Ass@mail.example",
                        smtp_from="progress@example.com")
    settings.validate_email()
    server = settings.smtp_server
    assert server is not None and (server.host, server.port, server.implicit_tls,
                                   server.username, server.password) == \
        ("mail.example", 465, True, "bot@example.com", "p:ss")

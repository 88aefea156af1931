"""The commands that run beside the database: serve, migrate, check and token.

`serve`'s flags are built from the fields of `Settings`: each field's name gives the
flag (settings.flag), its type the argparse type or choices, its description the help,
and its default and environment variable are shown in it. A flag left out is None, so
`Settings.load` falls back to the environment, then the default.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterable
from typing import Any, Literal, get_args, get_origin

from ..logs import configure_logging
from ..settings import ENV_ONLY, Settings, env_var, flag, is_duration
from .common import Parser, UsageError


def add_setting_flags(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """One option per named field of Settings, with the field's type, help and default."""
    for name in names:
        field = Settings.model_fields[name]
        kind = field.annotation
        shown = "" if field.default in ("", None, False) else f"default {field.default}; "
        options: dict[str, Any] = {
            "dest": name, "default": None,
            "help": f"{field.description} ({shown}${env_var(name)})".replace("%", "%%")}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            options["choices"] = get_args(kind)
        elif is_duration(name):
            options["type"] = str
            options["metavar"] = "DURATION"
        else:
            options["type"] = kind if kind in (int, float) else str
            if name.endswith("_s"):
                options["metavar"] = "SECONDS"
            elif name.endswith("_ms"):
                options["metavar"] = "MS"
            elif name.endswith("_bytes"):
                options["metavar"] = "BYTES"
            elif kind is int:
                options["metavar"] = "N"
        parser.add_argument(flag(name), **options)


def settings_of(args: argparse.Namespace) -> Settings:
    """The flags given on the command line over the environment over the defaults."""
    return Settings.load(**{name: getattr(args, name, None) for name in Settings.model_fields})


def cmd_serve(args: argparse.Namespace) -> int:
    from ..app import create_app
    from ..server import PortInUse, bind, make_server, tune_collector
    from ..store.factory import prepare
    from ..store.postgres_schema import redacted

    settings = settings_of(args)
    configure_logging(settings.log_format, settings.log_level)
    settings.validate_all()  # before the database is touched (create_app checks too)
    try:
        sockets = bind(settings.host, settings.port)  # before the database and the log
    except PortInUse as exc:
        print(f"progress-sse serve: {exc}. Stop what is using it, or choose another "
              f"port: --port {settings.port + 1} (make run PORT={settings.port + 1})",
              file=sys.stderr)
        return 2
    port = sockets[0].getsockname()[1]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    try:
        # here, not in the server's start-up, so a refusal is a message, not a traceback
        with prepare(settings.db) as lock:
            server = make_server(create_app(settings, lock=lock), settings)
            server.announce = (f"http://{host}:{port}", redacted(settings.db))
            tune_collector()
            server.run(sockets=sockets)
    except KeyboardInterrupt:
        # uvicorn stops gracefully on Ctrl-C, then raises the signal again for the
        # default action: that is the traceback `make run` ended with
        return 0
    finally:
        for sock in sockets:
            sock.close()
    return 0 if server.started else 1


def cmd_token(args: argparse.Namespace) -> int:
    """Mint a signed viewer/producer token with the service's secret."""
    from ..auth import mint_token
    from ..settings import parse_duration

    settings = Settings.load()
    secret = settings.jwt_secret
    if not secret:
        raise UsageError(f"set {env_var('jwt_secret')} to the service's signing secret")
    try:
        print(mint_token(secret, args.sub, args.scope, parse_duration(args.ttl),
                         issuer=settings.jwt_issuer, audience=settings.jwt_audience))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from ..store.guard import MIGRATE_HINT, migrate
    from ..store.lock import DatabaseLock
    from ..store.postgres_schema import is_postgres, redacted
    from ..store.postgres_schema import migrate as migrate_postgres

    settings = settings_of(args)
    configure_logging(settings.log_format, settings.log_level)
    if is_postgres(settings.db):  # safe beside running instances (postgres_schema.py)
        applied = asyncio.run(migrate_postgres(settings.db))
        print(f"{redacted(settings.db)}: applied {applied or 'nothing (up to date)'}")
        return 0
    with DatabaseLock.acquire(settings.db, hint=MIGRATE_HINT):  # not under a running service
        applied = migrate(settings.db)
    print(f"{settings.db}: applied {applied or 'nothing (up to date)'}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """SQLite's integrity check, read-only (the service may run): 0 ok, 1 damaged,
    2 no such file."""
    from ..store.guard import integrity_problems

    try:
        problems = integrity_problems(args.db, quick=args.quick)
    except FileNotFoundError:
        print(f"progress-sse check: no database file at {os.path.abspath(args.db)}",
              file=sys.stderr)
        return 2
    if not problems:
        print("ok")
        return 0
    print("\n".join(problems))
    print(f"progress-sse check: {os.path.abspath(args.db)} is damaged "
          f"({len(problems)} problem{'s' if len(problems) > 1 else ''} above). Restore it "
          "from a backup, or move it aside (with its -wal and -shm files) to start with an "
          "empty database.", file=sys.stderr)
    return 1


def add_service_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    serve = sub.add_parser(
        "serve", help="run the service",
        description="Run the service. Every setting is a flag here or an environment "
        "variable (shown in its help); a flag wins over the variable, which wins over the "
        f"default. {', '.join(map(env_var, sorted(ENV_ONLY)))} have no flag: other users "
        "could read them in ps.")
    add_setting_flags(serve, (name for name in Settings.model_fields if name not in ENV_ONLY))
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="mint a viewer/producer token (needs the secret)")
    token.add_argument("--sub", required=True, help="the subject: owner of the jobs")
    token.add_argument("--scope", default="read,create", help="read, create, admin (comma list)")
    token.add_argument("--ttl", default="1h", help="lifetime: 3600, 15m, 1h, 7d (default 1h)")
    token.set_defaults(func=cmd_token)

    migrate = sub.add_parser("migrate", help="apply database migrations and exit")
    add_setting_flags(migrate, ["db"])
    migrate.set_defaults(func=cmd_migrate)

    check = sub.add_parser("check", help="check the database file's integrity (read-only)",
                           description="Run SQLite's integrity check on the file, read-only "
                           "(the service may be running). Prints ok and exits 0, or the "
                           "problems and exits 1; 2 when there is no such file.")
    default_db = Settings.model_fields["db"].default
    check.add_argument("--db", default=os.environ.get(env_var("db"), default_db),
                       help=f"SQLite file (default ${env_var('db')} or ./{default_db})")
    check.add_argument("--quick", action="store_true",
                       help="PRAGMA quick_check: faster, skips checking indexes against tables")
    check.set_defaults(func=cmd_check)

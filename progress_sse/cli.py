"""Command line: serve, migrate (and the worker and viewer tools)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import structlog

from .errors import ConfigError
from .logs import configure_logging
from .settings import Settings

log = structlog.get_logger("progress_sse.cli")


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        os.environ,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        db=getattr(args, "db", None),
        keepalive_s=getattr(args, "keepalive", None),
        log_format=getattr(args, "log_format", None),
        log_level=getattr(args, "log_level", None),
        synchronous=getattr(args, "synchronous", None),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import create_app
    from .server import make_server

    settings = _settings(args)
    configure_logging(settings.log_format, settings.log_level)
    server = make_server(create_app(settings), settings)
    server.run()
    return 0 if server.started else 1


def cmd_migrate(args: argparse.Namespace) -> int:
    from .migrations import migrate_sqlite

    settings = _settings(args)
    configure_logging(settings.log_format, settings.log_level)
    applied = migrate_sqlite(settings.db)
    print(f"{settings.db}: applied {applied or 'nothing (up to date)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="progress-sse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8000)")
    serve.add_argument("--db", help="SQLite file (default ./progress.db)")
    serve.add_argument("--keepalive", type=float, help="seconds between keep-alive comments")
    serve.add_argument("--log-format", choices=["auto", "json", "console"])
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--synchronous", choices=["NORMAL", "FULL"],
                       help="SQLite durability: NORMAL survives a process crash, FULL a power cut")
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations and exit")
    migrate.add_argument("--db", help="SQLite file (default ./progress.db)")
    migrate.set_defaults(func=cmd_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"progress-sse: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())

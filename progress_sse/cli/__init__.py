"""Command line: serve, migrate, check, and the worker and viewer tools (watch, post, demo).

Exit codes of the tools, so shell scripts can branch on them:
0 succeeded (or done), 1 the job failed, 2 the job was cancelled, 3 a cancel is
requested (post), 4 a pause is requested (post), 5 the service refused or could not
be reached, 64 bad command line, 130 interrupted. `check`: 0 ok, 1 damaged, 2 no
such file; `serve` and `migrate` exit 2 on a refusal (a database in use or damaged).
`run` exits with its command's status (128+N when a signal N ended it, 143 or more
after a cancel), or 125 when it could not create the job (the command did not run),
126 when the command cannot be executed, 127 when it is not found.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import ConfigError
from .common import EXIT_USAGE, Parser, UsageError
from .jobs import add_job_commands
from .service import add_service_commands


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="progress-sse", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_service_commands(sub)
    add_job_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"progress-sse: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"progress-sse {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())

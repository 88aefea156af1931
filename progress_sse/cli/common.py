"""What every command shares: exit codes, the parser that exits 64 on a usage error,
asyncio with SIGTERM as Ctrl-C, and the argument types and options of the HTTP tools."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn

EXIT_CANCEL_REQUESTED = 3
EXIT_PAUSE_REQUESTED = 4
EXIT_SERVICE_ERROR = 5
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 64: 2 means "cancelled" to `watch`'s callers."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """A command line that parses but makes no sense."""


def run_async(main: Coroutine[Any, Any, int]) -> int:
    """asyncio.run, with SIGTERM treated like Ctrl-C: workers end their jobs as cancelled."""

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main

    return asyncio.run(guarded())


def json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text[:60]!r}") from None


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def service_args(parser: argparse.ArgumentParser) -> None:
    """--url and --token of the tools that call the service."""
    parser.add_argument("--url", default=os.environ.get("PROGRESS_SSE_URL"),
                        help="the service (default $PROGRESS_SSE_URL or http://127.0.0.1:8000)")
    parser.add_argument("--token", default=os.environ.get("PROGRESS_SSE_TOKEN"),
                        help="sent as 'Authorization: Bearer' (default $PROGRESS_SSE_TOKEN)")

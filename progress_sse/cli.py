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
import asyncio
import json
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from .errors import ConfigError
from .logs import configure_logging
from .settings import Settings

if TYPE_CHECKING:
    from .client import Control, ProgressClient

log = structlog.get_logger("progress_sse.cli")

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


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        os.environ,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        db=getattr(args, "db", None),
        keepalive_s=getattr(args, "keepalive", None),
        retry_ms=getattr(args, "retry_ms", None),
        log_format=getattr(args, "log_format", None),
        log_level=getattr(args, "log_level", None),
        synchronous=getattr(args, "synchronous", None),
        write_timeout_s=getattr(args, "write_timeout", None),
        insecure=True if getattr(args, "insecure", False) else None,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import create_app
    from .server import PortInUse, bind, make_server, tune_collector
    from .store.factory import prepare
    from .store.postgres_schema import redacted

    settings = _settings(args)
    configure_logging(settings.log_format, settings.log_level)
    settings.validate_security()  # before the database is touched (create_app checks too)
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
    from .auth import mint_token, parse_duration

    settings = Settings.from_env(os.environ)
    secret = settings.jwt_secret
    if not secret:
        raise UsageError("set PROGRESS_SSE_JWT_SECRET to the service's signing secret")
    try:
        print(mint_token(secret, args.sub, args.scope, parse_duration(args.ttl),
                         issuer=settings.jwt_issuer, audience=settings.jwt_audience))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from .store.guard import MIGRATE_HINT, migrate
    from .store.lock import DatabaseLock
    from .store.postgres_schema import is_postgres, redacted
    from .store.postgres_schema import migrate as migrate_postgres

    settings = _settings(args)
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
    from .store.guard import integrity_problems

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


def run_async(main: Coroutine[Any, Any, int]) -> int:
    """asyncio.run, with SIGTERM treated like Ctrl-C: workers end their jobs as cancelled."""

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main

    return asyncio.run(guarded())


def cmd_watch(args: argparse.Namespace) -> int:
    from .watch import watch

    if (args.job is None) == (not args.all):
        raise UsageError("name one JOB, or give --all")
    stopped = 0 if args.all else EXIT_INTERRUPTED
    try:
        return run_async(watch(url=args.url, token=args.token, job_id=args.job,
                               kinds=args.kind or (), as_json=args.json,
                               give_up_s=args.give_up_after))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return stopped
    except BrokenPipeError:
        # the reader left (`watch --all | head`): stop as on Ctrl-C; stdout now points
        # nowhere, so the interpreter's own flush at exit cannot fail with a traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return stopped


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    opts = DemoOptions(url=args.url, token=args.token, jobs=args.jobs, once=args.once,
                       speed=args.speed, fail_rate=args.fail_rate, seed=args.seed)
    try:
        return run_async(run_demo(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0


def cmd_post(args: argparse.Namespace) -> int:
    """One shell-worker step: post what was given, print the control state, exit by it."""
    from .client import Control, JobFinishedError, ProgressClient, ProgressClientError, clock_seq

    fields = _progress_fields(args)
    seq = args.seq if args.seq is not None else clock_seq()
    try:
        with ProgressClient(args.url, token=args.token, max_rate=None) as pc:
            posts = _posts(args, fields)
            answer: dict[str, Any] = {}
            try:
                for i, (what, body) in enumerate(posts):
                    stamp = {"seq": seq + i} if what != "heartbeat" else {}
                    answer = pc.post_worker(args.job, what,
                                            {**body, **stamp, **_attempt(args)})
            except JobFinishedError:
                answer = pc.request("GET", f"/api/jobs/{args.job}")
                if answer["job"]["status"] != "cancelled":
                    raise
                answer["control"]["cancel_requested"] = True  # stop: it was cancelled
            control = Control.from_dict(answer["control"])
            if args.checkpoint and control.pause_requested and not control.cancel_requested:
                control = _wait_while_paused(pc, args, seq + len(posts))
    except ProgressClientError as exc:
        print(f"progress-sse post: {exc}", file=sys.stderr)
        return EXIT_SERVICE_ERROR
    print(json.dumps(control.as_dict()))
    if control.cancel_requested:
        return EXIT_CANCEL_REQUESTED
    return EXIT_PAUSE_REQUESTED if control.pause_requested else 0


def _progress_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields = {k: getattr(args, k) for k in ("progress", "current", "total", "stage",
                                            "message", "data")}
    if args.paused:
        fields["paused"] = True
    return {k: v for k, v in fields.items() if v is not None}


def _posts(args: argparse.Namespace, fields: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Progress, then the log line, then the finish; a bare `post JOB` is a heartbeat."""
    posts: list[tuple[str, dict[str, Any]]] = []
    if fields:
        posts.append(("progress", fields))
    if args.log is not None:
        posts.append(("log", {"level": args.level, "message": args.log}))
    if args.finish is not None:
        body = {"status": args.finish, "error": args.error, "result": args.result}
        posts.append(("finish", {k: v for k, v in body.items() if v is not None}))
    return posts or [("heartbeat", {})]


def _attempt(args: argparse.Namespace) -> dict[str, int]:
    return {"attempt": args.attempt} if args.attempt is not None else {}


def _wait_while_paused(pc: ProgressClient, args: argparse.Namespace, seq: int) -> Control:
    """Acknowledge the pause, long-poll until it is lifted or a cancel comes, say so."""
    from .client import LONG_POLL_S, Control

    pc.post_worker(args.job, "progress", {"paused": True, "seq": seq, **_attempt(args)})
    control = pc.control(args.job, wait=LONG_POLL_S, pause_requested=True)
    while control.pause_requested and not control.cancel_requested \
            and control.status not in ("succeeded", "failed", "cancelled"):
        control = pc.control(args.job, wait=LONG_POLL_S, pause_requested=True)
    if not control.cancel_requested:
        answer = pc.post_worker(args.job, "progress",
                                {"paused": False, "seq": seq + 1, **_attempt(args)})
        control = Control.from_dict(answer["control"])
    return control


def cmd_create(args: argparse.Namespace) -> int:
    """Create a job for a shell worker: print its id and worker token."""
    from .client import ProgressClient, ProgressClientError

    stages = [s for s in (args.stages or "").split(",") if s] or None
    try:
        with ProgressClient(args.url, token=args.token, max_rate=None) as pc:
            created = pc.create(kind=args.kind, title=args.title, id=args.id, stages=stages,
                                total=args.total,
                                heartbeat_timeout_s=args.heartbeat_timeout)
    except ProgressClientError as exc:
        print(f"progress-sse create: {exc}", file=sys.stderr)
        return EXIT_SERVICE_ERROR
    if created.worker_token is None:
        print(f"progress-sse create: job {created.id} already exists; its worker token was "
              "given only when it was created", file=sys.stderr)
        return EXIT_SERVICE_ERROR
    if args.json:
        print(json.dumps({"id": created.id, "worker_token": created.worker_token,
                          "job": created.job}))
    else:
        print(created.id, created.worker_token)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import RunOptions
    from .runner import main as run_main

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("name the command to run: progress-sse run [OPTIONS] -- CMD ARGS...")
    opts = RunOptions(command=command, url=args.url, token=args.token, kind=args.kind,
                      title=args.title, heartbeat_timeout_s=args.heartbeat_timeout,
                      grace_s=args.grace, log_rate=args.log_rate,
                      stderr_level=args.stderr_level, pause=not args.no_pause)
    try:
        return run_main(opts)
    except KeyboardInterrupt:  # before the command started: nothing to pass it on to
        return EXIT_INTERRUPTED


class UsageError(Exception):
    """A command line that parses but makes no sense."""


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text[:60]!r}") from None


def _service_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("PROGRESS_SSE_URL"),
                        help="the service (default $PROGRESS_SSE_URL or http://127.0.0.1:8000)")
    parser.add_argument("--token", default=os.environ.get("PROGRESS_SSE_TOKEN"),
                        help="sent as 'Authorization: Bearer' (default $PROGRESS_SSE_TOKEN)")


def _add_watch(sub: argparse._SubParsersAction[Parser]) -> None:
    watch = sub.add_parser("watch", help="live progress bars for a job (or --all)",
                           description="Follow a job live; the exit code is its outcome: "
                           "0 succeeded, 1 failed, 2 cancelled (5 service error).")
    watch.add_argument("job", nargs="?", help="the job id")
    watch.add_argument("--all", action="store_true", help="every job you can see, until Ctrl-C")
    watch.add_argument("--kind", action="append", help="with --all: only this kind (repeatable)")
    watch.add_argument("--json", action="store_true",
                       help="print each event's data as one JSON object per line (NDJSON)")
    watch.add_argument("--give-up-after", type=float, default=60.0, metavar="SECONDS",
                       help="stop retrying after this long unreachable (0: never; default 60)")
    _service_args(watch)
    watch.set_defaults(func=cmd_watch)


def _add_post(sub: argparse._SubParsersAction[Parser]) -> None:
    post = sub.add_parser(
        "post", help="report progress from a shell worker",
        description="Post progress, a log line and/or the finish, then print the control "
        "state. Exit 0, or 3 when a cancel is requested (or the job was cancelled), 4 when "
        "a pause is requested "
        "(with --checkpoint: wait while paused instead), 5 on a service error. "
        "With no fields it sends a heartbeat.")
    post.add_argument("job", help="the job id")
    post.add_argument("--progress", type=float, help="percent (of the current stage), 0-100")
    post.add_argument("--current", type=float, help="items done (with --total)")
    post.add_argument("--total", type=float, help="items in all (of the current stage)")
    post.add_argument("--stage", help="the stage now running (a declared stage key)")
    post.add_argument("--message", help="what is happening now")
    post.add_argument("--data", type=_json_arg, help="a JSON value shown with the job")
    post.add_argument("--paused", action="store_true", help="acknowledge a pause request")
    post.add_argument("--log", metavar="LINE", help="add a log line")
    post.add_argument("--level", default="info", choices=["debug", "info", "warning", "error"])
    post.add_argument("--finish", choices=["succeeded", "failed", "cancelled"])
    post.add_argument("--error", help="with --finish failed: what went wrong")
    post.add_argument("--result", type=_json_arg, help="with --finish: a JSON result")
    post.add_argument("--checkpoint", action="store_true",
                      help="if a pause is requested, wait until resumed (exit 3 on cancel)")
    post.add_argument("--attempt", type=int, help="the job attempt this worker runs")
    post.add_argument("--seq", type=int,
                      help="idempotency sequence number (default: from the clock)")
    _service_args(post)
    post.set_defaults(func=cmd_post)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def _add_create(sub: argparse._SubParsersAction[Parser]) -> None:
    create = sub.add_parser(
        "create", help="create a job for a shell worker; print its id and worker token",
        description="Create a job and print its id and worker token on one line, "
        "separated by a space: read -r JOB TOKEN <<< \"$(progress-sse create ...)\". "
        "Exit 5 on a service error.")
    create.add_argument("--kind", default="job", help="the job's kind (default job)")
    create.add_argument("--title", default="", help="what people see on the dashboard")
    create.add_argument("--id", help="choose the id (letters, digits, _ . : -)")
    create.add_argument("--stages", metavar="KEY,KEY", help="the stages, in order")
    create.add_argument("--total", type=float, help="items in all")
    create.add_argument("--heartbeat-timeout", type=_positive, metavar="SECONDS",
                        help="silence before the running job is shown stalled")
    create.add_argument("--json", action="store_true",
                        help="print {id, worker_token, job} as JSON instead")
    _service_args(create)
    create.set_defaults(func=cmd_create)


def _add_run(sub: argparse._SubParsersAction[Parser]) -> None:
    run = sub.add_parser(
        "run", help="run a command as a tracked job",
        description="Run CMD as a job: its output lines become the job's log, its exit "
        "status the outcome (0 succeeded, else failed with the last lines of stderr). "
        "It sees $PROGRESS_SSE_JOB, $PROGRESS_SSE_WORKER_TOKEN and $PROGRESS_SSE_URL. "
        "A cancel sends SIGTERM to it and its children, SIGKILL after --grace; a pause "
        "stops them (SIGSTOP) until resumed. Exits with CMD's status; 125 when the job "
        "could not be created (CMD did not run), 126/127 when CMD cannot be run.")
    run.add_argument("--kind", default="command", help="the job's kind (default command)")
    run.add_argument("--title", help="the job's title (default: the command line)")
    run.add_argument("--grace", type=_positive, default=10.0, metavar="SECONDS",
                     help="after a cancel's SIGTERM, wait this long before SIGKILL (default 10)")
    run.add_argument("--log-rate", type=_positive, default=10.0, metavar="LINES",
                     help="output lines posted per second at most, with bursts of 5 s worth; "
                     "the rest are counted in the log (default 10)")
    run.add_argument("--stderr-level", default="warning",
                     choices=["debug", "info", "warning", "error"],
                     help="log level of stderr lines (stdout lines are info; default warning)")
    run.add_argument("--heartbeat-timeout", type=_positive, metavar="SECONDS",
                     help="the job's silence before it is shown stalled (run heartbeats "
                     "three times in it)")
    run.add_argument("--no-pause", action="store_true",
                     help="ignore pause requests instead of stopping the command (SIGSTOP)")
    _service_args(run)
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                     help="the command and its arguments")
    run.set_defaults(func=cmd_run)


def _add_demo(sub: argparse._SubParsersAction[Parser]) -> None:
    demo = sub.add_parser("demo", help="simulated workers, to see jobs move",
                          description="Simulated workers run realistic multi-stage jobs "
                          "(some fail; all obey cancel and pause) until Ctrl-C.")
    demo.add_argument("--jobs", type=int, default=4, help="concurrent workers (default 4)")
    demo.add_argument("--once", action="store_true", help="each worker runs one job, then exit")
    demo.add_argument("--speed", type=float, default=1.0, help="time multiplier (default 1)")
    demo.add_argument("--fail-rate", type=float, default=0.15,
                      help="share of jobs that fail (default 0.15)")
    demo.add_argument("--seed", type=int, help="random seed, for a repeatable demo")
    _service_args(demo)
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="progress-sse", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8000)")
    serve.add_argument("--db", help="SQLite file (default ./progress.db), or a postgresql:// DSN")
    serve.add_argument("--keepalive", type=float, help="seconds between keep-alive comments")
    serve.add_argument("--retry-ms", type=int, metavar="MS",
                       help="the reconnect delay streams ask clients for (default 1000)")
    serve.add_argument("--log-format", choices=["auto", "json", "console"])
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--synchronous", choices=["NORMAL", "FULL"],
                       help="SQLite durability: NORMAL survives a process crash, FULL a power cut")
    serve.add_argument("--write-timeout", type=float, metavar="SECONDS",
                       help="longest wait for a write to be confirmed, then 503 (default 5)")
    serve.add_argument("--insecure", action="store_true",
                       help="allow no authentication on a non-loopback address (not advised)")
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="mint a viewer/producer token (needs the secret)")
    token.add_argument("--sub", required=True, help="the subject: owner of the jobs")
    token.add_argument("--scope", default="read,create", help="read, create, admin (comma list)")
    token.add_argument("--ttl", default="1h", help="lifetime: 3600, 15m, 1h, 7d (default 1h)")
    token.set_defaults(func=cmd_token)

    migrate = sub.add_parser("migrate", help="apply database migrations and exit")
    migrate.add_argument("--db", help="SQLite file (default ./progress.db), or a postgresql:// DSN")
    migrate.set_defaults(func=cmd_migrate)

    check = sub.add_parser("check", help="check the database file's integrity (read-only)",
                           description="Run SQLite's integrity check on the file, read-only "
                           "(the service may be running). Prints ok and exits 0, or the "
                           "problems and exits 1; 2 when there is no such file.")
    check.add_argument("--db", default=os.environ.get("PROGRESS_SSE_DB", "progress.db"),
                       help="SQLite file (default $PROGRESS_SSE_DB or ./progress.db)")
    check.add_argument("--quick", action="store_true",
                       help="PRAGMA quick_check: faster, skips checking indexes against tables")
    check.set_defaults(func=cmd_check)

    _add_watch(sub)
    _add_post(sub)
    _add_create(sub)
    _add_run(sub)
    _add_demo(sub)
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

"""The tools that call the service over HTTP: watch and demo for people, and post,
create and run for shell workers."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from .common import (
    EXIT_CANCEL_REQUESTED,
    EXIT_INTERRUPTED,
    EXIT_PAUSE_REQUESTED,
    EXIT_SERVICE_ERROR,
    Parser,
    UsageError,
    json_arg,
    positive,
    run_async,
    service_args,
)

if TYPE_CHECKING:
    from ..client import Control, ProgressClient


def cmd_watch(args: argparse.Namespace) -> int:
    from ..watch import watch

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
    from ..demo import DemoOptions, run_demo

    opts = DemoOptions(url=args.url, token=args.token, jobs=args.jobs, once=args.once,
                       speed=args.speed, fail_rate=args.fail_rate, seed=args.seed)
    try:
        return run_async(run_demo(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0


def cmd_post(args: argparse.Namespace) -> int:
    """One shell-worker step: post what was given, print the control state, exit by it."""
    from ..client import Control, JobFinishedError, ProgressClient, ProgressClientError, clock_seq

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
    from ..client import LONG_POLL_S, Control

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
    from ..client import ProgressClient, ProgressClientError

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
    from ..runner import RunOptions
    from ..runner import main as run_main

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
    service_args(watch)
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
    post.add_argument("--data", type=json_arg, help="a JSON value shown with the job")
    post.add_argument("--paused", action="store_true", help="acknowledge a pause request")
    post.add_argument("--log", metavar="LINE", help="add a log line")
    post.add_argument("--level", default="info", choices=["debug", "info", "warning", "error"])
    post.add_argument("--finish", choices=["succeeded", "failed", "cancelled"])
    post.add_argument("--error", help="with --finish failed: what went wrong")
    post.add_argument("--result", type=json_arg, help="with --finish: a JSON result")
    post.add_argument("--checkpoint", action="store_true",
                      help="if a pause is requested, wait until resumed (exit 3 on cancel)")
    post.add_argument("--attempt", type=int, help="the job attempt this worker runs")
    post.add_argument("--seq", type=int,
                      help="idempotency sequence number (default: from the clock)")
    service_args(post)
    post.set_defaults(func=cmd_post)


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
    create.add_argument("--heartbeat-timeout", type=positive, metavar="SECONDS",
                        help="silence before the running job is shown stalled")
    create.add_argument("--json", action="store_true",
                        help="print {id, worker_token, job} as JSON instead")
    service_args(create)
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
    run.add_argument("--grace", type=positive, default=10.0, metavar="SECONDS",
                     help="after a cancel's SIGTERM, wait this long before SIGKILL (default 10)")
    run.add_argument("--log-rate", type=positive, default=10.0, metavar="LINES",
                     help="output lines posted per second at most, with bursts of 5 s worth; "
                     "the rest are counted in the log (default 10)")
    run.add_argument("--stderr-level", default="warning",
                     choices=["debug", "info", "warning", "error"],
                     help="log level of stderr lines (stdout lines are info; default warning)")
    run.add_argument("--heartbeat-timeout", type=positive, metavar="SECONDS",
                     help="the job's silence before it is shown stalled (run heartbeats "
                     "three times in it)")
    run.add_argument("--no-pause", action="store_true",
                     help="ignore pause requests instead of stopping the command (SIGSTOP)")
    service_args(run)
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
    service_args(demo)
    demo.set_defaults(func=cmd_demo)


def add_job_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    for add in (_add_watch, _add_post, _add_create, _add_run, _add_demo):
        add(sub)

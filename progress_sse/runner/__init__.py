"""`progress-sse run -- CMD ARGS...`: any program becomes a tracked job, unchanged.

The command runs as a child with the job's id, worker token and the service URL in its
environment ($PROGRESS_SSE_JOB, $PROGRESS_SSE_WORKER_TOKEN, $PROGRESS_SSE_URL), so it may
post progress itself. Its output still reaches the terminal; each line is also posted as
a `log` event (stdout at level info, stderr at --stderr-level), rate-limited. The job
is heartbeated while the command runs and finished by its exit status.

Choices that may look odd but are deliberate:

* The runner's own posts carry no `seq`. The service keeps one last `seq` per job, and
  a command that posts too (`progress-sse post`, the SDK) numbers its posts from the
  clock; numbered posts from two writers would refuse each other (409). A lost answer
  may thus store a log line twice, which is better than refusing the command's posts.
* The command starts in a session of its own, so a cancel reaches its children too
  (SIGTERM to the whole process group, SIGKILL to what is left after --grace). It has
  no controlling terminal; Ctrl-C, SIGTERM and SIGHUP sent to `run` are passed on.
* Output is read from pipes of our own, not asyncio's: a background grandchild that
  keeps them open must not keep the job running once the command itself has exited.
* A pause stops the command's process group (SIGSTOP) and a resume continues it
  (SIGCONT); `--no-pause` leaves it running and says so in the job's log.
* The service being unreachable never stops the command: log lines that cannot be
  posted are counted and reported later, and the finish is retried for a while.
* Its posts do not go through the SDK job's outbox: that outbox numbers every post
  (`seq`), which the first choice above rules out.

The package: `options` (what run was asked, and the text it makes of output lines),
`state` (what one run knows, its posts and the finish), `output` (pumps and the log
poster), `control` (heartbeat, cancel, pause, stopping the process group) and `run`
(the whole run, from creating the job to its outcome).
"""

from __future__ import annotations

import asyncio

from .options import (
    EXIT_CANNOT_EXECUTE,
    EXIT_NOT_FOUND,
    EXIT_RUN_ERROR,
    JOB_ENV,
    WORKER_TOKEN_ENV,
    RunOptions,
)
from .run import run_command


def main(opts: RunOptions) -> int:
    """Entry point for the CLI: the event loop around run_command."""
    return asyncio.run(run_command(opts))


__all__ = ["EXIT_CANNOT_EXECUTE", "EXIT_NOT_FOUND", "EXIT_RUN_ERROR", "JOB_ENV",
           "WORKER_TOKEN_ENV", "RunOptions", "main", "run_command"]

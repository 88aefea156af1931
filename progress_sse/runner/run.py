"""The whole run: create the job, start the command, wait for it, finish the job."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

from ..client import URL_ENV, AsyncProgressClient, ProgressClientError
from .control import _Control
from .options import (
    DRAIN_AFTER_EXIT_S,
    EXIT_CANNOT_EXECUTE,
    EXIT_NOT_FOUND,
    EXIT_RUN_ERROR,
    JOB_ENV,
    MAX_MESSAGE,
    WORKER_TOKEN_ENV,
    RunOptions,
    default_title,
    describe_exit,
    exit_code,
    say,
)
from .output import _Output


async def run_command(opts: RunOptions) -> int:
    """Create the job, run the command under it, finish it; the command's exit code."""
    async with AsyncProgressClient(opts.url, token=opts.token, max_rate=None,
                                   retries=3) as pc:
        title = opts.title if opts.title is not None else default_title(opts.command)
        try:
            created = await pc.create(kind=opts.kind, title=title,
                                      heartbeat_timeout_s=opts.heartbeat_timeout_s)
        except ProgressClientError as exc:
            say(f"could not create the job at {pc.url}: {exc}. The command was not started.")
            return EXIT_RUN_ERROR
        if created.worker_token is None:  # only a repeated id answers without one
            say(f"the service gave no worker token for job {created.id}")
            return EXIT_RUN_ERROR
        return await _Runner(pc, created, opts).run()


class _Runner(_Output, _Control):
    """One command under one job: output pumps, poster, heartbeat, control poll."""

    async def run(self) -> int:
        env = {**os.environ, URL_ENV: self.pc.url, JOB_ENV: self.job_id,
               WORKER_TOKEN_ENV: self.token}
        say(f"job {self.job_id} at {self.pc.url}")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.opts.command, stdout=out_w, stderr=err_w, env=env,
                start_new_session=True)
        except OSError as exc:
            os.close(out_r)
            os.close(err_r)
            code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXECUTE
            error = f"cannot run {self.opts.command[0]!r}: {exc.strerror or exc}"
            say(error)
            await self.finish("failed", error=error)
            return code
        finally:
            os.close(out_w)
            os.close(err_w)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self.interrupted, sig)
        pumps = [asyncio.create_task(self.pump(out_r, sys.stdout, "info")),
                 asyncio.create_task(self.pump(err_r, sys.stderr, self.opts.stderr_level,
                                               tail=True))]
        helpers = [asyncio.create_task(self.poster()), asyncio.create_task(self.heartbeat()),
                   asyncio.create_task(self.watch_control())]
        try:
            returncode = await self.proc.wait()
            await asyncio.wait(pumps, timeout=DRAIN_AFTER_EXIT_S)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for task in pumps + helpers[1:]:
                task.cancel()
            await asyncio.gather(*pumps, *helpers[1:], return_exceptions=True)
        if self.stop_reason is not None:
            await self.end_group()
        await self.flush(helpers[0])
        return await self.conclude(returncode)

    async def conclude(self, returncode: int) -> int:
        """Finish the job by how the command ended; run's exit code."""
        code = exit_code(returncode)
        if self.stop_reason is not None:
            with contextlib.suppress(ProgressClientError):
                await self.post("log", {"level": "warning", "message": describe_exit(returncode)})
            await self.finish("cancelled", error=self.stop_reason)
            return code or 128 + self.stop_signal  # never "success" for a cancelled job
        if returncode == 0:
            await self.finish("succeeded", result={"exit_code": 0})
            return 0
        error = describe_exit(returncode)
        if self.stderr_tail:
            tail = "\n".join(self.stderr_tail)
            room = MAX_MESSAGE - len(error) - 40
            error += f"; the last lines of stderr:\n{tail[-room:]}"
        await self.finish("failed", error=error)
        return code

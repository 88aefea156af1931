"""The job's control over the command: heartbeat, cancel, pause, and stopping it."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from ..client import LONG_POLL_S, TERMINAL, Control, ProgressClientError, ServiceUnavailable
from .options import RETRY_S, say
from .state import _RunState


class _Control(_RunState):
    """Heartbeat, control poll, pause and resume, and the stop of the process group."""

    async def heartbeat(self) -> None:
        """Mark the job running, then keep it from looking stalled while the command is
        quiet."""
        what = "progress"  # first an event, so viewers see the job start
        while True:
            try:
                answer = await self.post(what, {})
                what = "heartbeat"
            except ServiceUnavailable as exc:
                self.service_down(exc)
            except ProgressClientError:
                return
            else:
                await self.obey(Control.from_dict(answer.get("control") or {}))
            await asyncio.sleep(self.heartbeat_s)

    async def watch_control(self) -> None:
        """Long-poll the control state: a cancel or a pause reaches us at once."""
        while not self.job_over and self.stop_reason is None:
            try:
                control = await self.pc.control(self.job_id, wait=LONG_POLL_S,
                                                pause_requested=self.paused or
                                                self.pause_refused, token=self.token)
            except ServiceUnavailable as exc:
                self.service_down(exc)
                await asyncio.sleep(RETRY_S)
                continue
            except ProgressClientError as exc:
                say(f"cannot read the job's control state: {exc}")
                return
            self.service_back()
            await self.obey(control)

    async def obey(self, control: Control) -> None:
        if self.stop_reason is not None or self.proc is None:
            return
        if control.attempt is not None and control.attempt > self.attempt:
            self.job_over = True
            self.stop("the job was requeued; this run's attempt is over", signal.SIGTERM)
        elif control.cancel_requested or control.status == "cancelled":
            self.stop(control.reason or "cancel requested", signal.SIGTERM)
        elif control.status in TERMINAL:
            self.job_over = True
        elif control.pause_requested != self.paused:
            await self.pause(control.pause_requested)

    async def pause(self, on: bool) -> None:
        """Stop or continue the command's process group, and tell the service."""
        if not self.opts.pause:
            if on and not self.pause_refused:
                self.pause_refused = True
                with contextlib.suppress(ProgressClientError):
                    await self.post("log", {"level": "warning", "message":
                                            "pause requested, but run was started with "
                                            "--no-pause: the command keeps running"})
            self.pause_refused = on
            return
        self.signal_group(signal.SIGSTOP if on else signal.SIGCONT)
        self.paused = on
        with contextlib.suppress(ProgressClientError):
            await self.post("progress", {"paused": on})

    def interrupted(self, sig: int) -> None:
        """Ctrl-C, SIGTERM or SIGHUP to us: pass it on; a second one kills at once."""
        if self.stop_reason is not None:
            self.signal_group(signal.SIGKILL)
            return
        self.stop(f"progress-sse run was interrupted ({signal.Signals(sig).name})",
                  signal.Signals(sig))

    def stop(self, reason: str, sig: signal.Signals) -> None:
        """Ask the command's process group to end; SIGKILL it after the grace period."""
        self.stop_reason = reason
        self.stop_signal = sig
        say(f"{reason}: sending {sig.name} to the command")
        self.signal_group(sig)
        if self.paused:
            self.signal_group(signal.SIGCONT)  # a stopped process cannot act on it
        self.killer = asyncio.create_task(self.kill_after_grace())
        self.lines.append(("warning", f"{reason}: {sig.name} sent to the command, SIGKILL "
                           f"in {self.opts.grace_s:g} s if it is still running"))
        self.have_lines.set()

    async def kill_after_grace(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), self.opts.grace_s)
        if self.proc.returncode is None:
            say(f"the command is still running after {self.opts.grace_s:g} s: SIGKILL")
            self.lines.append(("warning", f"still running after {self.opts.grace_s:g} s: "
                               "SIGKILL sent to the command"))
            self.have_lines.set()
            self.signal_group(signal.SIGKILL)

    async def end_group(self) -> None:
        """After a cancel, nothing of the command outlives the grace period."""
        if self.killer is not None:
            await self.killer
        self.signal_group(signal.SIGKILL)

"""Which notifications an event asks for: pure, run by the ledger as it builds a batch,
so that the outbox rows are written in the same transaction as the event.

A job's `finished` event (any status) asks for one row per channel: the service-wide
WEBHOOK_URL, the job's own `webhook` (unless its `webhook_events` leave "finished"
out), and one email to its `notify_email` list. The `status` event that marks a job
stalled asks for both webhooks when the job named "stalled" in `webhook_events`; email
is for the end only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..jobs import Draft, Job

SERVICE_WEBHOOK = "service_webhook"  # WEBHOOK_URL
JOB_WEBHOOK = "webhook"  # the job's own `webhook`
EMAIL = "email"  # the job's `notify_email`, one message to all its addresses
CHANNELS = (SERVICE_WEBHOOK, JOB_WEBHOOK, EMAIL)
EVENTS = ("finished", "stalled")  # what `webhook_events` may name

# (channel, target) for each notification an event asks for; target: a URL, or the
# addresses joined with ", "
Rule = Callable[[Job, Draft], list[tuple[str, str]]]


def trigger(draft: Draft) -> str | None:
    """The notification event a draft is, if any: "finished" or "stalled"."""
    if draft.type == "finished":
        return "finished"
    if draft.type == "status" and draft.fields.get("stalled") is True:
        return "stalled"
    return None


@dataclass(frozen=True)
class Targets:
    """The service's side of the rule: its own webhook URL, and whether email is on."""

    webhook_url: str = ""
    email: bool = False

    def __call__(self, job: Job, draft: Draft) -> list[tuple[str, str]]:
        event = trigger(draft)
        if event is None:
            return []
        wanted = event in job.webhook_events
        found = []
        if self.webhook_url and (wanted or event == "finished"):
            found.append((SERVICE_WEBHOOK, self.webhook_url))
        if job.webhook and wanted:
            found.append((JOB_WEBHOOK, job.webhook))
        if self.email and job.notify_email and event == "finished":
            found.append((EMAIL, ", ".join(job.notify_email)))
        return found

"""Notifications in a running service: the outbox of its store, the channels its
settings configure, and the one deliverer, started and stopped with the app."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
from standardwebhooks import Webhook

from ..settings import Settings
from ..store import Event
from . import webhook
from .delivery import Deliverer, Policy, Send
from .mailer import Mailer
from .origins import allowed
from .outbox import Delivery, open_outbox
from .rules import EMAIL, JOB_WEBHOOK, SERVICE_WEBHOOK


def policy(settings: Settings) -> Policy:
    return Policy(max_age_s=settings.webhook_max_age, timeout_s=settings.webhook_timeout,
                  retry_min_s=settings.webhook_retry_min,
                  retry_max_s=settings.webhook_retry_max,
                  poll_s=min(1.0, settings.webhook_retry_min),
                  keep_s=settings.retention_days * 86400.0)


class Notifications:
    """The deliverer and its channels, for one app."""

    def __init__(self, settings: Settings, store: object) -> None:
        self.settings = settings
        self.outbox = open_outbox(store)
        self.policy = policy(settings)
        self._http: httpx.AsyncClient | None = None
        self.deliverer = Deliverer(self.outbox, self._senders(), self.policy)

    def _senders(self) -> dict[str, Send]:
        senders: dict[str, Send] = {}
        s = self.settings
        if s.webhook_secret:
            signer = Webhook(s.webhook_secret)
            origins = s.webhook_origin_list

            async def service_hook(d: Delivery) -> None:
                await webhook.post(self._client(), signer, d)

            async def job_hook(d: Delivery) -> None:
                if not allowed(d.target, origins):  # taken off the list since the create
                    raise webhook.SendError("its origin is no longer in WEBHOOK_ORIGINS")
                await webhook.post(self._client(), signer, d)

            senders[SERVICE_WEBHOOK] = service_hook
            senders[JOB_WEBHOOK] = job_hook
        server = s.smtp_server
        if server is not None:
            senders[EMAIL] = Mailer(server, s.smtp_from, s.public_url, s.webhook_timeout)
        return senders

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = webhook.client(self.policy.timeout_s, self.policy.concurrency)
        return self._http

    def start(self) -> None:
        self.deliverer.start()

    async def stop(self) -> None:
        await self.deliverer.stop()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def committed(self, events: Sequence[Event]) -> None:
        """Events were stored (by this instance or, on PostgreSQL, another): wake the
        deliverer if one of them may have asked for a notification."""
        for e in events:
            if e.type == "finished" or (e.type == "status" and '"stalled":true' in e.body):
                self.deliverer.nudge()
                return

    async def for_job(self, job_id: str) -> list[dict[str, Any]]:
        return await self.outbox.for_job(job_id)

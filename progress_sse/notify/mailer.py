"""The email channel: one outbox row is one message to the job's `notify_email` list,
composed and sent by notify/email.py (one attempt; the outbox retries)."""

from __future__ import annotations

from ..codec import loads
from .email import EmailError, SmtpServer, compose, send
from .outbox import Delivery
from .webhook import SendError, message_id


class Mailer:
    def __init__(self, server: SmtpServer, sender: str, public_url: str,
                 timeout_s: float) -> None:
        self.server = server
        self.sender = sender
        self.public_url = public_url
        self.timeout_s = timeout_s

    async def __call__(self, d: Delivery) -> None:
        """Send one attempt; SendError with the server's reason if it was not taken."""
        job = loads(d.body)["job"]
        message = compose(job=job, sender=self.sender, to=d.target.split(", "),
                          public_url=self.public_url, message_id=message_id(d))
        try:
            await send(self.server, message, timeout_s=self.timeout_s)
        except EmailError as exc:
            raise SendError(str(exc)) from None

"""One webhook attempt: the event POSTed as the Standard Webhooks spec says, signed
with the `standardwebhooks` package.

Headers: `webhook-id` (the same on every retry of one notification, so a receiver
can drop repeats), `webhook-timestamp` (this attempt's, in seconds) and
`webhook-signature` (`v1,<base64 HMAC-SHA256 of id.timestamp.body>`). The body is the
event exactly as streams carry it (the job inside).

A 2xx answer is a delivery; anything else is a failure with a one-line reason. A
redirect is a failure too, never followed (the target could be anywhere: SSRF). The
answer's body is never read, so a receiver's answer costs no memory.
"""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from standardwebhooks import Webhook

from .outbox import Delivery


class SendError(Exception):
    """An attempt failed; the message is its one-line reason."""


def message_id(d: Delivery) -> str:
    """The notification's id: its event and channel, so retries keep it."""
    return f"msg_{d.event_id}_{d.channel}"


def client(timeout_s: float, connections: int) -> httpx.AsyncClient:
    """The deliverer's HTTP client: no redirects followed, no proxy from the environment
    (the allowed origins are what is reached), at most `connections` open."""
    return httpx.AsyncClient(
        follow_redirects=False, trust_env=False, timeout=timeout_s,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        headers={"user-agent": "progress-sse-webhooks"})


async def post(http: httpx.AsyncClient, signer: Webhook, d: Delivery) -> None:
    """Send one attempt; SendError if it was not taken."""
    now = datetime.now(UTC)
    msg_id = message_id(d)
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signer.sign(msg_id, now, d.body),
    }
    try:
        async with http.stream("POST", d.target, content=d.body.encode(),
                               headers=headers) as answer:
            status = answer.status_code
            location = answer.headers.get("location", "")
    except httpx.TimeoutException as exc:
        raise SendError(f"no answer within the timeout ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        raise SendError(f"{type(exc).__name__}: {exc}"[:300]) from None
    if 200 <= status < 300:
        return
    if 300 <= status < 400:
        raise SendError(f"HTTP {status} redirect to {location[:200]!r}, not followed")
    raise SendError(f"HTTP {status}")

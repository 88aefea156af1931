"""Email notifications through the durable outbox, to a real SMTP server (aiosmtpd,
tests/smtp.py): the mail arrives with its subject, recipients and both parts, and a
server that is down at first gets it once it is up. What the message says in detail is
tests/test_email.py's."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from progress_sse.settings import Settings

from .helpers import create_job, metric, start_service, wait_for
from .smtp import MailServer, mail_server, mail_servers  # noqa: F401 (fixtures)

STORES = ("sqlite", "postgres")


def mail_settings(db: str, server: MailServer) -> Settings:
    return Settings(db=db, smtp_url=server.url(), smtp_from="progress@example.com",
                    public_url="https://progress.example.com", webhook_retry_min=0.3)


@contextlib.asynccontextmanager
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    svc = await start_service(settings)
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as c:
            yield c
    finally:
        await svc.stop()


async def notes(c: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    r = await c.get(f"/api/jobs/{job_id}")
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["notifications"]
    return found


async def test_the_mail_arrives_with_subject_recipients_and_both_parts(
        db: str, mail_server: MailServer) -> None:  # noqa: F811
    """One message to the job's notify_email list once it finishes; the job's JSON
    then shows the email notification delivered."""
    async with client(mail_settings(db, mail_server)) as c:
        job = await create_job(c, title="Nightly export", kind="export",
                               notify_email=["ops@example.com", "Dev <dev@example.com>"])
        r = await c.post(f"/api/jobs/{job['id']}/finish",
                         json={"status": "failed", "error": "disk full"})
        assert r.status_code == 200, r.text
        [mail] = await mail_server.wait_for_mail(1, timeout=10)
        await wait_for(lambda: _status(c, job["id"], "delivered"), 5, what="delivered")
        [note] = await notes(c, job["id"])
        text = (await c.get("/metrics")).text
    assert sorted(mail.rcpt_tos) == ["dev@example.com", "ops@example.com"]
    assert mail.mail_from == "progress@example.com"
    assert "Nightly export" in mail.message["Subject"] and "failed" in mail.message["Subject"]
    plain, html = mail.part("plain"), mail.part("html")
    for part in (plain, html):
        assert "Nightly export" in part and "disk full" in part
        assert "https://progress.example.com" in part
    assert note["channel"] == "email" and note["attempts"] == 1, note
    assert metric(text, "progress_sse_notifications_delivered_total") == 1


async def _status(c: httpx.AsyncClient, job_id: str, status: str) -> bool:
    return [n["status"] for n in await notes(c, job_id)] == [status]


async def test_a_server_down_at_first_gets_the_mail_once_it_is_up(
        db: str, mail_servers: Callable[..., MailServer]) -> None:  # noqa: F811
    """The SMTP server is not listening when the job finishes: the attempt fails and is
    retried; once the server is up, the mail arrives, once."""
    server = mail_servers()
    async with client(mail_settings(db, server)) as c:
        job = await create_job(c, title="Import", notify_email="ops@example.com")
        await c.post(f"/api/jobs/{job['id']}/finish", json={"status": "succeeded"})

        async def failed_once() -> bool:
            found = await notes(c, job["id"])
            return bool(found and found[0]["last_error"])

        await wait_for(failed_once, 10, what="a failed attempt")
        [note] = await notes(c, job["id"])
        assert note["status"] == "pending" and note["next_attempt_at"] is not None
        assert "127.0.0.1" in note["last_error"], note
        await server.astart()
        await server.wait_for_mail(1, timeout=15)
        await wait_for(lambda: _status(c, job["id"], "delivered"), 5, what="delivered")
    assert len(server.received) == 1
    assert server.received[0].rcpt_tos == ["ops@example.com"]

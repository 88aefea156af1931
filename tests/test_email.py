"""Email notifications (issue 19) against a real SMTP server (aiosmtpd, tests/smtp.py):
what the mail says, that it arrives where it should, and that every way one attempt
can fail is an EmailError with a one-line reason, never the password."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from progress_sse.errors import ConfigError
from progress_sse.notify.email import EmailError, SmtpServer, compose, duration_text, send

from .smtp import Cert, MailServer, mail_server, mail_servers, tls_cert  # noqa: F401

SENDER = "Progress <progress@example.com>"
PUBLIC = "https://progress.example/dash/"
T0 = 1_790_000_000.0


def job(**fields: Any) -> dict[str, Any]:
    """A finished job's public JSON (the fields compose reads, and some it does not)."""
    return {"id": "j-42", "kind": "video", "title": "intro.mp4", "status": "succeeded",
            "error": None, "result": {"url": "https://cdn.example/intro.mp4", "frames": 4800},
            "created_at": T0 - 30, "started_at": T0, "finished_at": T0 + 192.4,
            "progress": 100.0, "meta": {}, **fields}


async def deliver(server: MailServer, the_job: dict[str, Any], to: list[str],
                  url: str | None = None, **options: Any) -> None:
    message = compose(job=the_job, sender=SENDER, to=to, public_url=options.pop("public", PUBLIC),
                      **options)
    await send(SmtpServer.parse(url or server.url()), message)


async def test_the_mail_arrives_with_subject_recipients_and_both_parts(
        mail_server: MailServer) -> None:  # noqa: F811
    """Several recipients get one mail from SMTP_FROM whose plain and HTML parts both
    carry the title, kind, status, duration, a one-line result and the job's link."""
    to = ["ann@example.com", "Smith, Bob <bob@example.org>"]
    await deliver(mail_server, job(), to, message_id="delivery-7")
    [mail] = await mail_server.wait_for_mail()
    assert mail.rcpt_tos == ["ann@example.com", "bob@example.org"]
    assert mail.mail_from == "progress@example.com"
    headers = mail.message
    assert headers["Subject"] == "✓ intro.mp4 succeeded"
    assert headers["From"] == SENDER
    assert headers["To"] == 'ann@example.com, "Smith, Bob" <bob@example.org>'
    assert headers["Message-ID"] == "<delivery-7@example.com>" and headers["Date"]
    assert headers.get_content_type() == "multipart/alternative"
    for subtype in ("plain", "html"):
        text = mail.part(subtype)
        for shown in ("intro.mp4", "video", "succeeded", "3 min 12 s", "4800",
                      "https://progress.example/dash/?job=j-42"):
            assert shown in text, (subtype, shown, text)
    assert 'Result:   {"url":"https://cdn.example/intro.mp4","frames":4800}\n' \
        in mail.part("plain")
    assert "Error" not in mail.part("plain")


async def test_a_failed_job_shows_its_error(mail_server: MailServer) -> None:  # noqa: F811
    """A failed job's mail says so in its subject and shows the error (all its lines),
    not a result; without PUBLIC_URL there is no link; a job with no title is named
    by its id."""
    failed = job(id="nightly-import", title="", kind="import", status="failed",
                 result=None, error="Traceback: ...\nKeyError: 'sku'",
                 started_at=T0, finished_at=T0 + 3725)
    await deliver(mail_server, failed, ["ops@example.com"], public="")
    [mail] = await mail_server.wait_for_mail()
    assert mail.message["Subject"] == "✗ nightly-import failed"
    plain, page = mail.part("plain"), mail.part("html")
    assert "Error:\n    Traceback: ...\n    KeyError: 'sku'\n" in plain
    assert "KeyError: &#x27;sku&#x27;" in page
    for text in (plain, page):
        assert "1 h 2 min" in text and "import" in text and "Result" not in text
        assert "?job=" not in text and "http" not in text.replace("http://www.w3.org", "")


async def test_html_is_escaped_and_a_long_result_is_one_short_line(
        mail_server: MailServer) -> None:  # noqa: F811
    """A title with markup shows as text in the HTML part; a big result is one line of
    JSON cut near 200 characters; an id with odd characters is quoted in the link."""
    odd = job(id="a b&c", title="<b>Q3</b> & co", result={"rows": ["x\ny" * 20] * 20})
    await deliver(mail_server, odd, ["ann@example.com"])
    [mail] = await mail_server.wait_for_mail()
    page, plain = mail.part("html"), mail.part("plain")
    assert "&lt;b&gt;Q3&lt;/b&gt; &amp; co" in page and "<b>Q3" not in page
    assert 'href="https://progress.example/dash/?job=a%20b%26c"' in page
    [result] = [line for line in plain.splitlines() if line.startswith("Result:")]
    assert len(result) <= 10 + 200 and result.endswith("…"), result
    assert result.startswith('Result:   {"rows":["x\\ny')


async def test_a_title_cannot_add_headers_or_recipients(
        mail_server: MailServer) -> None:  # noqa: F811
    """A title carrying CR/LF and a header of its own stays one line of the subject:
    no Bcc header, no extra recipient, no early end of the headers."""
    evil = job(title="report\r\nBcc: thief@attacker.example\r\n\r\nfake body\nX-Evil: 1")
    await deliver(mail_server, evil, ["ann@example.com"], message_id="k\r\nX-Evil: 2")
    [mail] = await mail_server.wait_for_mail()
    assert mail.rcpt_tos == ["ann@example.com"]
    assert mail.message["Bcc"] is None and mail.message["X-Evil"] is None
    assert mail.message["Subject"] == \
        "✓ report Bcc: thief@attacker.example fake body X-Evil: 1 succeeded"
    headers = mail.raw.split(b"\r\n\r\n")[0].decode()
    assert all(not line.startswith(("Bcc", "X-Evil")) for line in headers.splitlines())


async def test_a_password_is_asked_and_a_wrong_one_is_an_error(
        mail_servers: Callable[..., MailServer]) -> None:  # noqa: F811
    """The URL's user and password (URL-encoded) log in; a wrong password is an
    EmailError saying authentication failed, without the password."""
    server = mail_servers(login=("bot@example.com", "p@ss:wörd/1"))
    await server.astart()
    await deliver(server, job(), ["ann@example.com"],
                  url=server.url("bot@example.com", "p@ss:wörd/1"))
    await server.wait_for_mail()
    with pytest.raises(EmailError) as refused:
        await deliver(server, job(), ["ann@example.com"],
                      url=server.url("bot@example.com", "hunter2"))
    assert "authentication failed" in str(refused.value) and "535" in str(refused.value)
    assert "hunter2" not in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(EmailError, match="530"):  # and no password at all is refused too
        await deliver(server, job(), ["ann@example.com"])
    assert len(server.received) == 1


async def test_starttls_is_used_when_offered_and_the_certificate_checked(
        mail_servers: Callable[..., MailServer], tls_cert: Cert) -> None:  # noqa: F811
    """A server offering STARTTLS (and AUTH only after it) gets TLS before the password;
    its self-signed certificate is refused unless cafile= trusts it or verify=no."""
    server = mail_servers(login=("bot", "secret"), starttls=tls_cert)
    await server.astart()
    with pytest.raises(EmailError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        await deliver(server, job(), ["ann@example.com"], url=server.url("bot", "secret"))
    assert server.received == []
    await deliver(server, job(), ["ann@example.com"],
                  url=server.url("bot", "secret", f"cafile={tls_cert.cert}"))
    await deliver(server, job(), ["ann@example.com"],
                  url=server.url("bot", "secret", "verify=no"))
    mails = await server.wait_for_mail(2)
    assert [mail.tls for mail in mails] == [True, True]
    await server.wait_idle()


async def test_smtps_speaks_tls_from_the_start(
        mail_servers: Callable[..., MailServer], tls_cert: Cert) -> None:  # noqa: F811
    server = mail_servers(implicit_tls=tls_cert)
    await server.astart()
    assert server.url().startswith("smtps://")
    await deliver(server, job(), ["ann@example.com"],
                  url=server.url(query=f"cafile={tls_cert.cert}"))
    [mail] = await server.wait_for_mail()
    assert mail.message["Subject"] == "✓ intro.mp4 succeeded" and mail.tls
    await server.wait_idle()


async def test_connection_refused_is_an_error_at_once(
        mail_servers: Callable[..., MailServer]) -> None:  # noqa: F811
    """Nothing listening: an EmailError naming the server within a second, and once
    the server is up the same mail goes (the outbox retries exactly this way)."""
    server = mail_servers()
    message = compose(job=job(), sender=SENDER, to=["ann@example.com"], public_url=PUBLIC)
    began = time.monotonic()
    with pytest.raises(EmailError) as refused:
        await send(SmtpServer.parse(server.url()), message)
    assert time.monotonic() - began < 1.0
    assert f"127.0.0.1:{server.port}" in str(refused.value), refused.value
    await server.astart()
    await send(SmtpServer.parse(server.url()), message)
    [mail] = await server.wait_for_mail()
    assert mail.message["Message-ID"] == message["Message-ID"]


async def test_a_server_that_never_answers_times_out() -> None:
    """A server that accepts and then says nothing costs timeout_s, then EmailError."""
    ended = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # no greeting, ever; until the client hangs up
        finally:
            writer.close()
            ended.set()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        message = compose(job=job(), sender=SENDER, to=["a@example.com"], public_url="")
        began = time.monotonic()
        with pytest.raises(EmailError, match=r"no answer within 0\.5 s"):
            await send(SmtpServer.parse(f"smtp://127.0.0.1:{port}"), message, timeout_s=0.5)
        assert 0.4 < time.monotonic() - began < 2.0
        await asyncio.wait_for(ended.wait(), 5)  # the client hung up
    finally:
        listener.close()
        await listener.wait_closed()


async def test_refused_recipients(mail_server: MailServer) -> None:  # noqa: F811
    """Every recipient refused is an EmailError naming them; some refused is not an
    error (the others got it, and a retry would send it to them twice)."""
    with pytest.raises(EmailError) as refused:
        await deliver(mail_server, job(), ["x@refused.example", "y@refused.example"])
    assert "x@refused.example (550" in str(refused.value), refused.value
    assert mail_server.received == []
    await deliver(mail_server, job(), ["x@refused.example", "ann@example.com"])
    [mail] = await mail_server.wait_for_mail()
    assert mail.rcpt_tos == ["ann@example.com"]


@pytest.mark.parametrize(("url", "expected"), [
    ("smtp://mail.example", ("mail.example", 25, False, None, None, True)),
    ("smtp://user:pass@mail.example:587", ("mail.example", 587, False, "user", "pass", True)),
    ("smtps://mail.example", ("mail.example", 465, True, None, None, True)),
    ("smtp://bot%40example.com:a%2Fb%3Ac%40d@[::1]:2525/?verify=no",
     ("::1", 2525, False, "bot@example.com", "a/b:c@d", False)),
    ("SMTP://only-user@Mail.Example", ("mail.example", 25, False, "only-user", None, True)),
])
def test_smtp_urls_that_parse(url: str, expected: tuple[Any, ...]) -> None:
    server = SmtpServer.parse(url)
    assert (server.host, server.port, server.implicit_tls, server.username,
            server.password, server.verify) == expected
    assert server.password is None or server.password not in repr(server)


@pytest.mark.parametrize(("url", "said"), [
    ("http://u:hunter2@mail.example", "must start with smtp:// or smtps://, not http:"),
    ("mail.example:25", "must start with smtp:// or smtps://"),
    ("smtp://u:hunter2@", "names no host"),
    ("smtp://u:hunter2@mail.example:70000", "is not a URL such as"),
    ("smtp://u:hunter2@mail.example:port", "is not a URL such as"),
    ("smtp://u:hunter2@mail.example/inbox", "takes no path"),
    ("smtp://u:hunter2@mail.example?tls=1", "takes verify=no or cafile=PATH, not 'tls'"),
    ("smtp://u:hunter2@mail.example?verify=sometimes", "verify takes yes or no"),
    ("smtp://u:hunter2@mail.example?cafile=/no/such/ca.pem", "is not a file"),
    ("smtp://:hunter2@mail.example", "has a password but no user"),
])
def test_smtp_urls_that_do_not(url: str, said: str) -> None:
    with pytest.raises(ConfigError) as refused:
        SmtpServer.parse(url)
    assert said in str(refused.value), refused.value
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(("seconds", "said"), [
    (0.25, "0.2 s"), (9.94, "9.9 s"), (42.4, "42 s"), (192.4, "3 min 12 s"), (180, "3 min"),
    (3725, "1 h 2 min"), (7200, "2 h"), (93784, "1 d 2 h"),
])
def test_durations_read_as_people_say_them(seconds: float, said: str) -> None:
    assert duration_text(seconds) == said


async def test_timeout_s_bounds_the_whole_attempt() -> None:
    """A server answering every command a little under timeout_s still costs timeout_s
    in all, not that for each of the seven commands of a mail."""
    ended = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 slow.test ESMTP\r\n")
            while line := await reader.readline():
                await asyncio.sleep(0.3)
                writer.write(b"354 go on\r\n" if line.upper().startswith(b"DATA")
                             else b"250 OK\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            ended.set()

    listener = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        message = compose(job=job(), sender=SENDER, to=["a@example.com"], public_url="")
        began = time.monotonic()
        with pytest.raises(EmailError, match=r"no answer within 0\.8 s"):
            await send(SmtpServer.parse(f"smtp://127.0.0.1:{port}"), message, timeout_s=0.8)
        assert time.monotonic() - began < 1.5
        await asyncio.wait_for(ended.wait(), 5)  # the client hung up
    finally:
        listener.close()
        await listener.wait_closed()

"""A real SMTP server for tests: aiosmtpd on a loopback port, collecting what it is sent.

`MailServer` runs aiosmtpd's Controller (its own thread and event loop) on a port
chosen up front, so a test can point the service at it before it is up ("an SMTP
server that is down at first") and start it later. It can ask for a password
(AUTH PLAIN and LOGIN), offer STARTTLS, or speak TLS from the first byte, with a
self-signed certificate for 127.0.0.1 that `make_cert` writes with openssl.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from .helpers import free_port, wait_for


class _Controller(Controller):
    """aiosmtpd's Controller, counting open connections: its stop() ends the loop
    without letting connections close, so MailServer.stop waits for them first."""

    def __init__(self, handler: Any, **options: Any) -> None:
        super().__init__(handler, **options)
        self.open: set[SMTP] = set()

    def factory(self) -> SMTP:
        controller = self

        class Counted(SMTP):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                controller.open.add(self)
                super().connection_made(transport)

            def connection_lost(self, error: Exception | None) -> None:
                super().connection_lost(error)
                controller.open.discard(self)

        return Counted(self.handler, **self.SMTP_kwargs)


@dataclass(frozen=True)
class Cert:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_cert(directory: Path) -> Cert:
    cert, key = directory / "smtp-cert.pem", directory / "smtp-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True)
    return Cert(cert, key)


@dataclass(frozen=True)
class Received:
    """One mail as the server took it: the envelope, the parsed message, and whether
    the session was encrypted when the mail was handed over."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes
    tls: bool

    def part(self, subtype: str) -> str:
        """The decoded text of the text/`subtype` part."""
        body = self.message.get_body(preferencelist=(subtype,))
        assert body is not None and body.get_content_subtype() == subtype, self.message
        text = body.get_content()
        assert isinstance(text, str)
        return text.replace("\r\n", "\n")


@dataclass
class MailServer:
    """aiosmtpd on 127.0.0.1:`port`; `received` fills as mail arrives."""

    port: int = field(default_factory=free_port)
    login: tuple[str, str] | None = None  # ask for this user and password
    starttls: Cert | None = None          # offer STARTTLS (AUTH only after it)
    implicit_tls: Cert | None = None      # TLS from the first byte (smtps)
    refuse_domain: str = "refused.example"  # RCPT to this domain gets 550
    received: list[Received] = field(default_factory=list)
    _controller: _Controller | None = None

    def url(self, user: str | None = None, password: str | None = None,
            query: str = "") -> str:
        """The SMTP_URL of this server, with these credentials and query."""
        scheme = "smtps" if self.implicit_tls else "smtp"
        who = ""
        if user is not None:
            who = quote(user, safe="")
            who += f":{quote(password, safe='')}@" if password is not None else "@"
        return f"{scheme}://{who}127.0.0.1:{self.port}" + (f"?{query}" if query else "")

    def start(self) -> None:
        kwargs: dict[str, Any] = {"server_hostname": "mail.test"}
        if self.login is not None:
            # auth_required without TLS makes aiosmtpd warn: handle_MAIL asks instead
            kwargs.update(authenticator=self._authenticate,
                          auth_require_tls=self.starttls is not None)
        if self.starttls is not None:
            kwargs["tls_context"] = self.starttls.server_context()
        if self.implicit_tls is not None:
            kwargs["ssl_context"] = self.implicit_tls.server_context()
        controller = _Controller(self, hostname="127.0.0.1", port=self.port, **kwargs)
        controller.start()
        self._controller = controller

    async def astart(self) -> None:
        """start() without blocking the caller's event loop."""
        await asyncio.to_thread(self.start)

    def stop(self) -> None:
        """Stop once the clients have hung up (5 s at most)."""
        if self._controller is not None:
            deadline = time.monotonic() + 5.0
            while self._controller.open and time.monotonic() < deadline:
                time.sleep(0.01)
            self._controller.stop()
            self._controller = None

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Until every client has hung up: a TLS client's shutdown runs on the test's
        loop, which must keep running until it is done."""
        await wait_for(lambda: self._controller is None or not self._controller.open,
                       timeout=timeout, what="the SMTP clients to hang up")

    async def wait_for_mail(self, count: int = 1, timeout: float = 5.0) -> list[Received]:
        await wait_for(lambda: len(self.received) >= count, timeout=timeout,
                       what=f"{count} mail(s) at the SMTP server")
        return self.received

    # aiosmtpd's handler hooks and authenticator, called on the server's thread

    async def handle_MAIL(self, server: Any, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.login is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from, envelope.mail_options = address, list(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address.lower().endswith("@" + self.refuse_domain):
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.received.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos),
                                      message, raw, self._encrypted(server, session)))
        return "250 Message accepted for delivery"

    @staticmethod
    def _encrypted(server: SMTP, session: Session) -> bool:
        """After STARTTLS (session.ssl), or TLS from the start (the transport's)."""
        transport = server.transport
        return session.ssl is not None or (
            transport is not None and transport.get_extra_info("ssl_object") is not None)

    def _authenticate(self, server: Any, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        assert self.login is not None
        ok = isinstance(auth_data, LoginPassword) and \
            (auth_data.login.decode(), auth_data.password.decode()) == self.login
        return AuthResult(success=ok, handled=False)  # handled: we sent no answer


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("smtp-tls"))


@pytest.fixture
def mail_server() -> Iterator[MailServer]:
    """A plain SMTP server, started; stopped after the test."""
    server = MailServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mail_servers() -> Iterator[Callable[..., MailServer]]:
    """Makes MailServers (not started: call start or astart); stops them all after."""
    made: list[MailServer] = []

    def make(**options: Any) -> MailServer:
        made.append(MailServer(**options))
        return made[-1]

    yield make
    for server in made:
        server.stop()

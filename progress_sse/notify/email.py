"""Email notifications: where the SMTP server is, what the message says, one attempt to send.

The durable outbox (retries, backoff, giving up) lives elsewhere and calls `send`: this
module makes one attempt and turns every way it can fail into `EmailError`, a one-line
reason for the outbox to record. Nothing here reads settings or keeps state.

`SMTP_URL` is `smtp://[user[:pass]@]host[:port]` (STARTTLS when the server offers it) or
`smtps://...` (TLS from the first byte, port 465). Certificates are verified; for a
private relay, `?cafile=/path/ca.pem` names the CA to trust, and `?verify=no` turns
verification off (the link is then encrypted but not authenticated).
"""

from __future__ import annotations

import asyncio
import html
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import aiosmtplib
import structlog

from ..codec import dumps
from ..errors import ConfigError

log = structlog.get_logger("progress_sse.notify")

_SCHEMES = {"smtp": (25, False), "smtps": (465, True)}
_YES, _NO = {"1", "yes", "true", "on"}, {"0", "no", "false", "off"}
_MARKS = {"succeeded": "✓", "failed": "✗", "cancelled": "⊘"}
RESULT_CHARS = 200   # a result is shown as one line of JSON, cut here
ERROR_CHARS = 2000   # an error (perhaps a traceback's tail) is shown up to this
SUBJECT_CHARS = 120  # of the title, in the subject


class EmailError(Exception):
    """One attempt to send failed; the message is a one-line reason."""


@dataclass(frozen=True)
class SmtpServer:
    """Where and how to hand mail over: parsed once from SMTP_URL."""

    host: str
    port: int
    implicit_tls: bool = False  # smtps: TLS from the start; else STARTTLS if offered
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    verify: bool = True
    cafile: str | None = None

    @classmethod
    def parse(cls, url: str) -> SmtpServer:
        """The server of `smtp://user:pass@host:587` or `smtps://host`; ConfigError
        (which never shows the password) when the URL is not one."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            raise ConfigError("the SMTP URL is not a URL such as "
                              "smtp://user:pass@mail.example.com:587") from None
        if parts.scheme not in _SCHEMES:
            raise ConfigError(f"the SMTP URL must start with smtp:// or smtps://, "
                              f"not {parts.scheme + ':' if parts.scheme else 'nothing'}")
        if not parts.hostname:
            raise ConfigError("the SMTP URL names no host: smtp://[user[:pass]@]host[:port]")
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigError("the SMTP URL takes no path: smtp://[user[:pass]@]host[:port]")
        default_port, implicit_tls = _SCHEMES[parts.scheme]
        verify, cafile = True, None
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name == "verify" and value.lower() in _YES | _NO:
                verify = value.lower() in _YES
            elif name == "verify":
                raise ConfigError(f"the SMTP URL's verify takes yes or no, not {value!r}")
            elif name == "cafile" and Path(value).is_file():
                cafile = value
            elif name == "cafile":
                raise ConfigError(f"the SMTP URL's cafile {value!r} is not a file")
            else:
                raise ConfigError(f"the SMTP URL's query takes verify=no or cafile=PATH, "
                                  f"not {name!r}")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if password and not username:
            raise ConfigError("the SMTP URL has a password but no user")
        return cls(host=parts.hostname, port=port or default_port, implicit_tls=implicit_tls,
                   username=username, password=password, verify=verify, cafile=cafile)

    @property
    def where(self) -> str:
        """host:port, for messages and logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def check_address(text: str) -> str:
    """`text` if it is one mail address (`a@example.com` or `Name <a@example.com>`),
    else ValueError saying why."""
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError("a mail address cannot hold control characters or line breaks")
    _, spec = _split(text)
    local, at, domain = spec.rpartition("@")
    if not (at and local and domain) or ("." not in domain.strip(".")
                                         and domain != "localhost"):
        raise ValueError(f"{text!r} is not a mail address such as name@example.com")
    try:
        Address(addr_spec=spec)
    except Exception:  # the parser raises several kinds on junk
        raise ValueError(f"{text!r} is not a mail address such as name@example.com") from None
    return text.strip()


def compose(*, job: Mapping[str, Any], sender: str, to: Sequence[str], public_url: str,
            message_id: str | None = None) -> EmailMessage:
    """The mail telling `to` that `job` (its public JSON) has finished.

    `message_id` makes the Message-ID stable across attempts (a key such as the
    delivery's id, or a whole `<...@...>`), so a retried mail is recognised as the same."""
    name = _one_line(str(job.get("title") or job["id"]))
    status = _one_line(str(job.get("status", "")))
    lines = _facts(job, name, public_url)
    message = EmailMessage()
    message["From"] = _address(sender)
    message["To"] = ", ".join(_address(address) for address in to)
    mark = _MARKS.get(status)
    short = name if len(name) <= SUBJECT_CHARS else name[:SUBJECT_CHARS - 1] + "…"
    message["Subject"] = f"{mark + ' ' if mark else ''}{short} {status}"
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = _message_id(message_id, sender)
    message.set_content(_plain(name, status, lines))
    message.add_alternative(_html(name, status, lines), subtype="html")
    return message


async def send(server: SmtpServer, message: EmailMessage, *, timeout_s: float = 10.0) -> None:
    """One attempt to hand `message` to `server` for its To recipients; EmailError
    with a one-line reason on any failure, after `timeout_s` at the latest.

    Recipients the server refuses while it accepts others are logged, not an error:
    retrying would send the mail again to those it accepted."""
    try:
        async with asyncio.timeout(timeout_s):
            refused, _ = await aiosmtplib.send(
                message, hostname=server.host, port=server.port,
                username=server.username, password=server.password,
                use_tls=server.implicit_tls, start_tls=False if server.implicit_tls else None,
                validate_certs=server.verify, cert_bundle=server.cafile, timeout=timeout_s)
    except TimeoutError:
        raise EmailError(f"{server.where}: no answer within {timeout_s:g} s") from None
    except aiosmtplib.SMTPRecipientsRefused as exc:
        who = ", ".join(f"{r.recipient} ({r.code} {r.message})" for r in exc.recipients)
        raise EmailError(_one_line(f"{server.where}: every recipient refused: {who}")) from None
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise EmailError(_one_line(
            f"{server.where}: authentication failed: {exc.code} {exc.message}")) from None
    except aiosmtplib.SMTPResponseException as exc:
        raise EmailError(_one_line(f"{server.where}: {exc.code} {exc.message}")) from None
    except ssl.SSLError as exc:
        raise EmailError(_one_line(f"{server.where}: TLS: {exc.reason or exc}")) from None
    except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise EmailError(_one_line(f"{server.where}: {reason or type(exc).__name__}")
                         ) from None
    if refused:
        log.warning("email.partly_refused", server=server.where,
                    refused={who: f"{r.code} {r.message}" for who, r in refused.items()})


def duration_text(seconds: float) -> str:
    """3 min 12 s, 1 h 5 min, 2 d 3 h: two units at most, as a person says it."""
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{whole} s"
    for unit, size, smaller, small_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60),
                                            ("min", 60, "s", 1)):
        if whole >= size:
            big, rest = divmod(whole, size)
            rest //= small_size
            return f"{big} {unit} {rest} {smaller}" if rest else f"{big} {unit}"
    raise AssertionError("unreachable")


def _facts(job: Mapping[str, Any], name: str, public_url: str) -> list[tuple[str, str]]:
    """(label, text) pairs both parts show, in order; the link last."""
    facts = [("Title", name), ("Kind", _one_line(str(job.get("kind", "")))),
             ("Status", _one_line(str(job.get("status", ""))))]
    finished = job.get("finished_at") or time.time()
    started = job.get("started_at") or job.get("created_at")
    if isinstance(started, int | float) and isinstance(finished, int | float):
        facts.append(("Duration", duration_text(max(0.0, finished - started))))
    if job.get("error"):
        error = str(job["error"]).strip()
        facts.append(("Error", error if len(error) <= ERROR_CHARS
                      else error[:ERROR_CHARS - 1] + "…"))
    elif job.get("result") is not None:
        result = dumps(job["result"])
        facts.append(("Result", result if len(result) <= RESULT_CHARS
                      else result[:RESULT_CHARS - 1] + "…"))
    if public_url:
        facts.append(("Link", f"{public_url.rstrip('/')}/?job={quote(str(job['id']), safe='')}"))
    return facts


def _plain(name: str, status: str, facts: list[tuple[str, str]]) -> str:
    rows = [f"{name} {status}", ""]
    for label, text in facts:
        if label == "Error" and "\n" in text:
            rows += ["Error:", *("    " + line for line in text.splitlines())]
        else:
            rows.append(f"{label + ':':<10}{_one_line(text) if label != 'Error' else text}")
    return "\n".join(rows) + "\n"


def _html(name: str, status: str, facts: list[tuple[str, str]]) -> str:
    e = html.escape
    rows = []
    for label, text in facts:
        if label == "Link":
            cell = f'<a href="{e(text)}">open the job</a>'
        elif label == "Error":
            cell = f'<pre style="margin:0;white-space:pre-wrap">{e(text)}</pre>'
        elif label == "Result":
            cell = f"<code>{e(text)}</code>"
        else:
            cell = e(text)
        rows.append(f'<tr><th align="left" valign="top" style="padding-right:1em">'
                    f"{e(label)}</th><td>{cell}</td></tr>")
    return (f'<!doctype html>\n<html><body style="font-family:sans-serif">\n'
            f"<p><strong>{e(name)}</strong> {e(status)}</p>\n"
            f"<table>\n{chr(10).join(rows)}\n</table>\n</body></html>\n")


def _message_id(key: str | None, sender: str) -> str:
    domain = _split(sender)[1].rpartition("@")[2] or "progress-sse.invalid"
    if key is None:
        return make_msgid(domain=domain)
    key = _one_line(key).replace(" ", "")
    if key.startswith("<") and key.endswith(">"):
        return key
    return f"<{key}@{domain}>" if "@" not in key else f"<{key}>"


def _address(text: str) -> str:
    """One address for a header: a display name holding a comma is quoted."""
    name, spec = _split(_one_line(text))
    return formataddr((name, spec)) if name else spec


def _split(text: str) -> tuple[str, str]:
    """(display name, address) of ONE address: `Smith, Bob <bob@example.org>` is
    one (parseaddr would read two)."""
    text = text.strip()
    if text.endswith(">") and "<" in text:
        name, _, spec = text[:-1].rpartition("<")
        name = name.strip()
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        return name, spec.strip()
    return "", text


def _one_line(text: str) -> str:
    """`text` with line breaks and other control characters as single spaces: a
    header built from it cannot start another header."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())

"""HTTP hardening, all pure ASGI (BaseHTTPMiddleware would buffer streams and lose
contextvars): security headers, refusal of cross-origin writes and of foreign Host
names, and the dashboard's sign-in cookie. CORS for the
allow-list of dashboard origins is Starlette's CORSMiddleware (see create_app), inside
this layer: a preflight from an origin not listed is refused here, in our error shape.

Cross-origin writes: a browser adds `Origin` to every POST. One from a page that is
neither this service nor an allowed origin is refused, so another site cannot make a
visitor's browser cancel jobs with the visitor's cookie (or, without authentication,
with nothing at all). Clients that are not browsers send no `Origin` and are not
affected.

Foreign Host names: without authentication the service trusts whoever can reach its
loopback address. A web page can reach it too, through DNS rebinding (a name of the
attacker's that resolves to 127.0.0.1, which makes the page "same origin"), so the
Host header must name this machine: localhost, an IP address, or a single-label name.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import time
from urllib.parse import quote

from starlette.datastructures import URL
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import COOKIE, QUERY_PARAM, READ, decode_token, looks_like_jwt, query_token
from .errors import (
    CrossOrigin,
    Forbidden,
    InvalidInput,
    ProgressError,
    Refused,
    Unauthorized,
    error_response,
)
from .request_headers import headers
from .settings import Settings

CSP = ("default-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_SECURITY_NAMES = frozenset(name for name, _ in SECURITY_HEADERS)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# what CORSMiddleware lets a listed origin's page do and read
CORS_METHODS = ("GET", "POST")
CORS_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID", "X-Worker-Token",
                "X-Request-Id")
CORS_EXPOSE = ("X-Request-Id", "Retry-After", "WWW-Authenticate")
RETRY_STREAMS_S = 5
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # what no header value may hold (h11, httptools)
_PATH_SAFE = "/:@!$&'()*+,;=~"  # RFC 3986 pchar and "/", besides the unreserved letters


class Policy:
    """The checks every request passes before any route: the Host rule and the
    refusal of cross-origin writes (and of preflights from origins not listed)."""

    def __init__(self, settings: Settings) -> None:
        self.origins = frozenset(o.lower() for o in settings.cors_origin_list)
        self.check_host = settings.auth == "none" and not settings.insecure
        self.own_host = settings.host.lower()

    def screen(self, scope: Scope) -> ProgressError | None:
        """Why this request is refused (a foreign Host, a cross-origin write), or None."""
        given = headers(scope)
        if self.check_host:
            host = given.get(b"host", b"").decode("latin-1")
            if not _local_host(host, self.own_host):
                return Refused(400, "host_not_allowed",
                               "this service answers only to localhost or an IP address "
                               "without authentication; configure a JWT secret to serve "
                               "other names")
        raw = given.get(b"origin")
        if raw is None:
            return None
        origin = raw.decode("latin-1")
        if origin.lower() in self.origins:
            return None
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in given:
            return CrossOrigin(f"origin {origin[:100]!r} is not in cors_origins")
        if scope["method"] not in SAFE_METHODS and not same_origin(scope, origin):
            return CrossOrigin(f"requests from {origin[:100]!r} are not allowed; add the "
                               "origin to cors_origins to let a dashboard there call this "
                               "service")
        return None


def with_headers(own: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An answer's own headers and the security headers it does not set itself."""
    if not any(name.lower() in _SECURITY_NAMES for name, _ in own):  # the usual answer
        return [*own, *SECURITY_HEADERS]
    present = {name.lower() for name, _ in own}
    return [*own, *(h for h in SECURITY_HEADERS if h[0] not in present)]


class SecurityMiddleware:
    """Security headers on every answer; cross-origin writes and foreign hosts refused."""

    def __init__(self, app: ASGIApp, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": with_headers(message.get("headers", []))}
            await send(message)

        refusal = self.policy.screen(scope)
        if refusal is not None:
            await error_response(refusal)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


@functools.lru_cache(maxsize=256)
def _local_host(host: str, own_host: str) -> bool:
    """Host names are few and parsing an address is not free: answers are remembered."""
    name = host.lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    else:
        name = name.rpartition(":")[0] if ":" in name else name
    if not name or name == own_host or "." not in name:
        return True  # no Host (HTTP/1.0), this host, or a single label (localhost too)
    if name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def same_origin(scope: Scope, origin: str) -> bool:
    """True when the page that sent the request was served by this service."""
    given = headers(scope)
    if given.get(b"sec-fetch-site") == b"same-origin":
        return True
    host = given.get(b"host")
    return host is not None and \
        origin.lower() == f"{scope['scheme']}://{host.decode('latin-1')}".lower()


class DashboardLogin:
    """Sign a browser in: `GET /?access_token=<JWT>` sets the dashboard's cookie and
    redirects to the same page without the token, so the address bar, the history and
    bookmarks never keep it. The cookie is HttpOnly and SameSite=Strict. A browser whose
    token is refused goes to the page with `?signin=rejected` (or `=scope`), which says how
    to sign in; other clients get the JSON error."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = query_token(scope.get("query_string", b"")) \
            if scope["type"] == "http" and self.settings.auth == "jwt" else None
        if token is None or scope["method"] not in ("GET", "HEAD") \
                or scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        refused = None
        try:
            if not looks_like_jwt(token):
                raise Unauthorized("this is not a viewer token")
            who = decode_token(self.settings, token)
            if not who.may(READ):
                raise Forbidden(f"this token lacks the {READ!r} scope")
        except (Unauthorized, Forbidden) as exc:
            if b"text/html" not in headers(scope).get(b"accept", b""):
                raise
            refused = "scope" if isinstance(exc, Forbidden) else "rejected"
        # the path comes percent-decoded: a control character would go into Location, where
        # uvicorn refuses it (and drops the connection), or urlsplit would silently drop it
        path: str = scope["path"]
        if _CONTROL.search(path):
            raise InvalidInput("the path holds a control character", field="path")
        url = URL(scope=scope).remove_query_params(QUERY_PARAM)
        query = (url.include_query_params(signin=refused) if refused else url).query
        # one leading slash: "//host" would send the browser to another site; quoted, so
        # spaces and non-ASCII letters reach the browser as they came
        location = "/" + quote(path.lstrip("/"), safe=_PATH_SAFE) + (f"?{query}" if query
                                                                     else "")
        cookie = b""
        if refused is None:
            lifetime = max(0, int((who.expires_at or 0) - time.time()))
            cookie = (f"{COOKIE}={token}; Path=/; Max-Age={lifetime}; HttpOnly; "
                      "SameSite=Strict" + ("; Secure" if scope["scheme"] == "https" else "")
                      ).encode("latin-1")
        await send({"type": "http.response.start", "status": 303, "headers": [
            (b"location", location.encode("ascii")),
            *([(b"set-cookie", cookie)] if cookie else []),
            (b"cache-control", b"no-store"),
            (b"content-length", b"0"),
        ]})
        await send({"type": "http.response.body", "body": b""})

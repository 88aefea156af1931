"""Who is asking and what they may touch.

Two modes (Settings.auth). In `none` everyone is one anonymous user; Settings
allows it only on a loopback address unless the operator says --insecure. In
`jwt` viewers and producers present an HS256 token: its `sub` owns jobs, its
`scope` grants `read` (see own jobs), `create` (create own jobs and control
them) or `admin` (see and control every job). Workers present their job's
worker token, of which only a sha256 hash is stored.

Someone else's job answers 404, exactly like a missing one, so a caller learns
nothing about jobs it may not see. A worker token that does not fit the job is
a 401 whether or not the job exists, for the same reason.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import jwt
from starlette.requests import HTTPConnection

from .app_context import context_of
from .errors import Forbidden, JobNotFound, Unauthorized
from .jobs import Job
from .request_headers import header
from .settings import Settings

ANONYMOUS = "anonymous"
COOKIE = "progress_sse_token"
QUERY_PARAM = "access_token"
WORKER_HEADER = b"x-worker-token"
READ, CREATE, ADMIN = "read", "create", "admin"
SCOPES = frozenset({READ, CREATE, ADMIN})
ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32

_SUBJECT_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")
# RFC 6749 separates scopes with ASCII spaces only (commas are our own extension): with
# `\s`, "read\u00a0admin" would be two scopes here and one unknown scope to the issuer
_SCOPE_SPLIT = re.compile(r"[ ,]+")
TIME_CLAIMS = ("exp", "nbf", "iat")
MAX_TIME = 253402300799  # 9999-12-31T23:59:59Z: a later "time" is a mistake or a trick
_CACHE_KEY = "progress_sse.identity"
_REALM = 'Bearer realm="progress-sse"'
_NO_HASH = hashlib.sha256(b"").hexdigest()  # compared against when there is no job


@dataclass(frozen=True)
class Identity:
    subject: str
    admin: bool = False
    scopes: frozenset[str] = frozenset()
    expires_at: float | None = None  # the token's `exp`

    @property
    def owner_filter(self) -> str | None:
        """The owner a read is limited to; None for an admin, who sees every job."""
        return None if self.admin else self.subject

    def may(self, scope: str) -> bool:
        return self.admin or scope in self.scopes


ANONYMOUS_USER = Identity(ANONYMOUS, scopes=frozenset({READ, CREATE}))


def settings_of(conn: HTTPConnection) -> Settings:
    settings = context_of(conn).settings
    return settings


def identify(request: HTTPConnection) -> Identity:
    """The caller. Without authentication everyone is one anonymous user; with it, a 401
    unless a valid token comes in `Authorization: Bearer`, `?access_token=` or the cookie."""
    cached = request.scope.get(_CACHE_KEY)
    if isinstance(cached, Identity):
        return cached
    settings = settings_of(request)
    if settings.auth == "none":
        who = ANONYMOUS_USER
    else:
        token = presented_token(request)
        if token is None:
            raise Unauthorized(
                "authentication required: send Authorization: Bearer <token> "
                f"(or ?{QUERY_PARAM}=, or the {COOKIE} cookie)",
                headers={"WWW-Authenticate": _REALM})
        if not looks_like_jwt(token):
            raise Unauthorized("this is not a viewer token; a worker token only opens its "
                               "job's worker endpoints", headers=_invalid_token())
        who = decode_token(settings, token)
    request.scope[_CACHE_KEY] = who
    return who


def require(request: HTTPConnection, scope: str) -> Identity:
    """The caller, if its token grants `scope`; else 403 (401 without a valid token)."""
    who = identify(request)
    if not who.may(scope):
        raise Forbidden(f"this token lacks the {scope!r} scope", headers=_insufficient(scope))
    return who


def presented_token(conn: HTTPConnection) -> str | None:
    """The bearer token from the Authorization header, the query string or the cookie."""
    given = header(conn.scope, b"authorization")
    if given is not None:
        scheme, _, value = given.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'",
                               headers={"WWW-Authenticate": _REALM})
        return value.strip()
    return query_token(conn.scope.get("query_string", b"")) or conn.cookies.get(COOKIE) or None


def query_token(query_string: bytes) -> str | None:
    """`access_token` from the raw query string.

    Only the literal key counts (not `access%5Ftoken`), the same key the request log
    redacts, so a token that is accepted is never written to a log line.
    """
    for part in query_string.decode("latin-1").split("&"):
        key, eq, value = part.partition("=")
        if eq and key == QUERY_PARAM:
            return unquote_plus(value) or None
    return None


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


def decode_token(settings: Settings, token: str) -> Identity:
    """The identity a signed token carries; 401 if it is forged, expired or malformed."""
    assert settings.jwt_secret is not None
    required = ["exp", "sub"]
    if settings.jwt_issuer:
        required.append("iss")
    if settings.jwt_audience:
        required.append("aud")
    try:
        claims = _STRICT_JWT.decode(token, settings.jwt_secret, algorithms=[ALGORITHM],
                                    issuer=settings.jwt_issuer or None,
                                    audience=settings.jwt_audience or None,
                                    leeway=settings.jwt_leeway_s,
                                    options={"require": required})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the token has expired", headers=_invalid_token()) from None
    except jwt.InvalidTokenError as exc:
        raise Unauthorized(f"the token is not valid: {exc}", headers=_invalid_token()) from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not _SUBJECT_RE.match(subject):
        raise Unauthorized("the token's sub must be 1-200 printable characters",
                           headers=_invalid_token())
    scopes = _scopes(claims.get("scope", ""))
    return Identity(subject, admin=ADMIN in scopes, scopes=scopes,
                    expires_at=float(claims["exp"]))


class _StrictJWT(jwt.PyJWT):
    """PyJWT, reading the (already verified) payload as strictly as issuers write it.

    json.loads keeps the last of two equal keys, so a token with two `scope` claims
    means one thing to us and perhaps another to a gateway that reads the first.
    PyJWT checks time claims with int(), which takes "123", True, 1e300 and 2**64: a
    token that never expires. _decode_payload is PyJWT's documented hook for this.
    """

    def _decode_payload(self, decoded: dict[str, Any]) -> dict[str, Any]:
        try:
            payload = json.loads(decoded["payload"], object_pairs_hook=_unique_keys,
                                 parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:  # the hooks' DecodeError passes through
            raise jwt.DecodeError(f"invalid payload: {exc}") from None
        if not isinstance(payload, dict):
            raise jwt.DecodeError("invalid payload: must be a JSON object")
        for name in TIME_CLAIMS:
            if name in payload and not _is_time(payload[name]):
                raise jwt.DecodeError(f"the {name} claim must be a number of seconds "
                                      f"from 0 to {MAX_TIME}")
        return payload


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused if it names a key twice (json.loads keeps the last)."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise jwt.DecodeError(f"the key {key[:50]!r} is given twice")
        found[key] = value
    return found


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON; Python's json.loads reads them unless told not to."""
    raise jwt.DecodeError(f"{name} is not a JSON number")


def _is_time(value: object) -> bool:
    """A NumericDate (RFC 7519): a JSON number, not a string or a boolean, in range
    (1e400 parses as inf, so the range check also catches it)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and 0 <= value <= MAX_TIME


_STRICT_JWT = _StrictJWT()


def _scopes(raw: object) -> frozenset[str]:
    if isinstance(raw, str):
        parts: Iterable[object] = _SCOPE_SPLIT.split(raw)
    elif isinstance(raw, list):
        parts = raw
    else:
        raise Unauthorized("the token's scope must be a string", headers=_invalid_token())
    return frozenset(p for p in parts if isinstance(p, str)) & SCOPES


def _invalid_token() -> dict[str, str]:
    return {"WWW-Authenticate": f'{_REALM}, error="invalid_token"'}


def _insufficient(scope: str) -> dict[str, str]:
    return {"WWW-Authenticate": f'{_REALM}, error="insufficient_scope", scope="{scope}"'}


# ---------------------------------------------------------------- workers


def new_worker_token() -> tuple[str, str]:
    """A fresh worker token and the hash that is stored in its place."""
    token = secrets.token_urlsafe(24)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_matches(token: str, token_hash: str) -> bool:
    """Constant time, so the answer's timing says nothing about the stored hash."""
    return hmac.compare_digest(hash_token(token), token_hash)


@dataclass(slots=True)  # one per post: slots, not frozen (10x cheaper to build)
class WorkerPass:
    """What a worker endpoint was shown: a worker token, or a producer's or admin's JWT."""

    token: str | None = None  # a worker token, to match against the job's stored hash
    owner: str | None = None  # otherwise: jobs of this owner
    everyone: bool = False  # an admin
    strict: bool = True  # a token that fits no job is a 401 even when the job is missing

    def check(self, job: Job | None, job_id: str) -> Job:
        """The job, if this pass opens it; else 401 (wrong worker token) or 404."""
        if self.token is not None:
            fits = token_matches(self.token, job.token_hash if job is not None else _NO_HASH)
            if job is not None and fits:
                return job
            if job is not None or self.strict:
                raise Unauthorized(f"the worker token is not valid for job {job_id!r}",
                                   headers=_invalid_token())
        elif job is not None and (self.everyone or job.owner == self.owner):
            return job
        raise JobNotFound(f"no job {job_id!r}")


def worker_pass(request: HTTPConnection) -> WorkerPass:
    """The worker credential: `X-Worker-Token`, or a bearer token (worker token or JWT).

    Without authentication the worker token is optional, but one that is sent must fit.
    """
    settings = settings_of(request)
    worker_header = header(request.scope, WORKER_HEADER)
    if settings.auth == "none":
        token = worker_header if worker_header is not None else _loose_bearer(request)
        # a viewer JWT means nothing here; any other token must fit the job
        if token and (worker_header is not None or not looks_like_jwt(token)):
            return WorkerPass(token=token, strict=False)
        return WorkerPass(owner=ANONYMOUS)
    if worker_header is not None:
        return WorkerPass(token=worker_header)
    token = presented_token(request)
    if token is None:
        raise Unauthorized("a worker token is required: send Authorization: Bearer <token> "
                           "or X-Worker-Token", headers={"WWW-Authenticate": _REALM})
    if not looks_like_jwt(token):
        return WorkerPass(token=token)
    who = decode_token(settings, token)
    if who.admin:
        return WorkerPass(everyone=True)
    if CREATE not in who.scopes:
        raise Forbidden(f"this token lacks the {CREATE!r} scope that worker posts need",
                        headers=_insufficient(CREATE))
    return WorkerPass(owner=who.subject)


def _loose_bearer(conn: HTTPConnection) -> str | None:
    """A bearer token from the header or the query; another scheme is no token."""
    scheme, _, value = (header(conn.scope, b"authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return query_token(conn.scope.get("query_string", b""))


# ---------------------------------------------------------------- minting


def mint_token(secret: str, sub: str, scopes: Iterable[str] | str, ttl_s: float,
               issuer: str | None = None, audience: str | None = None) -> str:
    """A signed viewer/producer token: `sub` owns jobs, `scopes` from read, create, admin.

    ValueError on a bad argument (for the command line to turn into a usage error).
    """
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"the secret must be at least {MIN_SECRET_BYTES} bytes long")
    if not _SUBJECT_RE.match(sub):
        raise ValueError("the subject must be 1-200 printable characters")
    names = _SCOPE_SPLIT.split(scopes) if isinstance(scopes, str) else list(scopes)
    wanted = {s for s in names if s}
    if not wanted:
        raise ValueError(f"name at least one scope: {', '.join(sorted(SCOPES))}")
    unknown = wanted - SCOPES
    if unknown:
        raise ValueError(f"unknown scope {sorted(unknown)[0]!r}; "
                         f"known: {', '.join(sorted(SCOPES))}")
    if not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError("the lifetime must be a positive number of seconds")
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "scope": " ".join(sorted(wanted)),
                                 "iat": now, "exp": now + math.ceil(ttl_s)}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=ALGORITHM)

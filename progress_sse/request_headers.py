"""Request headers as one dict, built once per request and kept in the scope.

Starlette's `Headers.get` scans the header list and raises a KeyError inside for
every absent name; a worker post asks for eight names, most of them absent, which
measured 5-10% of a post's CPU. ASGI servers give names lowercased, so one dict
answers them all. The first of repeated headers wins, as with Starlette.
"""

from __future__ import annotations

from starlette.types import Scope

_KEY = "progress_sse.headers"


def headers(scope: Scope) -> dict[bytes, bytes]:
    """Every request header by lowercased name (the first one of a repeated name)."""
    found: dict[bytes, bytes] | None = scope.get(_KEY)
    if found is None:
        found = scope[_KEY] = dict(reversed(scope["headers"]))
    return found


def header(scope: Scope, name: bytes, default: str | None = None) -> str | None:
    """One header as text (latin-1, as HTTP/1.1 carries it), or `default`."""
    value = headers(scope).get(name)
    return default if value is None else value.decode("latin-1")

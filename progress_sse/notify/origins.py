"""The SSRF rule for a job's own webhook: its origin (scheme, host, port) must be one
that WEBHOOK_ORIGINS lists. Checked at create, and again before each attempt (an
origin taken off the list stops the deliveries to it)."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> str | None:
    """`scheme://host[:port]` of an http(s) URL, lower case, the default port left out;
    None for anything else (another scheme, no host, credentials in it)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or "@" in parts.netloc:
        return None
    host = f"[{host}]" if ":" in host else host
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def allowed(url: str, origins: Iterable[str]) -> bool:
    """Whether `url`'s origin is one of `origins` (as WEBHOOK_ORIGINS lists them)."""
    found = origin(url)
    return found is not None and found in {origin(o) for o in origins}

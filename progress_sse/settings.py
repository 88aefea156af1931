"""Service configuration: one frozen object, built from the environment and CLI flags."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

PREFIX = "PROGRESS_SSE_"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    db: str = "progress.db"
    synchronous: str = "NORMAL"  # NORMAL survives a process crash; FULL also a power cut
    keepalive_s: float = 15.0
    # the reconnect delay each stream asks its clients for (`retry:`): a restart of a
    # second or two costs a few tries, each a dropped connection that clients retry
    retry_ms: int = 1000
    log_format: str = "auto"  # auto (console on a TTY, JSON otherwise), json, console
    log_level: str = "info"
    tail_size: int = 4096  # events kept in the hub's in-memory tail
    tail_bytes: int = 8 << 20  # and at most this many bytes of frames
    replay_batch: int = 1000  # events read from the store per step of a lagging stream
    # what one stream may hold at once beyond the connection's own buffer: each step of
    # a catch-up reads and sends at most this many bytes of events (or one bigger event)
    stream_buffer_bytes: int = 256 << 10
    max_body_bytes: int = 64 * 1024
    # how a request may arrive (limits.py): its request line and headers at most this
    # many bytes (431), within header_timeout_s of its first byte (or of the connection
    # opening), and its body within body_timeout_s of the end of its headers
    max_header_bytes: int = 32 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    retention_events: int = 0  # 0 = keep every event; otherwise prune the oldest beyond this count
    estimate_every_s: float = 1.0  # refresh a running job's estimate at most this often
    heartbeat_timeout_s: float = 60.0  # default per job: silence before a running job is `stalled`
    stall_check_s: float = 1.0
    max_wait_s: float = 60.0  # upper bound for long-poll waits
    shutdown_timeout_s: float = 5.0
    # longest wait for the store to confirm a write; then 503 (and /healthz 503 while
    # writes cannot be confirmed within it)
    write_timeout_s: float = 5.0
    # authentication (README, "Security"); auth "" means: "jwt" with a secret, else "none"
    auth: str = ""
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_s: float = 30.0
    insecure: bool = False  # allow auth=none on a non-loopback address (logs a warning)
    max_streams_per_user: int = 50  # open SSE streams per subject (jwt mode); 0 = no limit
    cors_origins: str = ""  # comma-separated origins allowed to call the API with credentials

    def __post_init__(self) -> None:
        if self.jwt_secret == "":
            object.__setattr__(self, "jwt_secret", None)
        if not self.auth:
            object.__setattr__(self, "auth", "jwt" if self.jwt_secret else "none")

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Build settings from PROGRESS_SSE_* variables, then explicit overrides (CLI flags)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _convert(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.synchronous.upper() not in ("NORMAL", "FULL"):
            raise ConfigError("synchronous must be NORMAL or FULL")
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError("log_format must be auto, json or console")
        if self.keepalive_s <= 0:
            raise ConfigError("keepalive_s must be > 0")
        if not 0 < self.retry_ms <= 3_600_000:
            raise ConfigError("retry_ms must be between 1 and 3600000 (an hour)")
        if not self.write_timeout_s > 0:  # NaN too
            raise ConfigError("write_timeout_s must be > 0")
        if self.tail_size < 16:
            raise ConfigError("tail_size must be >= 16")
        if self.stream_buffer_bytes < 4096:
            raise ConfigError("stream_buffer_bytes must be >= 4096")
        if self.replay_batch < 1:
            raise ConfigError("replay_batch must be >= 1")
        if self.max_header_bytes < 1024:
            raise ConfigError("max_header_bytes must be >= 1024 (browsers send more than that)")
        if not self.header_timeout_s > 0 or not self.body_timeout_s > 0:
            raise ConfigError("header_timeout_s and body_timeout_s must be > 0")
        self.validate_security()

    def validate_security(self) -> None:
        """Refuse configurations that would expose the service without authentication."""
        if self.auth not in ("none", "jwt"):
            raise ConfigError("auth must be none or jwt")
        if self.auth == "jwt" and not self.jwt_secret:
            raise ConfigError("auth=jwt needs a signing secret (PROGRESS_SSE_JWT_SECRET)")
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < 32:
            raise ConfigError("the JWT secret must be at least 32 bytes long")
        if self.auth == "none" and not self.loopback and not self.insecure:
            raise ConfigError(
                f"refusing to serve {self.host!r} without authentication: set "
                "PROGRESS_SSE_JWT_SECRET, listen on 127.0.0.1, or pass --insecure")
        if self.jwt_leeway_s < 0:
            raise ConfigError("jwt_leeway_s must be >= 0")
        if self.max_streams_per_user < 0:
            raise ConfigError("max_streams_per_user must be >= 0 (0: no limit)")
        for origin in self.cors_origin_list:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc \
                    or parts.path or parts.query or parts.fragment or "*" in origin:
                raise ConfigError(f"cors_origins: {origin!r} is not an origin such as "
                                  "https://dash.example.com (no wildcards, no path)")

    @property
    def loopback(self) -> bool:
        """True when the service listens on a loopback address only."""
        host = self.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        return tuple(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())


def _convert(name: str, kind: Any, raw: str) -> Any:
    kind = str(kind)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return raw.strip().lower() in ("1", "true", "yes", "on")
    except ValueError:
        raise ConfigError(f"{PREFIX}{name.upper()}: {raw!r} is not a valid {kind}") from None
    return raw

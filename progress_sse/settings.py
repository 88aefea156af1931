"""Service configuration: one frozen object, built from the environment and CLI flags."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

PREFIX = "PROGRESS_SSE_"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    db: str = "progress.db"
    synchronous: str = "NORMAL"  # NORMAL (WAL: durable on OS crash only up to last checkpoint) or FULL
    keepalive_s: float = 15.0
    retry_ms: int = 1000
    log_format: str = "auto"  # auto (console on a TTY, JSON otherwise), json, console
    log_level: str = "info"
    tail_size: int = 4096  # events kept in the hub's in-memory tail
    tail_bytes: int = 8 << 20  # and at most this many bytes of frames
    replay_batch: int = 1000  # events read from the store per step of a lagging stream
    max_body_bytes: int = 64 * 1024
    retention_events: int = 0  # 0 = keep every event; otherwise prune the oldest beyond this count
    heartbeat_timeout_s: float = 60.0  # default per job: silence before a running job is `stalled`
    stall_check_s: float = 1.0
    max_wait_s: float = 60.0  # upper bound for long-poll waits
    shutdown_timeout_s: float = 5.0

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
        if self.tail_size < 16:
            raise ConfigError("tail_size must be >= 16")


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

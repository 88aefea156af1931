"""Service configuration: one frozen object, and the one definition of every setting.

Each field is read from the keyword arguments `Settings(...)` is given (the `serve`
flags), else from its environment variable `PROGRESS_SSE_<NAME>`, else its default:
pydantic-settings reads the variables and pydantic converts and checks every value.
`progress-sse serve` builds its flags from these fields (cli/service.py), so a field's
name, type, default and description say everything about it once.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError
from .notify.email import SmtpServer, check_address

PREFIX = "PROGRESS_SSE_"
# fields with no `serve` flag: a flag's value is visible to every user of the host (ps)
ENV_ONLY = frozenset({"jwt_secret", "webhook_secret", "smtp_url"})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `15m`, `1h` or `7d`; ValueError otherwise."""
    found = _DURATION.match(text.lower())
    if found is None:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 1h or 7d")
    return float(found.group(1)) * _UNITS[found.group(2)]


def _duration(value: Any) -> Any:
    """A Duration field's text as seconds; a number passes as it is."""
    return parse_duration(value) if isinstance(value, str) else value


# seconds, written as 90, 30s, 15m, 24h or 1d in a flag or variable
Duration = Annotated[float, BeforeValidator(_duration), Field(ge=0)]


def is_duration(name: str) -> bool:
    """Does the field take a Duration (so its flag takes text such as 1d)?"""
    return any(getattr(m, "func", None) is parse_duration
               for m in Settings.model_fields[name].metadata)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="forbid")

    host: str = Field(default="127.0.0.1", description="listen address")
    port: int = Field(default=8000, ge=0, le=65535, description="listen port")
    db: str = Field(default="progress.db",
                    description="SQLite file, or a postgresql:// DSN (several instances)")
    synchronous: Annotated[Literal["NORMAL", "FULL"], BeforeValidator(_upper)] = Field(
        default="NORMAL",
        description="SQLite durability: NORMAL survives a process crash, FULL a power cut too")
    keepalive_s: float = Field(default=15.0, gt=0,
                               description="seconds between keep-alive comments")
    # a restart of a second or two costs a few tries, each a dropped connection clients retry
    retry_ms: int = Field(default=1000, gt=0, le=3_600_000,
                          description="the reconnect delay streams ask clients for (retry:)")
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: console on a terminal, JSON otherwise")
    log_level: Annotated[Literal["debug", "info", "warning", "error"],
                         BeforeValidator(_lower)] = Field(default="info", description="log level")
    tail_size: int = Field(default=4096, ge=16,
                           description="events kept in the hub's in-memory tail")
    tail_bytes: int = Field(default=8 << 20,
                            description="bytes of frames kept in that tail at most")
    replay_batch: int = Field(default=1000, ge=1,
                              description="events read from the store per step of a replay")
    # each step of a catch-up reads and sends at most this many bytes (or one bigger event)
    stream_buffer_bytes: int = Field(
        default=256 << 10, ge=4096,
        description="what one stream may hold at once beyond its connection's buffer")
    max_body_bytes: int = Field(default=64 * 1024, description="larger request bodies get 413")
    # how a request may arrive (limits.py); browsers send more than 1 KiB of headers
    max_header_bytes: int = Field(default=32 * 1024, ge=1024,
                                  description="request line and headers at most (431)")
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a request's head within this of its first byte (408)")
    body_timeout_s: float = Field(default=30.0, gt=0,
                                  description="its body within this of the end of its head")
    retention_events: int = Field(default=0,
                                  description="keep only the newest N events (0: all)")
    retention_days: float = Field(
        default=30.0, ge=0,
        description="delete events, and jobs finished, longer ago than this (0: keep all)")
    compact_after: Duration = Field(
        default=0.0, description="drop a finished job's progress events this long after "
        "it finished, e.g. 1d (0: never)")
    retention_every_s: Duration = Field(
        default=60.0, gt=0, description="how often pruning looks for events to delete; "
        "also how finely an event's age is known")
    retention_batch: int = Field(
        default=2000, ge=1, le=100_000,
        description="rows deleted per pruning transaction (smaller: shorter write locks)")
    # completion notifications (README, "Notifications")
    webhook_url: str = Field(default="",
                             description="POST every job's finish to this URL (Standard Webhooks)")
    webhook_origins: str = Field(
        default="", description="comma-separated origins a job's own webhook may point at")
    webhook_secret: str | None = Field(
        default=None, repr=False, description="whsec_... secret webhooks are signed with")
    webhook_max_age: Duration = Field(
        default=86400.0, description="retry a notification for this long, then give up")
    webhook_timeout: Duration = Field(
        default=10.0, gt=0, description="longest wait for one attempt's answer")
    webhook_retry_min: Duration = Field(
        default=5.0, gt=0, description="wait after a first failed attempt (doubled after"
        " each, with jitter)")
    webhook_retry_max: Duration = Field(
        default=3600.0, gt=0, description="longest wait between two attempts")
    smtp_url: str | None = Field(
        default=None, repr=False,
        description="smtp://user:pass@host:587 for email notifications (STARTTLS if offered)")
    smtp_from: str = Field(default="", description="the From address of notification mail")
    public_url: str = Field(
        default="", description="the dashboard's public URL, for links in notifications")
    estimate_every_s: float = Field(
        default=1.0, description="refresh a running job's estimate at most this often")
    heartbeat_timeout_s: float = Field(
        default=60.0, description="default silence before a running job is stalled")
    stall_check_s: float = Field(default=1.0, description="how often to look for stalled jobs")
    max_wait_s: float = Field(default=60.0, description="longest control long-poll")
    shutdown_timeout_s: float = Field(default=5.0, description="longest graceful shutdown")
    # and /healthz answers 503 while writes cannot be confirmed within it
    write_timeout_s: float = Field(
        default=5.0, gt=0, description="longest wait for a write to be confirmed, then 503")
    # authentication (README, "Security")
    auth: str = Field(default="",
                      description="none or jwt (default: jwt with a secret, else none)")
    jwt_secret: str | None = Field(default=None, repr=False,
                                   description="HS256 signing secret, at least 32 bytes")
    jwt_issuer: str | None = Field(default=None, description="tokens must carry this iss")
    jwt_audience: str | None = Field(default=None, description="tokens must carry this aud")
    jwt_leeway_s: float = Field(default=30.0, ge=0, description="clock skew allowed on exp")
    insecure: bool = Field(
        default=False,
        description="allow no authentication on a non-loopback address (not advised)")
    max_streams_per_user: int = Field(
        default=50, ge=0, description="open SSE streams per user, jwt mode (0: no limit)")
    cors_origins: str = Field(
        default="", description="comma-separated origins allowed to call the API")

    @classmethod
    def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments (flags) over the environment over the defaults; no .env file."""
        return init_settings, env_settings

    @model_validator(mode="before")
    @classmethod
    def _derive_auth(cls, values: Any) -> Any:
        """An empty secret is none; no `auth` means jwt with a secret, else none."""
        if isinstance(values, dict):
            if values.get("jwt_secret") == "":
                values = {**values, "jwt_secret": None}
            if not values.get("auth"):
                values = {**values, "auth": "jwt" if values.get("jwt_secret") else "none"}
        return values

    @classmethod
    def load(cls, **flags: Any) -> Settings:
        """The service's settings: `flags` given (None: not given) over the environment.

        A bad value is a ConfigError naming the flag or variable it came from."""
        given = {name: value for name, value in flags.items() if value is not None}
        try:
            settings = cls(**given)
        except ValidationError as exc:
            raise ConfigError("; ".join(_explain(error, given) for error in exc.errors())
                              ) from None
        settings.validate_all()
        return settings

    def validate_all(self) -> None:
        """Every check a configuration must pass before the service touches anything:
        `load`, `serve` and create_app each run all of them."""
        self.validate_security()
        self.validate_email()
        self.validate_webhooks()

    def validate_security(self) -> None:
        """Refuse configurations that would expose the service without authentication."""
        if self.auth not in ("none", "jwt"):
            raise ConfigError("auth must be none or jwt")
        if self.auth == "jwt" and not self.jwt_secret:
            raise ConfigError(f"auth=jwt needs a signing secret ({env_var('jwt_secret')})")
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < 32:
            raise ConfigError("the JWT secret must be at least 32 bytes long")
        if self.auth == "none" and not self.loopback and not self.insecure:
            raise ConfigError(
                f"refusing to serve {self.host!r} without authentication: set "
                f"{env_var('jwt_secret')}, listen on 127.0.0.1, or pass {flag('insecure')}")
        _check_origins("cors_origins", self.cors_origin_list, "https://dash.example.com")

    def validate_email(self) -> None:
        """Refuse an SMTP URL that does not parse, or mail with no From address."""
        _check_url("public_url", self.public_url, "https://progress.example.com")
        if not self.smtp_url:
            return
        try:
            SmtpServer.parse(self.smtp_url)
        except ConfigError as exc:
            raise ConfigError(f"{env_var('smtp_url')}: {exc}") from None
        if not self.smtp_from:
            raise ConfigError(f"{env_var('smtp_url')} needs a From address: set "
                              f"{env_var('smtp_from')} (or {flag('smtp_from')})")
        try:
            check_address(self.smtp_from)
        except ValueError as exc:
            raise ConfigError(f"smtp_from: {exc}") from None

    def validate_webhooks(self) -> None:
        """Refuse webhooks that could not be signed, and URLs or origins that are not."""
        _check_url("webhook_url", self.webhook_url, "https://hooks.example.com/progress")
        _check_origins("webhook_origins", self.webhook_origin_list, "https://hooks.example.com")
        if not (self.webhook_url or self.webhook_origin_list):
            return
        if not self.webhook_secret:
            raise ConfigError(f"webhooks are configured but not their signing secret: set "
                              f"{env_var('webhook_secret')} (whsec_ and base64)")
        from standardwebhooks import Webhook

        try:
            if not self.webhook_secret.startswith("whsec_"):
                raise ValueError("it does not start with whsec_")
            Webhook(self.webhook_secret)
        except Exception as exc:
            raise ConfigError(f"{env_var('webhook_secret')} is not a whsec_... secret: "
                              f"{exc}") from None

    @property
    def webhook_origin_list(self) -> tuple[str, ...]:
        """The allowed origins, as compared (lower case, no trailing slash)."""
        return tuple(o.strip().rstrip("/").lower() for o in self.webhook_origins.split(",")
                     if o.strip())

    @property
    def smtp_server(self) -> SmtpServer | None:
        """Where notification mail goes; None when SMTP is not configured."""
        return SmtpServer.parse(self.smtp_url) if self.smtp_url else None

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


def _check_url(name: str, url: str, example: str) -> None:
    """An http(s) URL with a host, or nothing."""
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{name}: {url!r} is not a URL such as {example}")


def _check_origins(name: str, origins: tuple[str, ...], example: str) -> None:
    """Each an origin: scheme and host (and port), nothing else, no wildcard."""
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc \
                or parts.path or parts.query or parts.fragment or "*" in origin:
            raise ConfigError(f"{name}: {origin!r} is not an origin such as {example} "
                              "(no wildcards, no path)")


def env_var(name: str) -> str:
    """The environment variable of a field: PROGRESS_SSE_KEEPALIVE_S."""
    return PREFIX + name.upper()


def flag(name: str) -> str:
    """The `serve` flag of a field: --keepalive for keepalive_s (seconds are the metavar)."""
    return "--" + name.removesuffix("_s").replace("_", "-")


def _explain(error: Any, given: dict[str, Any]) -> str:
    name = str(error["loc"][0]) if error["loc"] else "settings"
    field = Settings.model_fields.get(name)
    shown = "(hidden)" if field is not None and not field.repr else repr(error["input"])
    where = f"{flag(name)} {shown}" if name in given else f"{env_var(name)}={shown}"
    message: str = error["msg"]
    return f"{where}: {message[:1].lower()}{message[1:]} ({name})"

"""uvicorn wiring: a server that ends every open stream as soon as it starts shutting down,
and whose connections keep the request limits of `limits`.

uvicorn waits for open connections before it runs the lifespan shutdown, so the
streams must be ended before that wait, or SIGTERM would hang on them.
"""

from __future__ import annotations

import errno
import gc
import math
import socket
import sys

import structlog
import uvicorn
from starlette.applications import Starlette

from .app_context import Context
from .limits import Limits, limited_protocol
from .logs import json_logs
from .settings import Settings

log = structlog.get_logger("progress_sse.server")


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: Context) -> None:
        super().__init__(config)
        self.ctx = ctx
        # (url, database) said once listening: a line on a terminal, else a log event
        self.announce: tuple[str, str] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.announce is not None:
            url, db = self.announce
            if json_logs(self.ctx.settings.log_format):  # a log of JSON lines stays one
                log.info("service.listening", url=url, db=db)
            else:
                print(f"progress-sse: serving {url} (dashboard and API), database {db};"
                      " Ctrl-C to stop", file=sys.stderr, flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.ctx.hub.close()
        await super().shutdown(sockets)


def make_server(app: Starlette, settings: Settings, **config: object) -> Server:
    """The server for `app`; `config` goes to uvicorn.Config (http="h11", say). Its HTTP
    protocol is wrapped to refuse oversized and slow requests (`limits`); h11's own cap
    on a head is set to the same size, so the same answer comes under either."""
    http = config.pop("http", "auto")
    limited = limited_protocol(http, Limits(settings.max_header_bytes,
                                            settings.header_timeout_s, settings.body_timeout_s))
    if limited is None:
        log.warning("server.limits_off", http=str(http),
                    why="request limits are built for uvicorn's HTTP/1.1 protocols")
    config.setdefault("h11_max_incomplete_event_size", settings.max_header_bytes)
    config.setdefault("ws", "none")  # no WebSocket routes: nothing of websockets is loaded
    cfg = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        http=limited or http,  # type: ignore[arg-type]
        **config,  # type: ignore[arg-type]
    )
    return Server(cfg, app.state.ctx)


class PortInUse(OSError):
    """The address to listen on is taken (or not ours to take): a message, not a traceback."""


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of `host`, as uvicorn's own bind would be, made
    before the service starts: a busy port is refused before the database is opened or
    `service.started` is logged (uvicorn binds only after the lifespan start-up)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"cannot resolve the listen address {host!r}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = "it is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise PortInUse(f"cannot listen on {host}:{port}: {reason}") from None
    return sockets


def tune_collector() -> None:
    """Set the cyclic garbage collector for a long-running server; call once, at start.

    By default it scans its youngest generation whenever 700 more containers have been
    made than freed: under load every few dozen posts, and each time through every
    object of every request in flight. Measured here, 64 workers posting: 8% of the
    event loop's CPU. Most of a request's objects are freed as it ends, so a higher
    threshold makes young scans rare without much more garbage waiting (one scan in
    30,000 posts instead of 470), and what start-up made (modules, the app) is moved
    out of every later scan."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)

"""uvicorn wiring: a server that ends every open stream as soon as it starts shutting down,
and whose connections keep the request limits of `limits`.

uvicorn waits for open connections before it runs the lifespan shutdown, so the
streams must be ended before that wait, or SIGTERM would hang on them.
"""

from __future__ import annotations

import gc
import math
import socket

import structlog
import uvicorn
from starlette.applications import Starlette

from .context import Context
from .limits import Limits, limited_protocol
from .settings import Settings

log = structlog.get_logger("progress_sse.server")


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: Context) -> None:
        super().__init__(config)
        self.ctx = ctx

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

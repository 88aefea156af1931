"""uvicorn wiring: a server that ends every open stream as soon as it starts shutting down.

uvicorn waits for open connections before it runs the lifespan shutdown, so the
streams must be ended before that wait, or SIGTERM would hang on them.
"""

from __future__ import annotations

import math
import socket

import uvicorn
from starlette.applications import Starlette

from .context import Context
from .settings import Settings


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: Context) -> None:
        super().__init__(config)
        self.ctx = ctx

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.ctx.hub.close()
        await super().shutdown(sockets)


def make_server(app: Starlette, settings: Settings, **config: object) -> Server:
    cfg = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        **config,  # type: ignore[arg-type]
    )
    return Server(cfg, app.state.ctx)

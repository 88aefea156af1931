"""What a request handler needs, made by create_app, and the one way to reach it from a
request (`context_of`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from .hub import Hub
from .metrics import Metrics
from .settings import Settings
from .snapshots import Snapshots
from .store import Store
from .stream_quota import StreamQuota

if TYPE_CHECKING:
    from .notify.service import Notifications


@dataclass
class Context:
    settings: Settings
    store: Store
    hub: Hub
    metrics: Metrics
    direct_writes: bool = False  # streams may write live chunks to uvicorn (uvicorn_direct)
    notifications: Notifications | None = None  # the outbox and its deliverer (notify/)
    snapshots: Snapshots = field(init=False)
    stream_quota: StreamQuota = field(init=False)

    def __post_init__(self) -> None:
        self.snapshots = Snapshots(self.store)
        # one user without authentication: a per-user cap would cap the whole service
        self.stream_quota = StreamQuota(self.settings.max_streams_per_user
                                        if self.settings.auth == "jwt" else 0)


def context_of(conn: HTTPConnection) -> Context:
    """The app's context, from any request or stream it serves."""
    ctx: Context = conn.app.state.ctx
    return ctx


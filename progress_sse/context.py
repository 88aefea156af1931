"""What a request handler needs, made by create_app and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field

from .hub import Hub
from .metrics import Metrics
from .settings import Settings
from .snapshots import Snapshots
from .store import Store


@dataclass
class Context:
    settings: Settings
    store: Store
    hub: Hub
    metrics: Metrics
    direct_writes: bool = False  # streams may write live chunks to uvicorn (uvicorn_direct)
    snapshots: Snapshots = field(init=False)

    def __post_init__(self) -> None:
        self.snapshots = Snapshots(self.store)


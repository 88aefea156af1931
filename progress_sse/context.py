"""What a request handler needs, made by create_app and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

from .hub import Hub
from .settings import Settings
from .store import Store


@dataclass
class Context:
    settings: Settings
    store: Store
    hub: Hub


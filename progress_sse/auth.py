"""Who is asking and what they may touch."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Identity:
    subject: str
    admin: bool = False

    @property
    def owner_filter(self) -> str | None:
        """The owner a read is limited to; None for an admin, who sees every job."""
        return None if self.admin else self.subject


def identify(request: Request) -> Identity:
    """The caller. Without authentication everyone is one anonymous user."""
    return Identity(ANONYMOUS)

"""The hub's contract with live streams: who is pushed what, and when they fall behind.

The streams over a real server are tested in test_streams and test_resume; here the
hub alone, with subscribers that record what it asks of them, so the cases a real
run rarely shows (a gap in the ids, a stream leaving while it is pushed) are pinned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from progress_sse.hub import Hub
from progress_sse.store import Event


def ev(eid: int, job: str = "a") -> Event:
    return Event.build(eid, job, "owner", "kind", "progress", "{}")


class Recorder:
    """A subscriber that notes every call; `leave_on_push` unsubscribes it when pushed."""

    def __init__(self, hub: Hub, key: str | None = None, leave_on_push: bool = False) -> None:
        self.hub, self.key, self.leave_on_push = hub, key, leave_on_push
        self.pushed: list[list[int]] = []
        self.behind: list[int] = []
        self.pings: list[float] = []
        self.stopped: list[str] = []

    def push(self, events: Sequence[Event], shared: dict[Any, Any]) -> None:
        self.pushed.append([e.id for e in events])
        if self.leave_on_push:
            self.hub.unsubscribe(self, self.key)

    def keep_alive(self, now: float) -> None:
        self.pings.append(now)

    def fall_behind(self, cursor: int) -> None:
        self.hub.unsubscribe(self, self.key)
        self.behind.append(cursor)

    def stop(self, why: str) -> None:
        self.stopped.append(why)


def live(hub: Hub, key: str | None = None, **kw: Any) -> Recorder:
    sub = Recorder(hub, key, **kw)
    hub.opened(sub)
    hub.subscribe(sub, key)
    return sub


def test_publish_pushes_every_live_stream_once_per_publish() -> None:
    hub = Hub()
    hub.reset(0)
    every, of_a, of_b = live(hub), live(hub, "a"), live(hub, "b")
    hub.publish([ev(1, "a"), ev(2, "a"), ev(3, "c")])
    hub.publish([ev(4, "b")])
    assert every.pushed == [[1, 2, 3], [4]]
    assert of_a.pushed == [[1, 2, 3]]  # once for its two events, filtering is its own
    assert of_b.pushed == [[4]]
    assert hub.live == 3 and hub.streams == 3


def test_a_stream_leaving_while_pushed_does_not_disturb_the_others() -> None:
    hub = Hub()
    hub.reset(0)
    subs = [live(hub, leave_on_push=i % 2 == 0) for i in range(6)]
    hub.publish([ev(1)])
    hub.publish([ev(2)])
    assert [s.pushed for s in subs] == [[[1]], [[1], [2]]] * 3
    assert hub.live == 3


def test_a_gap_in_ids_sends_every_live_stream_back_to_its_cursor() -> None:
    hub = Hub()
    hub.reset(10)
    every, of_a = live(hub), live(hub, "a")
    hub.publish([ev(11)])
    hub.publish([ev(15, "a")])  # 12 to 14 were written elsewhere: not in the tail
    assert every.pushed == [[11]] and of_a.pushed == [[11]]
    assert every.behind == [11] and of_a.behind == [11]
    assert hub.live == 0 and hub.streams == 2
    assert hub.after(11, 10) is None  # they read 12-14 from the store
    assert [e.id for e in hub.after(14, 10) or []] == [15]


def test_tick_asks_live_streams_only_and_close_stops_every_open_one() -> None:
    hub = Hub()
    hub.reset(0)
    idle, of_a = live(hub), live(hub, "a")
    catching_up = Recorder(hub)
    hub.opened(catching_up)  # open, not subscribed: it is reading from its cursor
    hub.tick()
    assert len(idle.pings) == len(of_a.pings) == 1 and catching_up.pings == []
    hub.released(idle, None)
    hub.close()
    assert idle.stopped == [] and of_a.stopped == catching_up.stopped == ["shutdown"]
    assert hub.streams == 2  # each is released when its request ends

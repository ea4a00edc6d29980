"""The watchers the binding service has heard from: the newest heartbeat per (segment, watcher id), kept in
memory only, and how many watchers each segment has alive (docs/contract.md#watcher-heartbeats). Pure: the times
are given by the caller.

A watcher is alive while its last heartbeat was heard less than EXPIRY_INTERVALS of its own interval ago (two
heartbeats may be lost or late before it counts as gone). Segments come from the heartbeats only: a segment no
watcher ever spoke for is unknown; one whose watchers all went silent stays known, with none alive.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Literal

from shared.events import WatcherHeartbeat

EXPIRY_INTERVALS: Final = 3.0
# A watcher silent this long is forgotten (its per-watcher series leaves the metrics); its segment stays known.
DEFAULT_FORGET_AFTER_S: Final = 3600.0

# fresh: recorded; stale: older than the one recorded from the same process (a late redelivery); shared_id:
# another process with the same watcher id is sending too — its heartbeats would hide the other's death.
Heard = Literal["fresh", "stale", "shared_id"]


@dataclass(frozen=True, slots=True)
class HeardWatcher:
    segment: str
    watcher_id: str
    heartbeat: WatcherHeartbeat
    heard_at_s: float  # the caller's monotonic clock
    heard_at_wall_s: float  # the caller's wall clock, seconds since the epoch

    def alive(self, now_s: float) -> bool:
        return now_s - self.heard_at_s < EXPIRY_INTERVALS * self.heartbeat.interval_s


class WatcherBook:
    def __init__(self, forget_after_s: float = DEFAULT_FORGET_AFTER_S) -> None:
        self._forget_after_s = forget_after_s
        self._watchers: dict[tuple[str, str], HeardWatcher] = {}
        self._segments: set[str] = set()

    def heard(self, heartbeat: WatcherHeartbeat, now_s: float, now_wall_s: float) -> Heard:
        """Record a heartbeat heard at `now_s` (monotonic) / `now_wall_s` (wall clock)."""
        key = (heartbeat.segment, heartbeat.watcher_id)
        self._segments.add(heartbeat.segment)
        known = self._watchers.get(key)
        outcome: Heard = "fresh"
        if known is not None and known.alive(now_s):
            before = known.heartbeat
            if heartbeat.started_at == before.started_at and heartbeat.sequence <= before.sequence:
                return "stale"
            if heartbeat.started_at < before.started_at:
                # A process started before the one heard last, still sending: two share the id (a restart
                # always starts later).
                outcome = "shared_id"
        self._watchers[key] = HeardWatcher(heartbeat.segment, heartbeat.watcher_id, heartbeat, now_s, now_wall_s)
        return outcome

    def alive_by_segment(self, now_s: float) -> dict[str, int]:
        """Every segment ever heard of, with how many of its watchers are alive at `now_s`."""
        alive = dict.fromkeys(self._segments, 0)
        for watcher in self._watchers.values():
            if watcher.alive(now_s):
                alive[watcher.segment] += 1
        return alive

    def watchers(self, now_s: float) -> Iterator[HeardWatcher]:
        """The watchers heard within the forgetting horizon (the others are dropped here)."""
        forgotten = [k for k, w in self._watchers.items() if now_s - w.heard_at_s >= self._forget_after_s]
        for key in forgotten:
            del self._watchers[key]
        yield from list(self._watchers.values())

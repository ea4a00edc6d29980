"""The watcher's heartbeat: an `arp.watcher.heartbeat` event every interval while it is connected, so that the
binding service knows how many watchers each segment has alive (docs/contract.md#watcher-heartbeats).

A heartbeat is published once, with the broker's confirm: one that fails is skipped, never retried nor
buffered — the next one says the same, and claims never queue behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from shared.events import WATCHER_HEARTBEAT_EVENT, Envelope, WatcherHeartbeat, envelope


class EnvelopePublisher(Protocol):
    async def publish(self, env: Envelope) -> None: ...


@dataclass(frozen=True, slots=True)
class Health:
    """The counters a heartbeat carries, since the watcher started."""

    kernel_drops: int
    claims_published: int


class Heartbeat:
    def __init__(
        self,
        broker: EnvelopePublisher,
        health: Callable[[], Health],
        *,
        watcher_id: str,
        interface: str,
        segment: str,
        interval_s: float,
        source: str,
        started_at: datetime | None = None,
    ) -> None:
        self._broker = broker
        self._health = health
        self._watcher_id = watcher_id
        self._interface = interface
        self._segment = segment
        self._interval_s = interval_s
        self._source = source
        self.started_at = started_at or datetime.now(UTC)
        self._attempts = 0
        self.sent = 0  # heartbeats confirmed by the broker

    def next_event(self) -> Envelope:
        """The heartbeat to publish now (its sequence counts every attempt: a skipped one leaves a gap)."""
        health = self._health()
        self._attempts += 1
        data = WatcherHeartbeat(
            watcher_id=self._watcher_id,
            interface=self._interface,
            segment=self._segment,
            interval_s=self._interval_s,
            started_at=self.started_at,
            sequence=self._attempts,
            kernel_drops=health.kernel_drops,
            claims_published=health.claims_published,
        )
        return envelope(WATCHER_HEARTBEAT_EVENT, data, self._source)

    async def beat(self) -> None:
        """Publish one heartbeat; raises if the broker does not confirm it (the caller logs and goes on)."""
        await self._broker.publish(self.next_event())
        self.sent += 1

"""The watcher's heartbeat: the event's validation, and what the watcher puts in it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from services.arp_watcher.heartbeat import Health, Heartbeat
from shared.events import WATCHER_HEARTBEAT_EVENT, Envelope, WatcherHeartbeat, decode, encode

STARTED = datetime(2026, 12, 3, 14, 0, tzinfo=UTC)


def heartbeat_data(**changes: Any) -> dict[str, Any]:
    return {
        "watcher_id": "host-a/eth0",
        "interface": "eth0",
        "segment": "rack-1",
        "interval_s": 5.0,
        "started_at": STARTED.isoformat(),
        "sequence": 1,
        "kernel_drops": 0,
        "claims_published": 0,
    } | changes


def test_a_heartbeat_validates() -> None:
    beat = WatcherHeartbeat.model_validate(heartbeat_data(sequence=7, kernel_drops=3, claims_published=12))
    assert (beat.watcher_id, beat.segment, beat.interval_s, beat.started_at) == (
        "host-a/eth0",
        "rack-1",
        5.0,
        STARTED,
    )
    assert (beat.sequence, beat.kernel_drops, beat.claims_published) == (7, 3, 12)


def test_the_segment_defaults_to_the_default_one() -> None:
    data = heartbeat_data()
    del data["segment"]
    assert WatcherHeartbeat.model_validate(data).segment == "default"


@pytest.mark.parametrize(
    "changes",
    [
        {"interval_s": 0},
        {"interval_s": -1},
        {"interval_s": 3601},
        {"sequence": 0},
        {"kernel_drops": -1},
        {"claims_published": -1},
        {"watcher_id": ""},
        {"segment": "no spaces"},
        {"interface": "a-very-long-interface-name"},
        {"started_at": "yesterday"},
        {"unexpected": 1},
    ],
    ids=lambda changes: next(iter(changes)),
)
def test_an_invalid_heartbeat_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        WatcherHeartbeat.model_validate(heartbeat_data(**changes))


class RecordingBroker:
    """Stands in for the broker: keeps what it is given, or fails while `away`."""

    def __init__(self) -> None:
        self.published: list[Envelope] = []
        self.away = False

    async def publish(self, env: Envelope) -> None:
        if self.away:
            raise ConnectionError("broker away")
        self.published.append(env)


def sender(broker: RecordingBroker, health: list[Health]) -> Heartbeat:
    return Heartbeat(
        broker,
        lambda: health[-1],
        watcher_id="host-a/eth0",
        interface="eth0",
        segment="rack-1",
        interval_s=2.5,
        source="arp_watcher",
        started_at=STARTED,
    )


async def test_each_beat_publishes_one_heartbeat_with_the_counters_of_that_moment() -> None:
    broker, health = RecordingBroker(), [Health(kernel_drops=0, claims_published=4)]
    heartbeat = sender(broker, health)
    await heartbeat.beat()
    health.append(Health(kernel_drops=2, claims_published=9))
    await heartbeat.beat()

    decoded = [decode(encode(env)) for env in broker.published]  # as the binding service reads them
    assert [head.type for head, _ in decoded] == [WATCHER_HEARTBEAT_EVENT] * 2
    assert {head.source for head, _ in decoded} == {"arp_watcher"}
    beats = [data for _, data in decoded if isinstance(data, WatcherHeartbeat)]
    assert len(beats) == 2
    assert [(b.sequence, b.kernel_drops, b.claims_published) for b in beats] == [(1, 0, 4), (2, 2, 9)]
    assert {(b.watcher_id, b.segment, b.interval_s, b.started_at) for b in beats} == {
        ("host-a/eth0", "rack-1", 2.5, STARTED)
    }
    assert heartbeat.sent == 2


async def test_a_heartbeat_the_broker_refuses_is_skipped_not_kept() -> None:
    broker, health = RecordingBroker(), [Health(kernel_drops=0, claims_published=0)]
    heartbeat = sender(broker, health)
    broker.away = True
    with pytest.raises(ConnectionError):
        await heartbeat.beat()
    broker.away = False
    await heartbeat.beat()
    # Only the next one goes out: nothing was buffered, and its sequence shows the one skipped.
    beats = [decode(encode(env))[1] for env in broker.published]
    assert len(beats) == 1
    assert [b.sequence for b in beats if isinstance(b, WatcherHeartbeat)] == [2]
    assert heartbeat.sent == 1

"""The binding service and the watchers' heartbeats: how many watchers each segment has alive, counted from
heartbeats published to the real RabbitMQ by the watcher's own sender, and never a database write for them."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
from prometheus_client import REGISTRY

from services.arp_watcher.heartbeat import Health, Heartbeat
from services.binding.service import BindingService
from services.binding.settings import BindingSettings
from shared import events
from shared.messaging import Broker
from shared.periodic import run_periodically
from shared.tasks import cancel
from tests.integration.binding_support import FakeClock, InterceptingPool, delivery
from tests.waiting import eventually


class CountingPool(InterceptingPool):
    """The real pool, counting the statements the service runs."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.statements = 0

    def before(self) -> None:
        self.statements += 1


def heartbeat(watcher_id: str, segment: str, sequence: int, interval_s: float) -> events.Envelope:
    data = events.WatcherHeartbeat(
        watcher_id=watcher_id,
        interface="eth0",
        segment=segment,
        interval_s=interval_s,
        started_at=datetime(2026, 12, 3, tzinfo=UTC),
        sequence=sequence,
        kernel_drops=0,
        claims_published=0,
    )
    return events.envelope(events.WATCHER_HEARTBEAT_EVENT, data, "arp_watcher")


async def test_a_batch_of_heartbeats_only_touches_no_database_and_the_count_follows_the_clock(
    pool: asyncpg.Pool,
) -> None:
    counting, clock = CountingPool(pool), FakeClock()
    # It never takes over: the process's gauges stay with the deciding service (the module's binding fixture).
    service = BindingService(counting, clock=clock)
    await service.load()
    counting.statements = 0

    await service.handle([delivery(heartbeat("a", "rack-1", 1, 5.0)), delivery(heartbeat("b", "rack-1", 1, 5.0))])
    await service.handle_routine([delivery(heartbeat("a", "rack-1", 2, 5.0))])
    assert counting.statements == 0  # no transaction, not even an empty one
    assert service.watchers.alive_by_segment(clock.monotonic_s()) == {"rack-1": 2}

    clock.advance(10.0)
    await service.handle([delivery(heartbeat("a", "rack-1", 3, 5.0))])
    clock.advance(5.0)  # b last heard 15 s ago: three of its intervals
    assert service.watchers.alive_by_segment(clock.monotonic_s()) == {"rack-1": 1}
    clock.advance(10.0)
    assert service.watchers.alive_by_segment(clock.monotonic_s()) == {"rack-1": 0}
    assert counting.statements == 0


async def test_a_segments_heartbeats_count_only_from_the_broker_user_entitled_to_it(pool: asyncpg.Pool) -> None:
    clock = FakeClock()
    service = BindingService(pool, clock=clock, watcher_user_template="havip-watcher-{segment}")
    await service.load()
    refused_before = refused("rack-9")

    await service.handle(
        [
            delivery(heartbeat("a", "rack-9", 1, 5.0), user_id="havip-watcher-rack-9"),
            delivery(heartbeat("b", "rack-9", 1, 5.0), user_id="havip-watcher-rack-8"),  # another segment's
            delivery(heartbeat("c", "rack-9", 1, 5.0)),  # a publisher that did not say who it is
        ]
    )
    assert service.watchers.alive_by_segment(clock.monotonic_s()) == {"rack-9": 1}
    assert refused("rack-9") == refused_before + 2


def refused(segment: str) -> float:
    return REGISTRY.get_sample_value("havip_watcher_messages_refused_total", {"segment": segment}) or 0.0


def alive(segment: str) -> float | None:
    return REGISTRY.get_sample_value("havip_watchers_alive", {"segment": segment})


def last_heard(segment: str, watcher_id: str) -> float | None:
    return REGISTRY.get_sample_value(
        "havip_watcher_last_heartbeat_timestamp_seconds", {"segment": segment, "watcher": watcher_id}
    )


@contextlib.asynccontextmanager
async def beating(publisher: Broker, watcher_id: str, segment: str, interval_s: float) -> AsyncIterator[None]:
    """A watcher's heartbeat sender, as the watcher runs it, on the test's broker connection."""
    heartbeat = Heartbeat(
        publisher,
        lambda: Health(kernel_drops=0, claims_published=0),
        watcher_id=watcher_id,
        interface="eth0",
        segment=segment,
        interval_s=interval_s,
        source="arp_watcher",
    )
    task = asyncio.create_task(
        run_periodically(heartbeat.beat, interval_s, what=f"heartbeat {watcher_id}", at_start=True)
    )
    try:
        yield
    finally:
        await cancel(task)


async def test_the_binding_counts_two_watchers_then_one_when_one_falls_silent(
    binding: BindingSettings, publisher: Broker
) -> None:
    segment = f"seg-{uuid.uuid4().hex[:8]}"
    assert alive(segment) is None  # no watcher spoke for it: unknown
    interval_s = 0.5  # gone after 1.5 s without a heartbeat
    before = time.time()
    async with beating(publisher, "host-a/eth0", segment, interval_s):
        async with beating(publisher, "host-b/eth0", segment, interval_s):
            await eventually(lambda: alive(segment) == 2, timeout=30, what="two watchers alive")
            heard_a, heard_b = last_heard(segment, "host-a/eth0"), last_heard(segment, "host-b/eth0")
            assert heard_a is not None
            assert before <= heard_a <= time.time()
            assert heard_b is not None
            assert before <= heard_b <= time.time()
        await eventually(lambda: alive(segment) == 1, timeout=30, what="one watcher alive after the other stopped")
    await eventually(lambda: alive(segment) == 0, timeout=30, what="none alive, the segment still known")
    assert last_heard(segment, "host-b/eth0") is not None  # remembered until the forgetting horizon
